#!/usr/bin/env bash
# Python tools the tests use, in a project-local venv (.tools/venv):
# the official `openai` client for the OpenAI-compatibility test, and
# `nats-py` plus `msgpack` for the test that follows docs/protocol.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.tools/venv"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import openai, nats, msgpack' 2>/dev/null; then exit 0; fi
py="$(command -v python3 || command -v python)"
if [ ! -x "$venv/bin/python" ] && ! "$py" -m venv "$venv" >&2; then
  # Debian's python3 ships venv (ensurepip) as a separate package.
  rm -rf "$venv"
  echo "py-deps: python3 -m venv failed; installing Debian's python3-venv" >&2
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq >&2 && $sudo_cmd apt-get install -y -qq python3-venv >&2
  "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  'openai>=1.40,<3' 'nats-py>=2.6,<3' 'msgpack>=1.0,<2' >&2
