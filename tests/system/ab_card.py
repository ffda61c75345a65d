"""The A/B card in miniature, booted by real U-Boot (u-boot-qemu's qemu_arm64 under
qemu-system-aarch64 -M virt) with image/rauc/boot.cmd, its slot state read and written from "Linux"
by image/rauc/fw_env (libubootenv's tools, as RAUC's uboot backend runs them). Used by the slot
choice tests (test_ab_update) and by the power cuts during an install (tests/test_update.py)."""

from __future__ import annotations

import os
import re
import subprocess
import zlib
from pathlib import Path

from tests.conftest import REPO, missing, require_tool

RAUC_DIR = REPO / "image" / "rauc"
SYSTEM_CONF = RAUC_DIR / "system.conf"
UBOOT_QEMU = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")
SECTOR = 512
# The A/B card in miniature (sectors): what build.sh lays out, with tiny slots.
BOOT_START, BOOT_SECTORS = 2048, 80 * 2048
SLOT_SECTORS = 16 * 2048
DATA_SECTORS = 8 * 2048
DISK_ID = "4c4d4731"
ENV_SIZE = 0x4000
STATE_SECTORS = (0x400, 0x600)  # boot.cmd's lm_ab_blk0/1: the two copies of the slot state
FW_ENV = RAUC_DIR / "fw_env"
SYSTEM_CONF_TEXT = (RAUC_DIR / "system.conf").read_text()
# the tries RAUC gives a slot at install (mark-active) and at mark-good, as the image configures it
INSTALL_TRIES = re.search(r"^boot-attempts-primary=(\d)$", SYSTEM_CONF_TEXT, re.M).group(1)  # type: ignore[union-attr]
GOOD_TRIES = re.search(r"^boot-attempts=(\d)$", SYSTEM_CONF_TEXT, re.M).group(1)  # type: ignore[union-attr]
NEW_CARD = b"BOOT_ORDER=A B\nBOOT_A_LEFT=9\nBOOT_B_LEFT=0\n"  # image/build.sh's: B is empty


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check, timeout=300)


def state_copy(values: dict[str, str], flag: int) -> bytes:
    """One copy of the slot state as U-Boot's redundant environment: CRC32 of the data, flag, data."""
    data = b"".join(f"{k}={v}".encode() + b"\0" for k, v in values.items()) + b"\0"
    data = data.ljust(ENV_SIZE - 5, b"\0")
    return zlib.crc32(data).to_bytes(4, "little") + bytes([flag]) + data


class Card:
    """The A/B card in miniature, booted by real U-Boot with image/rauc/boot.cmd; its slot state read
    and written from "Linux" by image/rauc/fw_env (libubootenv's tools, as RAUC runs them)."""

    def __init__(self, work: Path, pristine: Path | None = None) -> None:
        """A new card in `work`: made here, or a copy of `pristine` (a card made before)."""
        for tool in (
            "qemu-system-aarch64",
            "mkimage",
            "mkenvimage",
            "mkfs.vfat",
            "mcopy",
            "mkfs.ext4",
            "sfdisk",
            "fw_printenv",
        ):
            require_tool(tool)
        if not UBOOT_QEMU.exists():
            missing(f"{UBOOT_QEMU} is absent (apt-get install u-boot-qemu; scripts/setup.sh --test installs it)")
        self.work = work
        self.path = work / "card.img"
        self.boots = 0
        slot_a = BOOT_START + BOOT_SECTORS
        slot_b = slot_a + SLOT_SECTORS
        data = slot_b + SLOT_SECTORS
        # fw_env as the image installs it (under both names), on this card: the boot partition's
        # mount holds no lastmile-ab.env (a card made with the state before p1)
        self.tools = work / "sbin"
        self.tools.mkdir(exist_ok=True)
        for name in ("fw_printenv", "fw_setenv"):
            (self.tools / name).unlink(missing_ok=True)
            (self.tools / name).symlink_to(FW_ENV)
        self.boot_dir = work / "boot-firmware"
        self.boot_dir.mkdir(exist_ok=True)
        self.fw_env = {
            **os.environ,
            "LASTMILE_BOOT_DIR": str(self.boot_dir),
            "LASTMILE_FW_ENV_DISK": str(self.path),
            "LASTMILE_FW_ENV_CONFIG": str(work / "fw_env.config"),
        }
        if pristine is not None:
            run("cp", "--sparse=always", pristine, self.path)
            return
        with self.path.open("wb") as card:
            card.truncate((data + DATA_SECTORS) * SECTOR)
        table = (
            f"label: dos\nlabel-id: 0x{DISK_ID}\n"
            f"start={BOOT_START}, size={BOOT_SECTORS}, type=c, bootable\n"
            f"start={slot_a}, size={SLOT_SECTORS}, type=83\n"
            f"start={slot_b}, size={SLOT_SECTORS}, type=83\n"
            f"start={data}, size={DATA_SECTORS}, type=83\n"
        )
        subprocess.run(["sfdisk", "--quiet", str(self.path)], input=table, text=True, check=True)
        script = work / "boot.scr"
        run("mkimage", "-A", "arm64", "-T", "script", "-C", "none", "-d", RAUC_DIR / "boot.cmd", script)
        boot = work / "boot.vfat"
        run("mkfs.vfat", "-C", "-n", "LM-BOOT", "-F", "32", boot, str(BOOT_SECTORS // 2))
        # what lastmile-bootargs.txt gives qemu (the Pi's firmware gives cmdline.txt instead)
        bootargs = work / "lastmile-bootargs.txt"
        bootargs.write_text("lm_cmdline=console=ttyAMA0 root=LABEL=LM-ROOT ro quiet\n")
        run("mcopy", "-i", boot, script, bootargs, "::/")
        self.write(boot, BOOT_START)
        for name, start in (("A", slot_a), ("B", slot_b)):
            tree = work / f"slot-{name}"
            (tree / "boot").mkdir(parents=True)
            (tree / "boot" / "vmlinuz-test").write_text(f"not a kernel {name}\n")
            (tree / "boot" / "initrd.img-test").write_text(f"initrd {name}\n")
            (tree / "vmlinuz").symlink_to("boot/vmlinuz-test")  # as Debian's kernel package makes them
            (tree / "initrd.img").symlink_to("boot/initrd.img-test")
            fs = work / f"slot-{name}.ext4"
            run("mkfs.ext4", "-q", "-d", tree, "-L", "LM-ROOT", fs, f"{SLOT_SECTORS // 2}K")
            self.write(fs, start)
        # the slot state as image/build.sh writes it: both copies, A first, 3 tries each (mkenvimage -r)
        state = work / "ab.env"
        subprocess.run(
            ["mkenvimage", "-r", "-s", hex(ENV_SIZE), "-o", str(state), "-"],
            input=NEW_CARD, check=True,
        )  # fmt: skip
        for copy in (0, 1):
            self.put_copy(copy, state.read_bytes())

    def write(self, part: Path, start: int) -> None:
        run("dd", f"if={part}", f"of={self.path}", "bs=512", f"seek={start}", "conv=notrunc", "status=none")

    def power_on(self) -> str:
        """One power-on until U-Boot resets (qemu -no-reboot: the process ends); the console."""
        self.boots += 1
        console = self.work / f"console-{self.boots}.log"
        with console.open("w") as out:
            subprocess.run(
                ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a72", "-m", "256", "-display", "none",
                 "-monitor", "none", "-serial", "stdio", "-nic", "none", "-no-reboot",
                 "-bios", str(UBOOT_QEMU), "-drive", f"file={self.path},if=virtio,format=raw"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=600,
            )  # fmt: skip
        return console.read_text(errors="replace")

    def boot(self) -> dict[str, str]:
        """One power-on; what boot.cmd chose (its LMBOOT line)."""
        text = self.power_on()
        chosen = re.search(r"^LMBOOT slot=(\S+) part=(\d) left=(\d+) order=(.*?) root=(\S+)\r?$", text, re.M)
        assert chosen, f"boot.cmd chose no slot (console {self.boots}):\n{text[-3000:]}"
        assert "did not start" in text, text[-3000:]  # the fake kernel was refused: a failed try
        keys = ("slot", "part", "left", "order", "root")
        return dict(zip(keys, chosen.groups(), strict=True))

    def fw(self, tool: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """image/rauc/fw_env under the name `tool`, on this card."""
        return subprocess.run(
            [str(self.tools / tool), *args],
            env=self.fw_env, input=stdin, capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip

    def env(self) -> dict[str, str]:
        """The slot state as the gateway's fw_printenv reads it (what RAUC's uboot backend sees)."""
        return dict(line.split("=", 1) for line in self.fw("fw_printenv").stdout.splitlines())

    def setenv(self, **values: str) -> None:
        """What RAUC's uboot backend does from Linux (mark-active, mark-good, mark-bad), in one write
        (libubootenv 0.3's --script takes name=value lines); RAUC 1.8 itself writes one variable
        per call (tests/test_update.py cuts the power between them)."""
        self.fw("fw_setenv", "--script", "-", stdin="".join(f"{name}={value}\n" for name, value in values.items()))

    def copies(self) -> list[tuple[bool, int, dict[str, str]]]:
        """Both raw copies as they are on the card: (CRC holds, flag, variables)."""
        found = []
        with self.path.open("rb") as card:
            for sector in STATE_SECTORS:
                card.seek(sector * SECTOR)
                raw = card.read(ENV_SIZE)
                data = raw[5:]
                whole = int.from_bytes(raw[:4], "little") == zlib.crc32(data)
                pairs = [item.split(b"=", 1) for item in data.split(b"\0") if b"=" in item]
                found.append((whole, raw[4], {k.decode(): v.decode() for k, v in pairs} if whole else {}))
        return found

    def put_copy(self, copy: int, raw: bytes) -> None:
        with self.path.open("r+b") as card:
            card.seek(STATE_SECTORS[copy] * SECTOR)
            card.write(raw)

    def tear(self, copy: int) -> None:
        """What a power cut during the write of `copy` leaves: its first sector new, the rest not."""
        with self.path.open("r+b") as card:
            card.seek(STATE_SECTORS[copy] * SECTOR + SECTOR)
            card.write(os.urandom(SECTOR))

    def newer(self) -> int:
        """Which copy the last write went to (its flag is the other's + 1)."""
        (_, flag0, _), (_, flag1, _) = self.copies()
        return 1 if (flag1 - flag0) % 256 == 1 else 0
