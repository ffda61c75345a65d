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
                 e2fsprogs fdisk openssl librsvg2-bin prometheus
                 qemu-system-arm qemu-utils zstd  # the image's whole-machine boot test
                 chromium chromium-driver fonts-noto-cjk  # the console's browser tests (+ CJK glyphs)
                 network-manager chrony  # the image's links and clock: their configs checked by nmcli, chronyd -p
                 fonts-wqy-microhei  # the image's fontconfig rule for CUPS's texttopdf
                 rauc squashfs-tools u-boot-qemu u-boot-tools libubootenv-tool  # A/B updates: bundles, U-Boot slot script
                 dbus-daemon  # a private bus for `rauc service` in the update tests
                 tzdata)  # IANA zones: device clocks read across a DST change (the BLE tests' Europe/Berlin)
  command -v npm >/dev/null || apt_packages+=(nodejs npm)  # Lighthouse (bench/console.py)
fi
# CPU load for flake hunts (scripts/rehearse-ci.sh --load).
if [ "$mode" = "--test" ]; then
  apt_packages+=(stress-ng)
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    # Only their parsers are wanted (nmcli --offline, chronyd -p): masked first, so that on a
    # machine run by systemd neither daemon starts and takes over its network or its clock.
    if command -v systemctl >/dev/null; then
      systemctl mask NetworkManager.service NetworkManager-wait-online.service NetworkManager-dispatcher.service \
        chrony.service >/dev/null 2>&1 || true
    fi
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
extras=emulation
[ "$mode" = "--test" ] && extras=test,emulation
# pip again only when what it installs changed (scripts/test.sh runs this before every run).
stamp=.venv/.lastmile-installed
want=$(cat pyproject.toml <(echo "$extras") | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${extras}]"
  echo "$want" > "$stamp"
fi
# Lighthouse for bench/console.py and its test, in a project-local folder (.gitignored), fetched
# here, before the suite enters its private network namespace. 12.2.3: 13 wants Node 22.
lighthouse_version=12.2.3
if [ "$mode" = "--test" ] && command -v npm >/dev/null; then
  lh=.tools/lighthouse
  if ! grep -qs "\"version\": \"$lighthouse_version\"" "$lh/node_modules/lighthouse/package.json"; then
    echo "setup: installing lighthouse $lighthouse_version into $lh"
    mkdir -p "$lh"
    npm install --prefix "$lh" --no-audit --no-fund --silent --save-exact "lighthouse@$lighthouse_version" >/dev/null
  fi
fi
echo "setup: ready (.venv, extras: ${extras})"
if [ "$mode" = "--test" ]; then
  scripts/fetch-test-assets  # everything else the tests need from the network, before test.sh's unshare -n
fi
