"""System test: the SD-card image for Raspberry Pi 3/4 (arm64).

    LASTMILE_IMAGE=/path/to/lastmile.img scripts/test.sh -m slow tests/system/test_image.py
    (without LASTMILE_IMAGE it builds one with image/build.sh: ~15 min the first time, a few
    minutes with the Debian tree cached)

Checks the partition table, fsck of every partition (no loop mounts: partitions are cut out with
dd and read with mtools/debugfs), the enabled units and the wear-relevant settings in the root
filesystem, then runs `lastmile --version` and `lastmile doctor --offline` from the extracted root
under qemu-user (chroot + binfmt_misc), and lists the initramfs (overlay-root script, SD drivers).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest

from tests.conftest import REPO, missing, require_tool

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def partitions(image: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_tool("sfdisk")
    table = json.loads(
        subprocess.run(["sfdisk", "--json", str(image)], check=True, capture_output=True, text=True).stdout
    )["partitiontable"]
    assert table["label"] == "dos"  # the Pi 3 boot ROM reads MBR only
    assert table["id"] == "0x4c4d4731"  # system.conf names the slots by PARTUUID 4c4d4731-0N
    parts = table["partitions"]
    assert [p["type"] for p in parts] == ["c", "83", "83", "83"]
    assert parts[0].get("bootable") is True
    assert parts[1]["size"] == parts[2]["size"]  # root slots A and B: either takes the other's bundle
    out = tmp_path_factory.mktemp("parts")
    files = {}
    for name, p in zip(("boot", "root", "slot_b", "data"), parts):
        files[name] = out / f"{name}.img"
        subprocess.run(
            [
                "dd",
                f"if={image}",
                f"of={files[name]}",
                "bs=512",
                f"skip={p['start']}",
                f"count={p['size']}",
                "status=none",
            ],
            check=True,
        )
    return files


def debugfs(fs: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(fs)], check=True, capture_output=True, text=True).stdout


def test_every_partition_passes_fsck(partitions: dict[str, Path]) -> None:
    require_tool("fsck.vfat")
    subprocess.run(["fsck.vfat", "-n", str(partitions["boot"])], check=True, capture_output=True)
    for name in ("root", "data"):
        subprocess.run(["e2fsck", "-fn", str(partitions[name])], check=True, capture_output=True)
    labels = {
        name: subprocess.run(
            ["e2label", str(partitions[name])], check=True, capture_output=True, text=True
        ).stdout.strip()
        for name in ("root", "data")
    }
    assert labels == {"root": "LM-ROOT", "data": "LM-DATA"}


def test_data_filesystem_is_made_to_be_grown(partitions: dict[str, Path]) -> None:
    """It grows to the card at boot keeping its block size and inodes per byte: mke2fs's "small"
    profile (1 KiB blocks, an inode per 4 KiB) would put 6 % of a 32 GB card in inode tables."""
    header = subprocess.run(
        ["dumpe2fs", "-h", str(partitions["data"])], check=True, capture_output=True, text=True
    ).stdout
    fields = dict(line.split(":", 1) for line in header.splitlines() if ":" in line)
    blocks, block_size, inodes = (int(fields[k]) for k in ("Block count", "Block size", "Inode count"))
    assert block_size == 4096
    assert blocks * block_size // inodes >= 16384
    assert int(fields["Reserved GDT blocks"]) > 0  # online growth (x-systemd.growfs) needs them


def test_boot_partition_boots_a_read_only_root(image: Path, partitions: dict[str, Path], tmp_path: Path) -> None:
    require_tool("mcopy")
    listing = subprocess.run(
        ["mdir", "-b", "-i", str(partitions["boot"]), "::/"], check=True, capture_output=True, text=True
    ).stdout
    for name in ("config.txt", "cmdline.txt", "lastmile", "u-boot.bin", "boot.scr"):
        assert f"::/{name}" in listing, listing
    # the slot state is not a file on the FAT (that is how fw_env tells a card made before it)
    assert "lastmile-ab.env" not in listing, listing
    assert any("bcm2711-rpi-4-b.dtb" in ln for ln in listing.splitlines()), "no Pi 4 device tree"
    assert any("bcm2837-rpi-3-b" in ln for ln in listing.splitlines()), "no Pi 3 device tree"
    subprocess.run(
        ["mcopy", "-i", str(partitions["boot"]), "::/cmdline.txt", str(tmp_path / "cmdline.txt")], check=True
    )
    cmdline = (tmp_path / "cmdline.txt").read_text().split()
    assert "root=PARTUUID=4c4d4731-02" in cmdline and "ro" in cmdline  # U-Boot puts the chosen slot's
    subprocess.run(["mcopy", "-i", str(partitions["boot"]), "::/config.txt", str(tmp_path / "config.txt")], check=True)
    config = (tmp_path / "config.txt").read_text().splitlines()
    assert "kernel=u-boot.bin" in config and not [ln for ln in config if ln.startswith("initramfs ")]
    # the slot state: both raw copies before p1 (image/rauc/boot.cmd), each whole, as libubootenv reads them
    (tmp_path / "fw_env.config").write_text(f"{image} 0x80000 0x4000\n{image} 0xC0000 0x4000\n")
    with image.open("rb") as card:
        for sector in (0x400, 0x600):
            card.seek(sector * 512)
            copy = card.read(0x4000)
            assert int.from_bytes(copy[:4], "little") == zlib.crc32(copy[5:]) and copy[4] == 1, sector
    state = subprocess.run(
        ["fw_printenv", "-c", str(tmp_path / "fw_env.config")], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    assert sorted(state) == ["BOOT_A_LEFT=9", "BOOT_B_LEFT=0", "BOOT_ORDER=A B"]  # slot B is empty


def test_root_slot_has_rauc_and_boots_its_own_kernel(partitions: dict[str, Path]) -> None:
    root = partitions["root"]
    assert "bootloader=uboot" in debugfs(root, "cat /etc/rauc/system.conf")
    assert "BEGIN CERTIFICATE" in debugfs(root, "cat /etc/rauc/county-ca.pem")
    # RAUC's fw_printenv/fw_setenv: image/rauc/fw_env under both names, ahead of libubootenv's in PATH
    assert debugfs(root, "cat /usr/local/sbin/fw_setenv") == (REPO / "image" / "rauc" / "fw_env").read_text()
    assert "fw_setenv" in debugfs(root, "stat /usr/local/sbin/fw_printenv")  # the symlink's target
    assert "/run/lastmile-fw_env.config" in debugfs(root, "stat /etc/fw_env.config")
    assert "lastmile-mark-good.service" in debugfs(root, "ls -l /etc/systemd/system/multi-user.target.wants")
    assert "lastmile-update.timer" in debugfs(root, "ls -l /etc/systemd/system/timers.target.wants")
    # boot.cmd loads /vmlinuz and /initrd.img from the slot: an update brings its own kernel
    listing = debugfs(root, "ls -l /")
    assert "vmlinuz" in listing and "initrd.img" in listing


def test_root_filesystem_has_the_units_enabled_and_spares_the_card(partitions: dict[str, Path]) -> None:
    root = partitions["root"]
    wants = debugfs(root, "ls -l /etc/systemd/system/multi-user.target.wants")
    for unit in (
        "lastmile-acquire.service",
        "lastmile-ble.service",
        "lastmile-forward.service",
        "lastmile-console.service",
        "lastmile-metrics.service",
        "lastmile-provision.service",
    ):
        assert unit in wants, wants
    assert "lastmile-root-check.service" in debugfs(root, "ls -l /etc/systemd/system/sysinit.target.wants")
    assert "lastmile-grow-data.service" in debugfs(root, "ls -l /etc/systemd/system/local-fs.target.wants")
    assert "TimeoutStartSec=300" in debugfs(root, "cat /etc/systemd/system/lastmile-console.service.d/image-start.conf")
    # No network at boot is normal for a village gateway: nothing waits for it.
    assert "wait-online" not in debugfs(root, "ls -l /etc/systemd/system/network-online.target.wants")
    timers = debugfs(root, "ls -l /etc/systemd/system/timers.target.wants")
    assert "fstrim.timer" in timers  # the data partition is trimmed weekly
    for pointless_on_a_ram_root in (
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "dpkg-db-backup.timer",
        "e2scrub_all.timer",
    ):
        assert pointless_on_a_ram_root not in timers
    fstab = debugfs(root, "cat /etc/fstab")
    data_line = next(ln for ln in fstab.splitlines() if ln.startswith("LABEL=LM-DATA"))  # not a comment naming it
    assert "/var/lib/lastmile" in data_line and "noatime" in data_line and "commit=60" in data_line
    boot_line = next(ln for ln in fstab.splitlines() if ln.startswith("LABEL=LM-BOOT"))
    assert boot_line.split()[3].split(",")[0] == "ro"  # the FAT the firmware boots from is never written
    entries = [ln.split() for ln in fstab.splitlines() if ln.strip() and not ln.startswith("#")]
    assert "/" not in [e[1] for e in entries]  # systemd-remount-fs would remount the overlay
    assert "Storage=volatile" in debugfs(root, "cat /etc/systemd/journald.conf.d/lastmile.conf")
    assert "overlay" in debugfs(root, "ls /etc/initramfs-tools/scripts/local-bottom")
    assert "lastmile:x:" in debugfs(root, "cat /etc/passwd")
    assert "dialout" in debugfs(root, "cat /usr/lib/udev/rules.d/70-lastmile.rules")


def test_lastmile_runs_under_qemu_user(partitions: dict[str, Path], tmp_path: Path) -> None:
    if os.geteuid() != 0:
        missing("chroot needs root")
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        missing("qemu-aarch64 is not registered with binfmt_misc (image/build.sh registers it)")
    tree = tmp_path / "root"
    tree.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {tree}", str(partitions["root"])], check=True, capture_output=True)
    env = ["/usr/bin/env", "-i", "PATH=/usr/bin:/bin", "LANG=C.UTF-8"]
    try:
        version = subprocess.run(
            ["chroot", str(tree), *env, "/opt/lastmile/bin/lastmile", "--version"],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        ).stdout
        assert version.startswith("lastmile ")
        doctor = subprocess.run(
            [
                "chroot",
                str(tree),
                *env,
                "/opt/lastmile/bin/lastmile",
                "doctor",
                "--offline",
                "--json",
                "--data-dir",
                "/var/lib/lastmile",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        findings = json.loads(doctor.stdout)["findings"]
        assert {f["check"] for f in findings} >= {"config", "data", "clock", "queue"}
        assert not [f for f in findings if f["level"] == "FAIL"], doctor.stdout
        # The initramfs carries the overlay-root script and what mounts an SD-card root.
        initrd = sorted((tree / "boot").glob("initrd.img-*"))[-1].name
        listing = subprocess.run(
            [
                "chroot",
                str(tree),
                "/usr/bin/env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "lsinitramfs",
                f"/boot/{initrd}",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        ).stdout
        for needed in (
            "scripts/local-bottom/overlay-root",
            "overlay.ko",
            "ext4.ko",
            "sdhci-iproc.ko",
            "mmc/host/bcm2835.ko",
        ):
            assert needed in listing, needed
    finally:
        shutil.rmtree(tree, ignore_errors=True)
