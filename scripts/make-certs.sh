#!/usr/bin/env bash
# Makes a local certificate authority and one certificate for the NATS
# cluster in nats/cluster/ (clients and routes), for local use only.
#   ./scripts/make-certs.sh [OUT_DIR]     default nats/cluster/certs (gitignored)
# Writes ca.pem, ca-key.pem, server.pem, server-key.pem. Existing files are
# kept (delete the directory to make new ones). Production: use your own CA.
# The certificate names localhost, 127.0.0.1 and optiroute-n1..3, and is
# good for both ends of a route (serverAuth and clientAuth).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-nats/cluster/certs}"
mkdir -p "$out"
chmod 700 "$out"
if [ -s "$out/server.pem" ] && [ -s "$out/server-key.pem" ] && [ -s "$out/ca.pem" ]; then
  echo "make-certs: $out already holds certificates; delete it to make new ones"
  exit 0
fi
if ! command -v openssl >/dev/null 2>&1; then
  # Installs what is missing, like the other scripts: Debian's openssl.
  if command -v apt-get >/dev/null 2>&1; then
    echo "make-certs: installing openssl (apt)" >&2
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends openssl >&2 ||
      { $sudo apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends openssl >&2; }
  fi
  command -v openssl >/dev/null 2>&1 || { echo "make-certs: openssl is required (apt-get install openssl)" >&2; exit 1; }
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
days=825

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days "$days" \
  -subj "/CN=OptiRoute local NATS CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$tmp/ca-key.pem" -out "$tmp/ca.pem" 2>/dev/null

openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
  -subj "/CN=optiroute-nats" -keyout "$tmp/server-key.pem" -out "$tmp/server.csr" 2>/dev/null
cat >"$tmp/ext.cnf" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1,DNS:optiroute-n1,DNS:optiroute-n2,DNS:optiroute-n3
EXT
openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca-key.pem" -CAcreateserial \
  -days "$days" -sha256 -extfile "$tmp/ext.cnf" -out "$tmp/server.pem" 2>/dev/null

openssl verify -CAfile "$tmp/ca.pem" "$tmp/server.pem" >/dev/null
install -m 600 "$tmp/ca-key.pem" "$tmp/server-key.pem" "$out/"
install -m 644 "$tmp/ca.pem" "$tmp/server.pem" "$out/"
echo "make-certs: wrote $out/{ca,ca-key,server,server-key}.pem"
