"""The whole gateway under emulation: the SD-card image booted by qemu-system-aarch64 -M virt.

Two ways in (QemuMachine's `firmware`):
- "u-boot" (default): qemu starts Debian's U-Boot for virt (u-boot-qemu, qemu_arm64, `-bios`) where
  the Pi's firmware starts the image's own U-Boot (u-boot-rpi, config.txt kernel=u-boot.bin). From
  there it is the image's path: U-Boot's distro boot finds boot.scr on the bootable p1, which picks
  the root slot (boot counting in two raw copies before p1, image/rauc/boot.cmd) and boots that slot's own
  /vmlinuz + /initrd.img with root=PARTUUID=4c4d4731-0N rauc.slot=A|B. What differs from a Pi: the
  U-Boot build (qemu_arm64, env in flash, vs rpi_arm64, env in uboot.env), the device tree (qemu's
  own, vs the firmware's with config.txt's overlays), and the kernel command line: the Pi's firmware
  hands cmdline.txt over in the device tree; here it is lastmile-bootargs.txt on p1, written before
  each boot (cmdline.txt with virt's PL011 console, ttyAMA0, and the test's extra words).
- "kernel": qemu loads the kernel and initrd raspi-firmware left on p1 (slot A's, as built) with
  -kernel/-initrd and the same command line: no U-Boot, no slot choice, no rauc.slot= (the A/B
  units stay inactive). Faster to the kernel; for tests of what runs after it.
The disk is a virtio block device (the Pi's SD card is an mmc device; both are found by label and
PARTUUID). What that leaves untested is in image/HARDWARE.md.

    disk = GatewayDisk.create(image, workdir)        # copy-on-write overlay: the image stays as built
    disk.put_boot_file("lastmile/lastmile.toml", b"...")   # what a technician copies from a laptop
    with QemuMachine(disk, workdir / "console.log") as vm:
        vm.wait_for(r"Reached target .*Multi-User", timeout=900)
        vm.kill()                                     # a power cut: no shutdown, no flush
    vm.boot()                                         # the same card, booted again

The disk is a qcow2 overlay over the raw image (what `-snapshot` makes internally, but kept
across boots, so the same "card" can be cut and booted again). Files are written into its boot
partition with mtools + qemu-io: vfat cannot be mounted in this (host) kernel. The serial console
is read by a thread into a buffer and a log file; `wait_for` waits on it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

QEMU = "qemu-system-aarch64"
# virt's first serial port is a PL011; the Pi's cmdline.txt names the Pi's consoles.
VIRT_CONSOLE = "console=ttyAMA0"
# Debian's u-boot-qemu: what stands in for the Pi firmware + u-boot-rpi
UBOOT_QEMU = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")
# Read by boot.cmd when present: the kernel command line the Pi's firmware would hand over
BOOTARGS_FILE = "lastmile-bootargs.txt"


# Carries one guestfwd connection to a host loopback port (qemu runs it per connection).
TCP_RELAY = Path(__file__).with_name("tcp_relay.py")


def loopback_network(*, relays: dict[str, int] | None = None, host_forwards: dict[int, int] | None = None) -> list[str]:
    """qemu arguments for a guest network that reaches only what a test names: user-mode
    networking with restrict=on (no route out), one virtio NIC.

    relays: guest-side "address:port" -> a host loopback port, e.g. {"10.0.2.100:4242": orthanc_port}:
        the gateway's reading center at a fixed address, carried by tcp_relay.py.
    host_forwards: host loopback port -> guest port, e.g. {report_port: 11113}: a peer on the host
        (Orthanc's commitment report) reaching a listener in the guest (which sees it come from 10.0.2.2).
    """
    rules = [f"guestfwd=tcp:{guest}-cmd:{sys.executable} {TCP_RELAY} {port}" for guest, port in (relays or {}).items()]
    rules += [f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in (host_forwards or {}).items()]
    # romfile=: no iPXE option ROM is installed (nor needed: the kernel is loaded directly)
    return ["-netdev", ",".join(["user,id=n0,restrict=on", *rules]), "-device", "virtio-net-pci,netdev=n0,romfile="]


class MachineError(Exception):
    """The machine did not do what a test waited for; the message has the console's tail."""


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # bytes
    size: int  # bytes
    type: str  # MBR type id, e.g. "c" (FAT32 LBA), "83" (Linux)


def partitions(image: Path) -> list[Partition]:
    table = json.loads(
        subprocess.run(["sfdisk", "--json", str(image)], check=True, capture_output=True, text=True).stdout
    )["partitiontable"]
    sector = table.get("sectorsize", 512)
    return [
        Partition(i + 1, p["start"] * sector, p["size"] * sector, p["type"]) for i, p in enumerate(table["partitions"])
    ]


class GatewayDisk:
    """A writable copy-on-write "SD card" over a built image (qcow2 with the raw image as backing)."""

    def __init__(self, image: Path, path: Path, workdir: Path, disk_format: str = "qcow2") -> None:
        self.image = image
        self.path = path
        self.workdir = workdir
        self.format = disk_format  # "qcow2" (overlay) or "raw" (a whole copy: the card is one plain file)

    @classmethod
    def create(cls, image: Path, workdir: Path) -> GatewayDisk:
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "gateway.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.resolve()), str(path)], check=True
        )
        return cls(image, path, workdir)

    @classmethod
    def copy_of(cls, image: Path, workdir: Path) -> GatewayDisk:
        """A raw copy of the image (sparse): a power-cut campaign cuts a plain file, no qcow2
        metadata between the guest's writes and the "card", and reads its partitions afterwards."""
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "card.img"
        subprocess.run(["cp", "--sparse=always", str(image), str(path)], check=True)
        return cls(path, path, workdir, "raw")

    def resize(self, size: int) -> None:
        """Make this "card" `size` bytes (a bigger SD card than the image: the space is after the last partition)."""
        subprocess.run(["qemu-img", "resize", "-q", "-f", self.format, str(self.path), str(size)], check=True)

    def _boot_fat(self) -> Path:
        """This disk's boot partition as a raw FAT file, read again each time: a card made before
        the slot state moved out of the FAT had the guest write it (lastmile-ab.env), and a guest may
        still remount it, so a stale copy written back could undo a write."""
        fat = self.workdir / "boot.vfat"
        fat.unlink(missing_ok=True)
        boot = partitions(self.image)[0]
        # qemu-img dd copies a block per call: 1 MiB blocks (build.sh aligns p1 so) are seconds faster
        block = 2**20 if boot.start % 2**20 == 0 and boot.size % 2**20 == 0 else 512
        subprocess.run(
            [
                "qemu-img",
                "dd",
                "-f",
                self.format,
                "-O",
                "raw",
                f"if={self.path}",
                f"of={fat}",
                f"bs={block}",
                f"skip={boot.start // block}",
                f"count={boot.size // block}",
            ],
            check=True,
            capture_output=True,
        )
        return fat

    def put_boot_files(self, files: dict[str, bytes]) -> None:
        """Write files into the boot partition (paths relative to its root, folders made)."""
        fat = self._boot_fat()
        for name, data in files.items():
            parts = Path(name).parts
            for depth in range(1, len(parts)):
                folder = "::/" + "/".join(parts[:depth])
                if subprocess.run(["mdir", "-b", "-i", str(fat), folder], capture_output=True).returncode:
                    subprocess.run(["mmd", "-i", str(fat), folder], check=True, capture_output=True)
            local = self.workdir / "boot-file.tmp"
            local.write_bytes(data)
            subprocess.run(["mcopy", "-o", "-i", str(fat), str(local), f"::/{name}"], check=True, capture_output=True)
            local.unlink()
        boot = partitions(self.image)[0]
        subprocess.run(
            ["qemu-io", "-f", self.format, "-c", f"write -q -s {fat} {boot.start} {boot.size}", str(self.path)],
            check=True,
            capture_output=True,
        )

    def boot_file(self, name: str) -> bytes:
        """A file from this disk's boot partition (as the machine will see it)."""
        local = self.workdir / "boot-file.tmp"
        subprocess.run(
            ["mcopy", "-o", "-n", "-i", str(self._boot_fat()), f"::/{name}", str(local)],
            check=True,
            capture_output=True,
        )
        try:
            return local.read_bytes()
        finally:
            local.unlink()

    def kernel_and_initrd(self) -> tuple[Path, Path]:
        """The kernel and initrd raspi-firmware copied to the boot partition: slot A's, as built
        (config.txt starts U-Boot, which loads the booted slot's own)."""
        listing = subprocess.run(
            ["mdir", "-b", "-i", str(self._boot_fat()), "::/"], check=True, capture_output=True, text=True
        ).stdout
        kernel = re.search(r"^::/(vmlinuz-\S+)$", listing, re.M)
        initrd = re.search(r"^::/(initrd\.img-\S+)$", listing, re.M)
        if not kernel or not initrd:
            raise MachineError(f"no vmlinuz-*/initrd.img-* on the boot partition:\n{listing}")
        out = []
        for name in (kernel.group(1), initrd.group(1)):
            path = self.workdir / name
            if not path.exists():
                path.write_bytes(self.boot_file(name))
            out.append(path)
        return out[0], out[1]

    def cmdline(self) -> list[str]:
        """The image's cmdline.txt with the Pi's consoles replaced by virt's serial port."""
        words = self.boot_file("cmdline.txt").decode().split()
        return [w for w in words if not w.startswith("console=")] + [VIRT_CONSOLE]


class QemuMachine:
    """One boot of a GatewayDisk; the serial console goes to `console_log` and a buffer.

    cache: qemu's disk cache mode. "unsafe" is fastest for tests that never cut power;
    a power-cut test wants "directsync" or "none,aio=threads" (nothing held in qemu or the host
    page cache that the guest believes is on the card; bench/power_cut.py says which and why).
    network: qemu arguments for the network; default none at all. A test that needs a peer
    gives `loopback_network(...)`: user-mode networking that reaches only the loopback ports it names.
    """

    def __init__(
        self,
        disk: GatewayDisk,
        console_log: Path,
        *,
        extra_cmdline: list[str] | None = None,
        memory_mb: int = 1024,
        cpus: int = 2,
        cache: str = "unsafe",
        network: list[str] | None = None,
        firmware: str = "u-boot",
        extra_drives: list[Path] | None = None,
    ) -> None:
        self.disk = disk
        self.console_log = console_log
        self.extra_cmdline = list(extra_cmdline or [])
        self.network = list(network) if network is not None else ["-nic", "none"]
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.cache = cache
        if firmware not in ("u-boot", "kernel"):
            raise ValueError(f"firmware must be 'u-boot' or 'kernel', not {firmware!r}")
        self.firmware = firmware
        self.extra_drives = list(extra_drives or [])  # raw, read-only, after the card: vdb, vdc, ...
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._console = bytearray()
        self._changed = threading.Condition()
        self._reader: threading.Thread | None = None

    def kernel_cmdline(self) -> str:
        return " ".join([*self.disk.cmdline(), *self.extra_cmdline])

    def command(self) -> list[str]:
        if self.firmware == "u-boot":
            if not UBOOT_QEMU.exists():
                raise MachineError(f"{UBOOT_QEMU} is absent (apt-get install u-boot-qemu)")
            boot = ["-bios", str(UBOOT_QEMU)]
        else:
            kernel, initrd = self.disk.kernel_and_initrd()
            boot = ["-kernel", str(kernel), "-initrd", str(initrd), "-append", self.kernel_cmdline()]
        return [
            QEMU,
            "-M",
            "virt",
            "-cpu",
            "cortex-a72",
            "-smp",
            str(self.cpus),
            "-m",
            str(self.memory_mb),
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            *self.network,
            "-no-reboot",  # a reboot (or a panic with panic=N) ends the process
            # The Pi has a hardware RNG (bcm2835-rng); without one early getrandom() waits.
            "-device",
            "virtio-rng-pci",
            *boot,
            "-drive",
            f"file={self.disk.path},if=virtio,format={self.disk.format},cache={self.cache}",
            *(
                arg
                for drive in self.extra_drives
                for arg in ("-drive", f"file={drive},if=virtio,format=raw,readonly=on")
            ),
        ]

    def boot(self) -> None:
        if self.process and self.process.poll() is None:
            raise MachineError("already running")
        cmd = self.command()
        if self.firmware == "u-boot":
            # what the Pi's firmware hands U-Boot from cmdline.txt (boot.cmd strips its root=)
            self.disk.put_boot_files({BOOTARGS_FILE: f"lm_cmdline={self.kernel_cmdline()}\n".encode()})
        log.info("booting: %s", shlex.join(cmd))
        with self._changed:
            self._console.clear()
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._reader = threading.Thread(target=self._read_console, args=(self.process,), daemon=True)
        self._reader.start()

    def _read_console(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        with self.console_log.open("ab") as out:
            while chunk := os.read(process.stdout.fileno(), 65536):
                out.write(chunk)
                out.flush()
                with self._changed:
                    self._console += chunk
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def console(self) -> str:
        with self._changed:
            return self._console.decode(errors="replace")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of `pattern` (a regex, MULTILINE) on the console since this boot."""
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = regex.search(self._console.decode(errors="replace"))
                if found:
                    return found
                if not self.running() and not (self._reader and self._reader.is_alive()):
                    raise MachineError(f"the machine stopped before {pattern!r}:\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MachineError(f"no {pattern!r} on the console within {timeout:.0f} s:\n{self.tail()}")
                self._changed.wait(min(left, 5.0))

    def wait_exit(self, timeout: float) -> int:
        """Wait for the machine to power itself off; its qemu exit code."""
        assert self.process is not None
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise MachineError(f"still running after {timeout:.0f} s:\n{self.tail()}") from None
        if self._reader:
            self._reader.join(30)
        return code

    def kill(self) -> None:
        """Pull the plug: SIGKILL qemu (whatever the guest had not written is lost)."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        if self._reader:
            self._reader.join(30)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-lines:])

    def __enter__(self) -> QemuMachine:
        self.boot()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
