#!/usr/bin/env bash
# Set up everything the tests need, then run them. Extra arguments go to pytest.
# As root the suite runs in a private network namespace (unshare -n, loopback only), because
# Orthanc cannot be told which address to listen on: nothing a test starts is reachable from outside.
# Nothing in there reaches the network either: setup.sh --test fetches what the tests need first
# (apt, pip, npm, the system tests' rootfs and wheels: scripts/fetch-test-assets).
set -euo pipefail
cd "$(dirname "$0")/.."
began=$SECONDS
scripts/setup.sh --test
echo "test.sh: setup and fetch took $((SECONDS - began)) s"
export PYTHONDONTWRITEBYTECODE=1
args=("$@")
# Default: every test but the slow system tests (booting a container, building the SD image);
# run those with: scripts/test.sh -m slow tests/system
[ ${#args[@]} -eq 0 ] && args=(-q -p no:cacheprovider -m "not slow")
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null; then
  exec unshare -n -- sh -c 'ip link set lo up && exec "$@"' sh .venv/bin/python -m pytest "${args[@]}"
fi
exec .venv/bin/python -m pytest "${args[@]}"
