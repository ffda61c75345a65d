#!/usr/bin/env bash
# Set up a fresh Debian 12 / Raspberry Pi OS machine for Lastmile.
#   scripts/setup.sh          runtime + BLE emulation (enough for the demo)
#   scripts/setup.sh --test   also the test peers: Orthanc, dcmtk, dicom3tools, gpsd, systemd tools
# System packages are installed through apt when run as root; the Python side goes into ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}

apt_packages=(python3-venv)
if [ "$mode" = "--test" ]; then
  apt_packages+=(orthanc dcmtk dicom3tools gpsd gpsd-clients systemd systemd-container udev iproute2
                 util-linux debootstrap qemu-user-static binfmt-support dosfstools mtools
                 e2fsprogs fdisk openssl qemu-system-arm qemu-utils zstd)
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # The orthanc package starts its own daemon where systemd runs: tests start their own instance.
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now orthanc >/dev/null 2>&1 || true
  fi
elif [ "$mode" = "--test" ]; then
  echo "setup: not root: install these with apt yourself: ${apt_packages[*]}" >&2
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
extras=emulation
[ "$mode" = "--test" ] && extras=test,emulation
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${extras}]"
echo "setup: ready (.venv, extras: ${extras})"
