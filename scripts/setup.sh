#!/usr/bin/env bash
# Creates .venv (if missing) and installs skate with its test extras into it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test]'
# Byte-compile skate now: an editable install compiles nothing, and where bytecode is not
# written (PYTHONDONTWRITEBYTECODE) every import would compile skate again (~50 ms).
.venv/bin/python -m compileall -q src/skate >/dev/null
