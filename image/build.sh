#!/usr/bin/env bash
# Build a Lastmile SD-card image for Raspberry Pi 3/4 (arm64) from Debian's archive.
#
#   sudo image/build.sh OUT.img            (root: debootstrap, chroot; 20-45 min the first time on
#                                           2 cores, ~4 min with the cache warm: image/README.md)
#
# Layout (MBR, disk identifier 0x4c4d4731 "LMG1", so the Pi 3 boot ROM reads it too and RAUC names
# the slots by PARTUUID 4c4d4731-0N on the SD card and on qemu's virtio disk alike):
#   (gap)                      sectors 0x400 and 0x600: the A/B slot state, two raw copies (rauc/boot.cmd)
#   p1  LM-BOOT  vfat  256 MB  /boot/firmware: Pi firmware, U-Boot (config.txt kernel=u-boot.bin),
#                               boot.scr (image/rauc/boot.cmd: slot choice + boot counting),
#                               DTBs, config.txt, cmdline.txt, and the
#                               clinic's lastmile/ folder (lastmile.toml, certs/) -- provisioning
#   p2  LM-ROOT  ext4  SLOT_MB root slot A: / read-only; the initramfs puts a tmpfs overlay on top
#                               (image/files/overlay-root), so a power cut cannot corrupt it.
#                               `lastmile.overlay=0` on the kernel command line boots it writable.
#                               Its /vmlinuz and /initrd.img are what U-Boot boots (an update
#                               replaces kernel and root together).
#   p3  (none)   -     SLOT_MB root slot B: empty until the first update (RAUC writes the other slot)
#   p4  LM-DATA  ext4  DATA_MB /var/lib/lastmile: outbox, clinic state, RAUC's status; noatime,commit=60;
#                               grown to the card's end at boot (files/lastmile-grow-data + x-systemd.growfs)
# journald: volatile (RAM), at most 24 MB. Services: lastmile-acquire, -ble, -forward, -console, -metrics
# (every unit in systemd/), lastmile-provision (copies /boot/firmware/lastmile/* to /etc/lastmile at each
# boot), lastmile-network (Wi-Fi/4G from lastmile/network.toml), NetworkManager + ModemManager,
# chrony (with gpsd as its reference clock), gpsd, bluetooth, CUPS; systemd feeds the watchdog.
#
# No loop mounts: the partitions are made as files (mkfs.vfat -C + mcopy, mkfs.ext4 -d) and
# written into an sfdisk-made image with dd conv=notrunc. arm64 code runs under qemu-user-static
# through binfmt_misc. The debootstrapped tree, the kernel tree and the initramfs are cached (keys:
# package lists; the initramfs's inputs), so a rebuild after a code change takes a few minutes.
#
# Environment: DATA_MB (default 256), SLOT_MB (default: the root's size + 50 % for later releases),
# SUITE (bookworm), MIRROR, LASTMILE_IMAGE_CACHE.
# RAUC_KEYRING: the county's update CA, installed as the gateway's keyring; with none given, a
# throwaway test PKI beside OUT (make-test-pki) -- not for clinics.
# LASTMILE_BUNDLE=OUT.raucb also makes a signed RAUC update bundle of this root (docs/updates.md),
# signed with RAUC_CERT/RAUC_KEY and checked against RAUC_KEYRING.
set -euo pipefail

OUT=${1:?usage: image/build.sh OUT.img}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
DATA_MB=${DATA_MB:-256}
BOOT_MB=256
CACHE=${LASTMILE_IMAGE_CACHE:-$HOME/.cache/lastmile-image}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
PACKAGES=systemd,systemd-sysv,udev,dbus,kmod,iproute2,procps,ca-certificates,python3,python3-venv,initramfs-tools,zstd,bluez,gpsd,wpasupplicant
BOOT_PACKAGES="linux-image-arm64 raspi-firmware firmware-brcm80211 bluez-firmware"
# The clinic's own services on top of the kernel tree (cached as their own stage, so a change here
# reuses the debootstrap, kernel and initramfs caches: none of these touch the initramfs):
#   printing   cups-daemon cups-client cups-filters cups-server-common: the scheduler, `lp`, and the
#              filters (pdftopdf, texttopdf, ghostscript) that turn a PDF or UTF-8 text into what a
#              USB printer takes; fonts-noto-cjk + fontconfig: the report's Chinese glyphs;
#              fonts-wqy-microhei: texttopdf cannot use Noto CJK (CFF in a .ttc: "Bad TTC subfont
#              number", the Chinese printed as empty boxes): it lays out a text report in this
#              TrueType CJK font (files/fonts-zh-cn.conf)
#   time       chrony with gpsd's clock (the base tree has no systemd-timesyncd: one time daemon,
#              not one installed and then removed by apt because both provide time-daemon)
#   links      network-manager + modemmanager (+ usb-modeswitch for 4G sticks that first show up
#              as a CD-ROM, wireless-regdb for the Wi-Fi regulatory domain): image/README.md
EXTRA_PACKAGES="cups-daemon cups-client cups-filters cups-server-common fontconfig fonts-noto-cjk fonts-wqy-microhei chrony network-manager modemmanager usb-modeswitch wireless-regdb"
# A/B updates, their own stage on top of the extras: rauc + rauc-service (the D-Bus service `rauc
# install` talks to), libubootenv-tool (fw_setenv/fw_printenv: RAUC's uboot backend), u-boot-rpi
# (rpi_arm64/u-boot.bin, which the Pi firmware starts as config.txt's kernel=)
AB_PACKAGES="rauc rauc-service libubootenv-tool u-boot-rpi"
DISK_ID=0x4c4d4731
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, chroot)" >&2; exit 1; }
for tool in debootstrap qemu-aarch64-static mkfs.vfat mcopy mkfs.ext4 sfdisk e2fsck fsck.vfat mkimage mkenvimage; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install debootstrap qemu-user-static dosfstools mtools e2fsprogs fdisk u-boot-tools)" >&2; exit 1; }
done

# arm64 binaries run through qemu: binfmt_misc must be mounted and qemu-aarch64 registered.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  /usr/lib/systemd/systemd-binfmt /usr/lib/binfmt.d/qemu-aarch64.conf
fi

# -- 1. the Debian tree (cached; key: suite, mirror, packages) -------------------------------------
KEY=$(printf '%s\n' "$SUITE" "$MIRROR" "$PACKAGES" | sha256sum | cut -c1-16)
BASE=$CACHE/rootfs-$SUITE-arm64-$KEY
mkdir -p "$CACHE"
if [ ! -e "$BASE/.complete" ]; then
  say "debootstrap $SUITE arm64 (first time: several minutes; log $CACHE/debootstrap-$KEY.log)"
  rm -rf "$BASE.building"
  debootstrap --arch=arm64 --variant=minbase --components=main,non-free-firmware \
    --include="$PACKAGES" "$SUITE" "$BASE.building" "$MIRROR" > "$CACHE/debootstrap-$KEY.log" 2>&1 \
    || { tail -30 "$CACHE/debootstrap-$KEY.log" >&2; exit 1; }
  rm -rf "$BASE.building/var/cache/apt/archives"/*.deb
  date > "$BASE.building/.complete"
  rm -rf "$BASE"; mv "$BASE.building" "$BASE"
fi
say "base tree: $BASE ($(du -sh "$BASE" | cut -f1))"

# -- 1b. kernel and Pi firmware packages (cached; key: base tree, boot packages).
#        No initramfs is made here (the kernel hook is held back): it depends on our initramfs
#        scripts and is made, and cached by their hash, in step 2; raspi-firmware fills
#        /boot/firmware (kernel, initrd, DTBs, config.txt) only once there is an initrd ----------
BKEY=$(cat "$BASE/.complete" - <<<"$KEY $BOOT_PACKAGES" | sha256sum | cut -c1-16)
BOOTREADY=$CACHE/rootfs-$SUITE-arm64-kernel-$BKEY
if [ ! -e "$BOOTREADY/.complete" ]; then
  LOG=$CACHE/kernel-$BKEY.log
  say "kernel and Pi firmware packages (first time: a few minutes; log $LOG)"
  rm -rf "$BOOTREADY.building"; cp -a "$BASE" "$BOOTREADY.building"
  B=$BOOTREADY.building
  mkdir -p "$B/boot/firmware"
  cp /etc/resolv.conf "$B/etc/resolv.conf"
  # run-parts skips a hook that is not executable: no mkinitramfs (minutes under qemu) here.
  chmod -x "$B/etc/kernel/postinst.d/initramfs-tools"
  mount -t proc proc "$B/proc"; mount --bind /dev "$B/dev"; mount --bind /sys "$B/sys"
  set +e
  chroot "$B" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 \
    sh -c "sed -i 's/^update_initramfs=.*/update_initramfs=no/' /etc/initramfs-tools/update-initramfs.conf &&
           apt-get update && apt-get install -y --no-install-recommends -o Dpkg::Options::=--force-confold \
             -o Dpkg::Options::=--force-confdef $BOOT_PACKAGES && apt-get clean &&
           sed -i 's/^update_initramfs=.*/update_initramfs=yes/' /etc/initramfs-tools/update-initramfs.conf" > "$LOG" 2>&1
  rc=$?
  set -e
  umount -l "$B/proc" "$B/dev" "$B/sys"
  [ $rc = 0 ] || { tail -30 "$LOG" >&2; exit 1; }
  chmod +x "$B/etc/kernel/postinst.d/initramfs-tools"
  ls "$B"/boot/vmlinuz-* >/dev/null || { echo "no kernel in /boot (see $LOG)" >&2; exit 1; }
  rm -rf "$B/var/lib/apt/lists"/*; : > "$B/etc/resolv.conf"
  date > "$B/.complete"
  rm -rf "$BOOTREADY"; mv "$B" "$BOOTREADY"
fi

# apt_stage FROM NAME KEY PACKAGES: FROM plus PACKAGES, cached as $CACHE/rootfs-$SUITE-arm64-NAME-KEY.
#   policy-rc.d: nothing starts in the chroot (cups and chrony ship init scripts); no initramfs here.
apt_stage() {
  local from=$1 name=$2 key=$3 packages=$4
  local stage=$CACHE/rootfs-$SUITE-arm64-$name-$key log=$CACHE/$name-$key.log rc
  [ ! -e "$stage/.complete" ] || return 0
  say "$name packages: $packages (first time: minutes; log $log)"
  rm -rf "$stage.building"; cp -a "$from" "$stage.building"
  local X=$stage.building
  cp /etc/resolv.conf "$X/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' > "$X/usr/sbin/policy-rc.d"; chmod 0755 "$X/usr/sbin/policy-rc.d"
  mount -t proc proc "$X/proc"; mount --bind /dev "$X/dev"; mount --bind /sys "$X/sys"
  set +e
  chroot "$X" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 \
    sh -c "sed -i 's/^update_initramfs=.*/update_initramfs=no/' /etc/initramfs-tools/update-initramfs.conf &&
           apt-get update && apt-get install -y --no-install-recommends -o Dpkg::Options::=--force-confold \
             -o Dpkg::Options::=--force-confdef $packages && apt-get clean &&
           sed -i 's/^update_initramfs=.*/update_initramfs=yes/' /etc/initramfs-tools/update-initramfs.conf" > "$log" 2>&1
  rc=$?
  set -e
  umount -l "$X/proc" "$X/dev" "$X/sys"
  [ $rc = 0 ] || { tail -30 "$log" >&2; exit 1; }
  rm -f "$X/usr/sbin/policy-rc.d"
  rm -rf "$X/var/lib/apt/lists"/*; : > "$X/etc/resolv.conf"
  date > "$X/.complete"
  rm -rf "$stage"; mv "$X" "$stage"
}

# -- 1c. the clinic's services (printing, time, links), cached; key: kernel tree, extra packages ----
XKEY=$(cat "$BOOTREADY/.complete" - <<<"$BKEY $EXTRA_PACKAGES" | sha256sum | cut -c1-16)
EXTRAS=$CACHE/rootfs-$SUITE-arm64-extras-$XKEY
apt_stage "$BOOTREADY" extras "$XKEY" "$EXTRA_PACKAGES"

# -- 1d. A/B updates (RAUC, fw_setenv, U-Boot), cached; key: extras tree, A/B packages --------------
AKEY=$(cat "$EXTRAS/.complete" - <<<"$XKEY $AB_PACKAGES" | sha256sum | cut -c1-16)
AB=$CACHE/rootfs-$SUITE-arm64-ab-$AKEY
apt_stage "$EXTRAS" ab "$AKEY" "$AB_PACKAGES"

# The county's update CA goes into the image's keyring (and checks the bundle made at the end).
if [ -z "${RAUC_KEYRING:-}" ]; then
  PKI=$(cd "$(dirname "$OUT")" && pwd)/test-pki
  [ -e "$PKI/ca.cert.pem" ] || "$HERE/rauc/make-test-pki" "$PKI" >/dev/null
  RAUC_CERT=$PKI/signing.cert.pem RAUC_KEY=$PKI/signing.key.pem RAUC_KEYRING=$PKI/ca.cert.pem
  say "WARNING: the image trusts, and a bundle is signed with, the throwaway test PKI in $PKI (not for clinics)"
fi

# -- 2. a working copy with Lastmile installed ---------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lastmile-image.XXXXXX")
trap 'for m in proc sys dev; do umount -l "$WORK/root/$m" 2>/dev/null || true; done; rm -rf "$WORK"' EXIT
ROOT=$WORK/root
cp -a "$AB" "$ROOT"
rm -f "$ROOT/.complete"
mount -t proc proc "$ROOT/proc"; mount --bind /sys "$ROOT/sys"; mount --bind /dev "$ROOT/dev"
in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

say "wheelhouse (arm64 wheels from PyPI, cached) and the Lastmile wheel"
"$PYTHON" "$HERE/wheelhouse.py" --arch arm64 "$ROOT/var/tmp/wheels" >/dev/null
say "installing Lastmile into /opt/lastmile (pip under qemu)"
in_root python3 -m venv /opt/lastmile
in_root /opt/lastmile/bin/pip install --quiet --no-index --find-links /var/tmp/wheels lastmile
rm -rf "$ROOT/var/tmp/wheels"

say "units, udev rules, service account, configuration"
# Every unit in systemd/ (acquire, ble, forward, console, metrics: each WantedBy=multi-user.target) is
# installed and enabled, so a service added there is on the next image without an edit here.
LASTMILE_UNITS=$(cd "$REPO/systemd" && echo *.service)
(cd "$REPO/systemd" && install -m 0644 $LASTMILE_UNITS "$ROOT/etc/systemd/system/")
for unit in $LASTMILE_UNITS; do
  install -D -m 0644 "$HERE/files/lastmile-start.conf" "$ROOT/etc/systemd/system/$unit.d/image-start.conf"
done
for unit in lastmile-console.service lastmile-metrics.service; do
  install -D -m 0644 "$HERE/files/lastmile-after-recording.conf" "$ROOT/etc/systemd/system/$unit.d/image-order.conf"
done
install -m 0644 "$HERE"/files/lastmile-provision.service "$HERE"/files/lastmile-root-check.service \
  "$HERE"/files/lastmile-grow-data.service "$HERE"/files/lastmile-emergency-reboot.service "$ROOT/etc/systemd/system/"
install -m 0644 "$REPO/systemd/lastmile.sysusers" "$ROOT/usr/lib/sysusers.d/lastmile.conf"
install -m 0644 "$REPO"/systemd/udev/*.rules "$ROOT/usr/lib/udev/rules.d/"
install -m 0755 "$HERE/files/lastmile-provision" "$HERE/files/lastmile-root-check" "$HERE/files/lastmile-grow-data" \
  "$ROOT/usr/local/sbin/"
# The account is baked into the read-only root, so its uid never changes between boots.
in_root systemd-sysusers
mkdir -p "$ROOT/etc/lastmile" "$ROOT/var/lib/lastmile"
in_root /opt/lastmile/bin/lastmile config defaults > "$ROOT/etc/lastmile/lastmile.toml.defaults"
# (unquoted on purpose: one word per unit)
in_root systemctl enable $LASTMILE_UNITS lastmile-provision.service lastmile-root-check.service \
  lastmile-grow-data.service lastmile-emergency-reboot.service NetworkManager.service ModemManager.service \
  chrony.service cups.socket cups.service >/dev/null
in_root systemctl enable gpsd.socket bluetooth.service >/dev/null
# NetworkManager owns every link (Ethernet, Wi-Fi, 4G): networkd would fight it over eth0.
# Village gateways often boot with no link at all: nothing here needs the network to be up at
# boot (lastmile-forward retries on its own), and wait-online would fail after 2 minutes.
in_root systemctl disable systemd-networkd.service systemd-networkd.socket systemd-networkd-wait-online.service \
  NetworkManager-wait-online.service >/dev/null 2>&1
# chrony is the only time daemon (systemd-timesyncd is not in the package list); should a
# dependency ever pull it in, it must not step the clock against chrony.
[ ! -e "$ROOT/usr/lib/systemd/system/systemd-timesyncd.service" ] \
  || in_root systemctl mask systemd-timesyncd.service >/dev/null
# Updates come as whole images and the root is a RAM overlay: apt's timers would only fill RAM
# with package lists (and wake an idle 4G link), dpkg's daily backup would go to RAM, e2scrub
# needs LVM. fstrim.timer stays: the data partition on the SD card is trimmed weekly.
in_root systemctl disable apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
  >/dev/null 2>&1

install -D -m 0644 "$HERE/files/journald.conf" "$ROOT/etc/systemd/journald.conf.d/lastmile.conf"
# Links: Ethernet by DHCP always; Wi-Fi and 4G from the boot partition's lastmile/network.toml
# (files/lastmile-network, at each boot before NetworkManager).
install -D -m 0600 "$HERE/files/ethernet.nmconnection" "$ROOT/etc/NetworkManager/system-connections/ethernet.nmconnection"
install -D -m 0644 "$HERE/files/NetworkManager.conf" "$ROOT/etc/NetworkManager/conf.d/lastmile.conf"
install -m 0644 "$HERE/files/lastmile-network.service" "$ROOT/etc/systemd/system/"
install -m 0755 "$HERE/files/lastmile-network" "$ROOT/usr/local/sbin/"
in_root systemctl enable lastmile-network.service >/dev/null
# Time: chrony disciplined by gpsd (files/chrony-gps.conf), gpsd reading its receiver without
# waiting for a client (-n), or chrony would get no samples until something asked gpsd.
install -D -m 0644 "$HERE/files/chrony-gps.conf" "$ROOT/etc/chrony/conf.d/lastmile-gps.conf"
sed -i 's/^GPSD_OPTIONS=.*/GPSD_OPTIONS="-n"/' "$ROOT/etc/default/gpsd"
grep -qx 'GPSD_OPTIONS="-n"' "$ROOT/etc/default/gpsd" || { echo "gpsd: GPSD_OPTIONS not set" >&2; exit 1; }
# The Pi's hardware watchdog (bcm2835-wdt), fed by systemd itself.
install -D -m 0644 "$HERE/files/watchdog.conf" "$ROOT/etc/systemd/system.conf.d/lastmile-watchdog.conf"
# Printing: the county's reports in Chinese.
install -D -m 0644 "$HERE/files/fonts-zh-cn.conf" "$ROOT/etc/fonts/conf.d/64-lastmile-zh-cn.conf"
install -m 0644 "$HERE/files/lastmile-printer.service" "$ROOT/etc/systemd/system/"
install -m 0755 "$HERE/files/lastmile-printer" "$ROOT/usr/local/sbin/"
install -m 0644 "$HERE/files/70-lastmile-printer.rules" "$ROOT/usr/lib/udev/rules.d/"
in_root systemctl enable lastmile-printer.service >/dev/null
# The service account prints (`lp` over CUPS's socket needs no group); its fonts are cached
# in the read-only root so fontconfig never rebuilds them into the RAM overlay.
in_root fc-cache -s >/dev/null
install -D -m 0644 "$HERE/files/network.toml.example" "$ROOT/boot/firmware/lastmile/network.toml.example"
echo lastmile > "$ROOT/etc/hostname"
install -m 0644 "$HERE/files/fstab" "$ROOT/etc/fstab"
mkdir -p "$ROOT/media/root-ro" "$ROOT/media/root-rw"  # where overlay-root puts the two layers

# A/B updates: RAUC (its D-Bus service, the gateway's system.conf, the county's CA), the slot state's
# file for fw_setenv, and the units that take an update and keep a slot that reaches READY.
install -D -m 0644 "$HERE/rauc/system.conf" "$ROOT/etc/rauc/system.conf"
install -m 0644 "$RAUC_KEYRING" "$ROOT/etc/rauc/county-ca.pem"
# libubootenv's config is written per card by fw_env (it finds the disk): the plain tools read it too
ln -sfn /run/lastmile-fw_env.config "$ROOT/etc/fw_env.config"
install -D -m 0644 "$HERE/rauc/rauc-mounts.conf" "$ROOT/etc/systemd/system/rauc.service.d/lastmile-mounts.conf"
# RAUC's fw_printenv/fw_setenv (first in PATH): libubootenv's, on the slot state's raw copies before p1
install -m 0755 "$HERE/rauc/fw_env" "$ROOT/usr/local/sbin/fw_setenv"
ln -sfn fw_setenv "$ROOT/usr/local/sbin/fw_printenv"
install -m 0755 "$HERE/rauc/lastmile-mark-good" "$ROOT/usr/local/sbin/"
install -m 0644 "$HERE/rauc/lastmile-update.service" "$HERE/rauc/lastmile-update.timer" \
  "$HERE/rauc/lastmile-mark-good.service" "$ROOT/etc/systemd/system/"
in_root systemctl enable lastmile-update.timer lastmile-mark-good.service >/dev/null
# upstream's own mark-good (at boot-complete, whatever the services do) would defeat the check above
[ ! -e "$ROOT/usr/lib/systemd/system/rauc-mark-good.service" ] || in_root systemctl mask rauc-mark-good.service >/dev/null
[ -e "$ROOT/usr/lib/u-boot/rpi_arm64/u-boot.bin" ] || { echo "no rpi_arm64 U-Boot in the tree" >&2; exit 1; }

# The initramfs is made here, not with the kernel: it depends on our script, and mkinitramfs
# under qemu takes minutes, so it is cached by its inputs (kernel tree + our files). Once it is
# in /boot, raspi-firmware's hook copies kernel, initrd and DTBs to /boot/firmware and writes
# config.txt (with files/raspi-firmware-custom appended).
say "initramfs with the overlay root"
echo 'ROOTPART=LABEL=LM-ROOT' > "$ROOT/etc/default/raspi-firmware"
install -m 0644 "$HERE/files/raspi-firmware-custom" "$ROOT/etc/default/raspi-firmware-custom"
install -m 0755 "$HERE/files/overlay-root" "$ROOT/etc/initramfs-tools/scripts/local-bottom/overlay-root"
grep -qx overlay "$ROOT/etc/initramfs-tools/modules" || echo overlay >> "$ROOT/etc/initramfs-tools/modules"
KVER=$(ls "$ROOT/lib/modules")
IKEY=$(cat "$BOOTREADY/.complete" "$HERE/files/overlay-root" "$ROOT/etc/fstab" "$ROOT/etc/initramfs-tools/modules" \
  - <<<"$BKEY $KVER" | sha256sum | cut -c1-16)
INITRD_CACHE=$CACHE/initrd-$IKEY
if [ ! -e "$INITRD_CACHE/.complete" ]; then
  say "mkinitramfs $KVER under qemu (first time after a change of the overlay script: minutes; log $CACHE/initrd-$IKEY.log)"
  in_root update-initramfs -c -k "$KVER" > "$CACHE/initrd-$IKEY.log" 2>&1 || { tail -30 "$CACHE/initrd-$IKEY.log" >&2; exit 1; }
  # The overlay script may use only what the initramfs has (it has no busybox): ask the
  # initramfs's own shell for every external command the script calls.
  rm -rf "$ROOT/var/tmp/initrd"
  in_root unmkinitramfs "/boot/initrd.img-$KVER" /var/tmp/initrd
  IROOT=$ROOT/var/tmp/initrd; [ -d "$IROOT/main" ] && IROOT=$IROOT/main
  [ -x "$IROOT/scripts/local-bottom/overlay-root" ] || { echo "overlay-root is not in the initramfs" >&2; exit 1; }
  [ -n "$(find "$IROOT/" -name 'overlay.ko*' -path '*/fs/overlayfs/*')" ] || { echo "no overlay.ko in the initramfs" >&2; exit 1; }
  # (no /dev in the extracted tree: nothing may be redirected to /dev/null there)
  chroot "$IROOT" /bin/sh -c 'PATH=/sbin:/usr/sbin:/bin:/usr/bin; for c in mount umount mkdir modprobe; do
      command -v "$c" || { echo "the initramfs has no $c: image/files/overlay-root cannot run"; exit 1; }; done' \
    > "$CACHE/initrd-$IKEY.commands" || { cat "$CACHE/initrd-$IKEY.commands" >&2; exit 1; }
  rm -rf "$ROOT/var/tmp/initrd" "$INITRD_CACHE.building"; mkdir -p "$INITRD_CACHE.building"
  cp "$ROOT/boot/initrd.img-$KVER" "$INITRD_CACHE.building/"
  date > "$INITRD_CACHE.building/.complete"
  rm -rf "$INITRD_CACHE"; mv "$INITRD_CACHE.building" "$INITRD_CACHE"
else
  cp "$INITRD_CACHE/initrd.img-$KVER" "$ROOT/boot/"
  mkdir -p "$ROOT/var/lib/initramfs-tools"
  (cd "$ROOT" && sha1sum "boot/initrd.img-$KVER" | sed 's| boot/| /boot/|') > "$ROOT/var/lib/initramfs-tools/$KVER"
  # What update-initramfs would have run: raspi-firmware copies the initrd to /boot/firmware.
  in_root /etc/initramfs/post-update.d/z50-raspi-firmware "$KVER" "/boot/initrd.img-$KVER"
fi

say "boot partition files"
# raspi-firmware's hooks copied kernel, initrd and DTBs to /boot/firmware and wrote config.txt
# (plus files/raspi-firmware-custom); the command line is ours: read-only root, by label.
install -m 0644 "$HERE/files/cmdline.txt" "$ROOT/boot/firmware/cmdline.txt"
# The Pi firmware starts U-Boot, not Linux: U-Boot runs boot.scr (slot choice, boot counting) and boots
# the chosen slot's /vmlinuz + /initrd.img. The kernel and initrd raspi-firmware copied to p1 stay
# (the tests' direct-kernel boot uses them); the firmware no longer loads them.
sed -i -e 's/^kernel=.*/kernel=u-boot.bin/' \
  -e 's/^initramfs .*/# (no initramfs here: U-Boot loads the slot'"'"'s own, image\/rauc\/boot.cmd)/' "$ROOT/boot/firmware/config.txt"
grep -qx 'kernel=u-boot.bin' "$ROOT/boot/firmware/config.txt" || { echo "config.txt: no kernel= line to replace" >&2; exit 1; }
install -m 0644 "$ROOT/usr/lib/u-boot/rpi_arm64/u-boot.bin" "$ROOT/boot/firmware/u-boot.bin"
mkimage -A arm64 -O linux -T script -C none -n "Lastmile A/B" -d "$HERE/rauc/boot.cmd" "$ROOT/boot/firmware/boot.scr" >/dev/null
mkdir -p "$ROOT/boot/firmware/lastmile/certs"
install -m 0644 "$HERE/files/README-clinic.txt" "$ROOT/boot/firmware/lastmile/README.txt"

say "smoke test under qemu-user: lastmile --version, lastmile doctor --offline"
in_root /opt/lastmile/bin/lastmile --version
mkdir -p "$ROOT/var/tmp/doctor-check"
# Informational (no systemd, no devices in a chroot): prints each line; a FAIL does not stop the build.
in_root /opt/lastmile/bin/lastmile doctor --offline --data-dir /var/tmp/doctor-check || true
rm -rf "$ROOT/var/tmp/doctor-check"

for m in proc sys dev; do umount -l "$ROOT/$m"; done
rm -rf "$ROOT/var/cache/apt/archives"/*.deb "$ROOT/var/lib/apt/lists"/* "$ROOT/tmp"/* "$ROOT/var/tmp"/*

# -- 3. partitions as files, then the image ------------------------------------------------------
say "partitions"
mv "$ROOT/boot/firmware" "$WORK/bootfs"; mkdir "$ROOT/boot/firmware"
ROOT_MB=$(( $(du -sm "$ROOT" | cut -f1) * 120 / 100 + 64 ))
# both slots the same size, with room for a later release's bigger root (a bundle's ext4 image
# must fit the slot it is written to)
SLOT_MB=${SLOT_MB:-$(( ROOT_MB * 3 / 2 ))}
[ "$SLOT_MB" -ge "$ROOT_MB" ] || { echo "SLOT_MB=$SLOT_MB is smaller than the root ($ROOT_MB MB)" >&2; exit 1; }
rm -f "$WORK/boot.vfat"
mkfs.vfat -C -n LM-BOOT -F 32 "$WORK/boot.vfat" $(( BOOT_MB * 1024 )) >/dev/null
(cd "$WORK/bootfs" && mcopy -s -i "$WORK/boot.vfat" ./* ::/)
mkfs.ext4 -q -L LM-ROOT -d "$ROOT" -E root_owner=0:0 "$WORK/root.ext4" "${ROOT_MB}M"
DATA_TREE=$WORK/data; mkdir -p "$DATA_TREE"
# RAUC's status (system.conf data-directory): root's, beside the service account's outbox
install -d -m 0700 "$DATA_TREE/rauc"
LM_UID=$(awk -F: '$1=="lastmile"{print $3}' "$ROOT/etc/passwd"); LM_GID=$(awk -F: '$1=="lastmile"{print $4}' "$ROOT/etc/passwd")
# -T default: mke2fs would pick its "small" profile for DATA_MB (1 KiB blocks, an inode per 4 KiB),
# and growing keeps both: on a 32 GB card that was 6 % of it in inode tables (the boot test saw it).
mkfs.ext4 -q -T default -L LM-DATA -d "$DATA_TREE" -E root_owner="$LM_UID:$LM_GID" "$WORK/data.ext4" "${DATA_MB}M"

say "image $OUT"
START=2048  # sectors: 1 MiB alignment
BOOT_S=$(( BOOT_MB * 2048 )); SLOT_S=$(( SLOT_MB * 2048 )); DATA_S=$(( DATA_MB * 2048 ))
SLOT_A=$(( START + BOOT_S )); SLOT_B=$(( SLOT_A + SLOT_S )); DATA_START=$(( SLOT_B + SLOT_S ))
TOTAL_S=$(( DATA_START + DATA_S + 2048 ))
rm -f "$OUT"; truncate -s $(( TOTAL_S * 512 )) "$OUT"
sfdisk --quiet "$OUT" <<PART
label: dos
label-id: $DISK_ID
start=$START, size=$BOOT_S, type=c, bootable
start=$SLOT_A, size=$SLOT_S, type=83
start=$SLOT_B, size=$SLOT_S, type=83
start=$DATA_START, size=$DATA_S, type=83
PART
dd if="$WORK/boot.vfat" of="$OUT" bs=1M seek=$(( START / 2048 )) conv=notrunc status=none
dd if="$WORK/root.ext4" of="$OUT" bs=1M seek=$(( SLOT_A / 2048 )) conv=notrunc,sparse status=none
dd if="$WORK/data.ext4" of="$OUT" bs=1M seek=$(( DATA_START / 2048 )) conv=notrunc status=none
# The slot state (image/rauc/boot.cmd, image/rauc/fw_env) in both raw copies before p1 (sectors 0x400
# and 0x600), U-Boot's redundant format (mkenvimage -r: flag 1): slot A first with a proven slot's
# tries (rauc/system.conf boot-attempts: this root is the one the tests booted), none for the empty B.
printf 'BOOT_ORDER=A B\nBOOT_A_LEFT=9\nBOOT_B_LEFT=0\n' | mkenvimage -r -s 0x4000 -o "$WORK/ab.env" -
for sector in $(( 0x400 )) $(( 0x600 )); do
  dd if="$WORK/ab.env" of="$OUT" bs=512 seek=$sector conv=notrunc status=none
done

say "fsck of each partition"
fsck.vfat -n "$WORK/boot.vfat" >/dev/null
e2fsck -fn "$WORK/root.ext4" >/dev/null
e2fsck -fn "$WORK/data.ext4" >/dev/null

if [ -n "${LASTMILE_BUNDLE:-}" ]; then
  VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml")+$(date -u +%Y%m%dT%H%MZ)
  say "update bundle $LASTMILE_BUNDLE (version $VERSION)"
  "$HERE/rauc/make-bundle" "$WORK/root.ext4" "$VERSION" "${RAUC_CERT:?RAUC_CERT}" "${RAUC_KEY:?RAUC_KEY}" \
    "$RAUC_KEYRING" "$LASTMILE_BUNDLE"
fi
say "done: $OUT ($(( TOTAL_S / 2048 )) MB: boot $BOOT_MB, root slots 2 x $SLOT_MB (root $ROOT_MB), data $DATA_MB)"
