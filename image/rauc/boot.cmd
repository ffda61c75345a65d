# Lastmile A/B boot: which root slot boots, and how many tries each has left (U-Boot script;
# `mkimage -A arm64 -T script -C none -d boot.cmd boot.scr`, image/build.sh does it).
#
# The same script runs under the Pi's U-Boot (u-boot-rpi: rpi_arm64, loaded by the Pi firmware
# as config.txt's kernel=) and under qemu's (u-boot-qemu: qemu_arm64, -M virt -bios): U-Boot's
# distro boot finds it on the bootable partition 1 and sets devtype/devnum/distro_bootpart (mmc 0 /
# virtio 0).
#
# Slot state (RAUC's names): BOOT_ORDER ("A B": try A first), BOOT_A_LEFT / BOOT_B_LEFT (tries
# left). Each boot takes one try from the first slot in BOOT_ORDER that has any and saves that
# before the kernel runs; a Linux that comes up healthy gives the tries back (`rauc status
# mark-good`, lastmile-mark-good.service). A new slot that never gets there (panic, hang ->
# watchdog, emergency mode -> reboot) uses up its tries and the next boot takes the other slot:
# the rollback. An install gives 3 tries, mark-good 9 (rauc/system.conf: a proven slot is not sent
# back by a few power cuts); setexpr counts in hex, so never more than 9.
#
# Where the state lives: two copies in raw sectors of the 1 MiB before p1 (copy 0 at sector 0x400,
# copy 1 at 0x600, 16 KiB each), in U-Boot's redundant-environment format (CRC32 of the data, a flag
# byte, the data) that libubootenv's fw_printenv/fw_setenv read and write from Linux (image/rauc/
# fw_env: RAUC's uboot backend runs them). Every write, here and there, goes to the older copy with
# the newer one's flag + 1, so a power cut during a write leaves the other copy whole: the state from
# before that write, never the defaults. Raw sectors, not a file on the FAT: no FAT table or directory
# the firmware reads is ever written. Not uboot.env either: the Pi's U-Boot (ENV_IS_IN_FAT) loads that
# file as its whole environment at start. With neither copy whole (a blank gap): A first, 3 tries each.
#
# p1 boot (vfat), p2 root slot A, p3 root slot B, p4 data. The kernel and initramfs come from the
# slot itself (/vmlinuz, /initrd.img), so an update replaces them together with the root. The
# device tree is the firmware's (Pi: fdt_addr, with config.txt's overlays) or qemu's (fdtcontroladdr).

setenv lm_state_addr ${pxefile_addr_r}
test -n "${lm_state_addr}" || setenv lm_state_addr ${kernel_addr_r}
setenv lm_ab_blk0 0x400
setenv lm_ab_blk1 0x600
setenv lm_ab_sectors 0x20
setexpr lm_ab_buf0 ${lm_state_addr} + 0
setexpr lm_ab_buf1 ${lm_state_addr} + 0x4000
# a copy without its flag byte (CRC, data), the layout env import/export -c know
setexpr lm_ab_work ${lm_state_addr} + 0x8000
setexpr lm_ab_work_data ${lm_ab_work} + 4
# lm_ab_import: the copy at lm_ab_buf into the environment if its CRC holds (lm_ab_ok), its flag (lm_ab_flag)
setenv lm_ab_import 'setenv lm_ab_ok; cp.b ${lm_ab_buf} ${lm_ab_work} 4; setexpr lm_ab_at ${lm_ab_buf} + 5; cp.b ${lm_ab_at} ${lm_ab_work_data} 0x3ffb; setexpr lm_ab_at ${lm_ab_buf} + 4; setexpr.b lm_ab_flag *${lm_ab_at}; if env import -c ${lm_ab_work} 0x3fff BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT; then setenv lm_ab_ok 1; fi'
# lm_ab_save: the state into the copy not read (lm_ab_target, through its buffer) with flag lm_ab_next
setenv lm_ab_save 'env export -c -s 0x3fff ${lm_ab_work} BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT; cp.b ${lm_ab_work} ${lm_ab_out} 4; setexpr lm_ab_at ${lm_ab_out} + 4; mw.b ${lm_ab_at} ${lm_ab_next}; setexpr lm_ab_at ${lm_ab_out} + 5; cp.b ${lm_ab_work_data} ${lm_ab_at} 0x3ffb; ${devtype} write ${lm_ab_out} ${lm_ab_target} ${lm_ab_sectors}'

${devtype} dev ${devnum}
${devtype} read ${lm_ab_buf0} ${lm_ab_blk0} ${lm_ab_sectors}
${devtype} read ${lm_ab_buf1} ${lm_ab_blk1} ${lm_ab_sectors}
setenv lm_ab_buf ${lm_ab_buf1}
run lm_ab_import
setenv lm_ab_ok1 ${lm_ab_ok}
setenv lm_ab_flag1 ${lm_ab_flag}
setenv lm_ab_buf ${lm_ab_buf0}
run lm_ab_import
setenv lm_ab_ok0 ${lm_ab_ok}
setenv lm_ab_flag0 ${lm_ab_flag}
# The newer copy, by libubootenv's rule (uboot_env.c, incremental flags): the whole one; of two
# whole ones the greater flag, except that 0 follows 0xff. setexpr prints hex without 0x.
setenv lm_ab_cur 0
if test -n "${lm_ab_ok1}"; then
  setexpr lm_ab_diff ${lm_ab_flag1} - ${lm_ab_flag0}
  setexpr lm_ab_diff ${lm_ab_diff} / 0x100
  if test -z "${lm_ab_ok0}"; then
    setenv lm_ab_cur 1
  elif test "${lm_ab_flag0}" = "ff" && test "${lm_ab_flag1}" = "0"; then
    setenv lm_ab_cur 1
  elif test "${lm_ab_flag1}" = "ff" && test "${lm_ab_flag0}" = "0"; then
    setenv lm_ab_cur 0
  elif test "${lm_ab_diff}" = "0" && test "${lm_ab_flag1}" != "${lm_ab_flag0}"; then
    setenv lm_ab_cur 1
  fi
fi
setenv BOOT_ORDER
setenv BOOT_A_LEFT
setenv BOOT_B_LEFT
if test "${lm_ab_cur}" = "1"; then
  setenv lm_ab_buf ${lm_ab_buf1}
  setenv lm_ab_out ${lm_ab_buf0}
  setenv lm_ab_target ${lm_ab_blk0}
else
  setenv lm_ab_buf ${lm_ab_buf0}
  setenv lm_ab_out ${lm_ab_buf1}
  setenv lm_ab_target ${lm_ab_blk1}
fi
setenv lm_ab_flag 0
if test -n "${lm_ab_ok0}${lm_ab_ok1}"; then
  run lm_ab_import
else
  echo "LMBOOT no whole slot state: A first, 3 tries each"
fi
setexpr lm_ab_next ${lm_ab_flag} + 1
test -n "${BOOT_ORDER}" || setenv BOOT_ORDER "A B"
test -n "${BOOT_A_LEFT}" || setenv BOOT_A_LEFT 3
test -n "${BOOT_B_LEFT}" || setenv BOOT_B_LEFT 3
echo "LMBOOT state copy=${lm_ab_cur} flag=${lm_ab_flag} whole=${lm_ab_ok0},${lm_ab_ok1}"

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
  run lm_ab_save
  reset
fi

# The try is taken before the kernel runs: a power cut or a hang from here on counts.
run lm_ab_save

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
