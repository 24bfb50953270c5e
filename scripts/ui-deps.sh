#!/usr/bin/env bash
# Installs what the browser test of the web UI (e2e/tests/ui.rs, which runs
# e2e/ui/chat.test.mjs) needs, and prints nothing else on success:
#   - Chromium and its driver, from Debian (apt-get install chromium chromium-driver)
#   - Node.js, from Debian, when there is no node at all
#   - playwright-core (npm), into .tools/ui-test/ (git-ignored)
# Idempotent and quick when everything is there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="$root/.tools/ui-test"

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else echo "ui-deps: need root (or sudo) to run: $*" >&2; return 1
  fi
}

apt_updated=0
apt_install() {
  command -v apt-get >/dev/null 2>&1 || { echo "ui-deps: no apt-get; install $* by hand" >&2; return 1; }
  echo "ui-deps: installing $* (apt)" >&2
  export DEBIAN_FRONTEND=noninteractive
  if [ "$apt_updated" -eq 0 ]; then as_root apt-get update -qq >&2; apt_updated=1; fi
  as_root apt-get install -y -qq --no-install-recommends "$@" >&2
}

missing=()
# fonts-liberation is only a Recommends of chromium; without a font the page renders as boxes.
[ -x /usr/bin/chromium ] || missing+=(chromium fonts-liberation)
command -v chromedriver >/dev/null 2>&1 || [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi

if [ ! -f "$prefix/node_modules/playwright-core/package.json" ]; then
  echo "ui-deps: installing playwright-core into .tools/ui-test" >&2
  mkdir -p "$prefix"
  # playwright-core never downloads a browser; we drive Debian's Chromium.
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$prefix" --no-audit --no-fund \
    --loglevel=error playwright-core@1 >&2
fi
[ -f "$prefix/node_modules/playwright-core/package.json" ] || { echo "ui-deps: playwright-core missing after install" >&2; exit 1; }
