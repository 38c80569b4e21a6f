#!/usr/bin/env bash
# Sets up skate and runs the whole test suite: unit and integration tests, then the
# property tests (Hypothesis, fault injection; the bounded `ci` profile).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q tests property_tests "$@"
