#!/usr/bin/env bash
# Set up (if needed) and run the demo on embedded defaults. Extra arguments go to `lastmile demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/lastmile demo "$@"
