#!/usr/bin/env bash
# Sets up skate and runs the whole test suite (unit, integration and property tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
dirs=(tests)
if compgen -G "property_tests/test_*.py" >/dev/null; then dirs+=(property_tests); fi
exec .venv/bin/python -m pytest -q "${dirs[@]}" "$@"
