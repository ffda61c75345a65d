#!/usr/bin/env bash
# Lint, format and type checks (run by .ci/run before the tests; also the pre-commit hooks).
# Needs the venv from scripts/setup.sh --test (ruff and mypy are in the test extras).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
echo "lint: ruff check, ruff format --check and mypy clean"
