#!/usr/bin/env bash
# Python tools the tests use, in a project-local venv (.tools/venv):
# the official `openai` client for the OpenAI-compatibility test.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.tools/venv"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import openai' 2>/dev/null; then exit 0; fi
py="$(command -v python3 || command -v python)"
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'openai>=1.40,<3' >&2
