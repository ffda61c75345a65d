# Lastmile A/B boot: which root slot boots, and how many tries each has left (U-Boot script;
# `mkimage -A arm64 -T script -C none -d boot.cmd boot.scr`, image/build.sh does it).
#
# The same script runs under the Pi's U-Boot (u-boot-rpi: rpi_arm64, loaded by the Pi firmware
# as config.txt's kernel=) and under qemu's (u-boot-qemu: qemu_arm64, -M virt -bios): U-Boot's
# distro boot finds it on the bootable partition 1 and sets devtype/devnum/distro_bootpart (mmc 0 /
# virtio 0). The slot state is read from and written to lastmile-ab.env on the boot partition
# explicitly, the file RAUC's "uboot" backend edits from Linux with fw_setenv (image/rauc/
# fw_env.config: same file, same 16 KiB size). Not uboot.env: the Pi's U-Boot (ENV_IS_IN_FAT) loads
# that file as its whole environment at start, and one holding only these three variables would
# leave it without bootcmd.
#
# Slot state (RAUC's names): BOOT_ORDER ("A B": try A first), BOOT_A_LEFT / BOOT_B_LEFT (tries
# left). Each boot takes one try from the first slot in BOOT_ORDER that has any and saves that
# before the kernel runs; a Linux that comes up healthy gives the tries back (`rauc status
# mark-good`, lastmile-update-good.service). A new slot that never gets there (panic, hang ->
# watchdog, emergency mode -> reboot) uses up its tries and the next boot takes the other slot:
# the rollback. A torn or missing lastmile-ab.env (CRC wrong) gives the defaults: A first, 3 tries each.
#
# p1 boot (vfat), p2 root slot A, p3 root slot B, p4 data. The kernel and initramfs come from the
# slot itself (/vmlinuz, /initrd.img), so an update replaces them together with the root. The
# device tree is the firmware's (Pi: fdt_addr, with config.txt's overlays) or qemu's (fdtcontroladdr).

setenv lm_state_addr ${pxefile_addr_r}
test -n "${lm_state_addr}" || setenv lm_state_addr ${kernel_addr_r}
setenv BOOT_ORDER
setenv BOOT_A_LEFT
setenv BOOT_B_LEFT
if load ${devtype} ${devnum}:${distro_bootpart} ${lm_state_addr} lastmile-ab.env; then
  env import -c ${lm_state_addr} ${filesize} BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT
fi
test -n "${BOOT_ORDER}" || setenv BOOT_ORDER "A B"
test -n "${BOOT_A_LEFT}" || setenv BOOT_A_LEFT 3
test -n "${BOOT_B_LEFT}" || setenv BOOT_B_LEFT 3

setenv lm_slot
setenv lm_rootpart
for slot in ${BOOT_ORDER}; do
  if test -n "${lm_slot}"; then
    true
  elif test "${slot}" = "A" && test ${BOOT_A_LEFT} -gt 0; then
    setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1
    setenv lm_slot A
    setenv lm_rootpart 2
    setenv lm_left ${BOOT_A_LEFT}
  elif test "${slot}" = "B" && test ${BOOT_B_LEFT} -gt 0; then
    setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1
    setenv lm_slot B
    setenv lm_rootpart 3
    setenv lm_left ${BOOT_B_LEFT}
  fi
done

if test -z "${lm_slot}"; then
  # Both slots used up their tries (both broken, or a flickering supply during two updates'
  # first boots): start over rather than stop for good; the watchdog keeps this from spinning fast.
  echo "LMBOOT no slot has tries left: 3 each again"
  setenv BOOT_A_LEFT 3
  setenv BOOT_B_LEFT 3
  env export -c -s 0x4000 ${lm_state_addr} BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT
  fatwrite ${devtype} ${devnum}:${distro_bootpart} ${lm_state_addr} lastmile-ab.env 0x4000
  reset
fi

# The try is taken before the kernel runs: a power cut or a hang from here on counts.
env export -c -s 0x4000 ${lm_state_addr} BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT
fatwrite ${devtype} ${devnum}:${distro_bootpart} ${lm_state_addr} lastmile-ab.env 0x4000

part uuid ${devtype} ${devnum}:${lm_rootpart} lm_rootuuid
setenv lm_fdt ${fdt_addr}
test -n "${lm_fdt}" || setenv lm_fdt ${fdtcontroladdr}
# The firmware's command line (Pi: cmdline.txt, in the device tree it hands over) minus its root=;
# qemu's has none: lastmile-bootargs.txt on the boot partition (a line "lm_cmdline=...") gives it.
setenv lm_cmdline
if test -n "${fdt_addr}"; then
  fdt addr ${fdt_addr}
  fdt get value lm_cmdline /chosen bootargs
fi
if load ${devtype} ${devnum}:${distro_bootpart} ${lm_state_addr} lastmile-bootargs.txt; then
  env import -t ${lm_state_addr} ${filesize} lm_cmdline
fi
setexpr lm_cmdline gsub "root=[^ ]*" "" "${lm_cmdline}"
setenv bootargs "${lm_cmdline} root=PARTUUID=${lm_rootuuid} rauc.slot=${lm_slot}"
echo "LMBOOT slot=${lm_slot} part=${lm_rootpart} left=${lm_left} order=${BOOT_ORDER} root=PARTUUID=${lm_rootuuid}"

# Debian's arm64 /vmlinuz is gzip-compressed: booti inflates it to kernel_addr_r from a copy at
# kernel_comp_addr_r (qemu_arm64's environment names no such area: 256 MiB above the kernel's).
if load ${devtype} ${devnum}:${lm_rootpart} ${kernel_addr_r} /vmlinuz; then
  setenv kernel_comp_size ${filesize}
  test -n "${kernel_comp_addr_r}" || setexpr kernel_comp_addr_r ${kernel_addr_r} + 0x10000000
  if load ${devtype} ${devnum}:${lm_rootpart} ${ramdisk_addr_r} /initrd.img; then
    booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${lm_fdt}
  fi
fi
# A slot whose kernel cannot be loaded or started is a failed try like any other: boot again.
echo "LMBOOT slot ${lm_slot} did not start"
reset
