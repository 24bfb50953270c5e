#!/usr/bin/env bash
# The embedded local model on its own (no NATS), as the local pool runs it
# (one continuous-batching engine), next to llama.cpp on the same GGUF file
# and the same prompt token ids in the same run: tokens/s per sequence and
# in total for 1, 2, 4, 8, 16 concurrent generations, time to first token
# under load, RSS; llama.cpp both serving the requests one after another
# and decoding them batched (its own multi-sequence decoding, as its
# server's parallel slots run it); then the issue's targets as ratios, with
# llama.cpp's own batching ratio, the bounds the weight products alone set
# on ours, and each whole step against its best.
#
#   bench/embedded.sh                                   # 128 tokens, 2 runs each
#   bench/embedded.sh --max-tokens 256 --concurrency 1,8 --runs 3
#   NO_LLAMA=1 bench/embedded.sh                        # ours only
#
# llama.cpp comes from the llama-cpp-python package (built from source,
# several minutes on 2 cores, once) in .tools/llama-venv. The Rust build is
# portable (no -C target-cpu): AVX-512 VNNI, AVX-512 or AVX2+FMA kernels
# are picked at run time (OPTIROUTE_SIMD=avx512|avx2|portable caps them, to
# compare).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/fetch-model.sh
cargo build --release --quiet -p optiroute-local-model --bin embedded-bench
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# Other work on the machine skews every figure: say how busy it was.
load() { echo "load average ($1): $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"; }
load "before ours"
# Whether the machine is busy, read before our engine loads both cores.
busy=0
awk -v n="$(nproc)" '{ exit !($1 >= n) }' /proc/loadavg && busy=1
# --floor: the kernels' own bound (the weight products of one step alone);
# --breakdown: where a whole decoding step's time goes (products, attention,
# the rest), on the engine's threads.
"$root/target/release/embedded-bench" --json "$out/ours.json" --floor --breakdown "$@"
# One generation alone on one core (the engine without its helper): what
# the batching ratio would read if a lone generation did not use both.
# The caller's options, then these (embedded-bench keeps an option's last
# value).
"$root/target/release/embedded-bench" "$@" --json "$out/one-core.json" --threads 1 \
  --concurrency 1 --runs 3 >/dev/null
if [[ -n "${NO_LLAMA:-}" ]]; then
  python3 bench/embedded_compare.py "$out/ours.json" --one-core "$out/one-core.json"
  exit 0
fi
venv="$root/.tools/llama-venv"
if ! "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null; then
  echo "installing llama-cpp-python 0.3.36 into $venv (builds llama.cpp from source)..." >&2
  python3 -m venv "$venv"
  # The default (-march=native) build crashed here in every batched
  # llama_decode (the CPU reports AMX); without AMX it runs. Set
  # LLAMA_CMAKE_ARGS for a CPU without AVX-512 (e.g. "-DGGML_NATIVE=ON").
  CMAKE_ARGS="${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF}" \
    "$venv/bin/pip" install --quiet --no-cache-dir llama-cpp-python==0.3.36
fi
# The same prompts, token limit and concurrency list as above.
conc="1,2,4,8,16"
runs=2
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [[ "${args[i]}" == "--concurrency" ]] && conc="${args[i + 1]}"
  [[ "${args[i]}" == "--runs" ]] && runs="${args[i + 1]}"
done
load "before llama.cpp"
# ggml's OpenMP threads spin at every barrier: on an idle machine that is
# its fastest setting (two-thread decode 95 tokens/s here, 27 with passive
# waits), on a busy one (another build running) it fell to ~1.4 tokens/s,
# ~10 with passive waits. So: active unless the machine was already busy
# before our run (1-minute load average at or above the core count; read
# then, as our own run raises it); OMP_WAIT_POLICY overrides.
if [[ -z "${OMP_WAIT_POLICY:-}" ]]; then
  if ((busy)); then
    OMP_WAIT_POLICY=passive
  else
    OMP_WAIT_POLICY=active
  fi
fi
echo "llama.cpp with OMP_WAIT_POLICY=$OMP_WAIT_POLICY"
OMP_WAIT_POLICY="$OMP_WAIT_POLICY" \
  "$venv/bin/python" bench/llama_cpp_bench.py --model "$root/models/SmolLM2-135M-Instruct.Q4_1.gguf" \
  --ours "$out/ours.json" --concurrency "$conc" --runs "$runs" --json "$out/llama.json"
python3 bench/embedded_compare.py "$out/ours.json" "$out/llama.json" --one-core "$out/one-core.json"
