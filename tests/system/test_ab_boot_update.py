"""System test: an update taken and an update rolled back, on the whole image booted through U-Boot.

    LASTMILE_IMAGE=/path/to/lastmile.img scripts/test.sh -m slow tests/system/test_ab_boot_update.py
    (the image's keyring is the throwaway test PKI build.sh left beside it, test-pki/)

One card, six boots (qemu-system-aarch64 -M virt -bios u-boot-qemu; image/rauc/boot.cmd picks
the slot; tests/system/guest_update.py does the guest's part of each boot, the "USB stick" is a
second disk holding two bundles made here from the image's own root):

1. slot A: an ECG is queued (no reading center: it stays in the outbox), `lastmile update install
   --file good.raucb` (real RAUC over D-Bus: slot B written, made primary with fw_setenv on the
   read-only boot partition), reboot;
2. slot B: its services reach READY, lastmile-mark-good marks it good; the ECG is still queued;
   bad.raucb installed (into A), reboot;
3-5. slot A, bad: its acquire service never reaches READY, so lastmile-mark-good gives up after
   its deadline (120 s in the bad root, 600 s on the image) and reboots; each boot took a try;
6. slot B again (A has no tries left), marked good again, the ECG still queued; an update round
   records the rollback (installed into A, B runs, with its version; A's three boots noted failed by
   lastmile-mark-good: the release's fault, not installed once more).

The bad root is the good one with two drop-ins written in by debugfs: lastmile-acquire's
ExecStart replaced by /bin/false, and lastmile-mark-good's deadline shortened to 120 s (three
boots with the image's 10 minutes would add half an hour).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, missing, require_tool, shared_file
from tests.system.qemu_machine import GatewayDisk, QemuMachine, partitions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(6 * 3600)]

GUEST_UPDATE = Path(__file__).with_name("guest_update.py")
MAKE_BUNDLE = REPO / "image" / "rauc" / "make-bundle"
CONFIG = """\
[gateway]
id = "ab-test-gw"
institution = "A/B test village clinic"

[reading_center]
host = "127.0.0.1"   # nothing listens: the ECG stays queued through both updates
port = 11112
called_ae = "COUNTY_PACS"

[usb_import]
folders = ["/var/lib/lastmile/import"]
"""
RUN_GUEST = [
    "systemd.unit=multi-user.target",
    "systemd.wants=kernel-command-line.service",
    "systemd.run_success_action=none",
    "systemd.run_failure_action=none",
    'systemd.run="/usr/bin/systemd-run --no-block --unit=lastmile-test-update --property=Type=exec '
    "--property=After=multi-user.target --property=RequiresMountsFor=/boot/firmware "
    '--property=StandardOutput=journal+console /usr/bin/python3 /boot/firmware/lastmile-test/guest_update.py"',
]
BAD_DROP_INS = {
    "lastmile-acquire.service.d/zz-never-ready.conf": "[Service]\nExecStart=\nExecStart=/bin/false\n",
    "lastmile-mark-good.service.d/zz-test-deadline.conf": "[Service]\nEnvironment=LASTMILE_GOOD_WITHIN_S=120\n",
}
CARD_BYTES = 8_000_000_000
BOOT_TIMEOUT_S = 3600  # one boot and what it does, emulated on 2 shared cores


def run(*args: str | Path) -> str:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True, timeout=1800).stdout


def root_filesystem(image: Path, out: Path) -> Path:
    """Slot A's ext4 (its own size, not the slot's) cut out of the image: what build.sh bundles."""
    slot_a = partitions(image)[1]
    with image.open("rb") as f:
        f.seek(slot_a.start + 1024)
        superblock = f.read(1024)
    blocks = int.from_bytes(superblock[4:8], "little")
    block_size = 1024 << int.from_bytes(superblock[24:28], "little")
    run("dd", f"if={image}", f"of={out}", "bs=1M", f"skip={slot_a.start // 2**20}",
        f"count={blocks * block_size // 2**20}", "conv=sparse", "status=none")  # fmt: skip
    return out


def make_bundle(rootfs: Path, version: str, pki: Path, out: Path) -> Path:
    run(MAKE_BUNDLE, rootfs, version, pki / "signing.cert.pem", pki / "signing.key.pem", pki / "ca.cert.pem", out)
    return out


def break_root(rootfs: Path, work: Path) -> None:
    """The drop-ins of a bad release, written into an ext4 image without mounting it."""
    commands = []
    for name, text in BAD_DROP_INS.items():
        folder, file = name.split("/")
        local = work / file
        local.write_text(text)
        commands += [f"mkdir /etc/systemd/system/{folder}", f"cd /etc/systemd/system/{folder}", f"write {local} {file}"]
    script = work / "debugfs.cmd"
    script.write_text("\n".join(commands) + "\n")
    run("debugfs", "-w", "-f", script, rootfs)
    listing = run("debugfs", "-R", "ls /etc/systemd/system/lastmile-acquire.service.d", rootfs)
    assert "zz-never-ready.conf" in listing, listing


def lmtest(console: str) -> dict[str, list]:
    found: dict[str, list] = {}
    for key, value in re.findall(r"^.*?LMTEST (\S+) (.*?)\r?$", console, re.M):
        try:
            found.setdefault(key, []).append(json.loads(value))
        except ValueError:
            continue
    return found


def lmboot(console: str) -> dict[str, str]:
    chosen = re.search(r"^LMBOOT slot=(\S+) part=(\d) left=(\d+) order=(.*?) root=(\S+)\r?$", console, re.M)
    assert chosen, console[-3000:]
    return dict(zip(("slot", "part", "left", "order", "root"), chosen.groups(), strict=True))


class Card:
    """The clinic's card, booted again and again; each boot's action for guest_update.py."""

    def __init__(self, image: Path, work: Path, stick: Path) -> None:
        self.disk = GatewayDisk.create(image, work)
        self.disk.resize(CARD_BYTES)
        ecg = shared_file("ecg", "contec", "0000037.ECG")
        self.disk.put_boot_files(
            {
                "lastmile/lastmile.toml": CONFIG.encode(),
                "lastmile-test/guest_update.py": GUEST_UPDATE.read_bytes(),
                f"lastmile-test/{ecg.name}": ecg.read_bytes(),
            }
        )
        self.work = work
        self.stick = stick
        self.boots = 0
        self.timings: list[dict[str, object]] = []

    def boot(self, action: str, *, until: str = r"LMTEST (done|error) ") -> tuple[dict[str, str], dict[str, list]]:
        """One power-on until the machine reboots or powers off; U-Boot's choice and the reports."""
        self.boots += 1
        self.disk.put_boot_files({"lastmile-test/action": action.encode()})
        machine = QemuMachine(
            self.disk,
            self.work / f"console-{self.boots}.log",
            extra_cmdline=RUN_GUEST,
            extra_drives=[self.stick],
        )
        began = time.monotonic()
        with machine:
            ready_at = None
            if action != "bad":
                machine.wait_for(r"LMTEST (ready|error) ", BOOT_TIMEOUT_S)
                ready_at = time.monotonic() - began
            machine.wait_exit(BOOT_TIMEOUT_S)
        console = machine.console
        reports = lmtest(console)
        assert "error" not in reports, f"boot {self.boots} ({action}): {reports['error']}\n{console[-4000:]}"
        self.timings.append(
            {
                "boot": self.boots,
                "action": action,
                "host_to_ready_s": None if ready_at is None else round(ready_at),
                "kernel_to_ready_s": reports.get("ready", [{}])[0].get("kernel_to_ready_s"),
                "whole_boot_s": round(time.monotonic() - began),
            }
        )
        print(f"\nboot {self.boots}: {self.timings[-1]}")
        return lmboot(console), reports


def test_a_good_update_is_taken_a_bad_one_rolls_back_and_the_outbox_survives(image: Path, tmp_path: Path) -> None:
    for tool in ("qemu-system-aarch64", "qemu-img", "qemu-io", "mcopy", "rauc", "mksquashfs", "debugfs"):
        require_tool(tool)
    pki = image.parent / "test-pki"
    if not (pki / "signing.key.pem").exists():
        missing(f"no {pki}: the image's keyring must be the test PKI image/build.sh leaves beside it")
    stick_tree = tmp_path / "stick"
    stick_tree.mkdir()
    good_root = root_filesystem(image, tmp_path / "good.ext4")
    good = make_bundle(good_root, "0.0.0+ab-good", pki, stick_tree / "good.raucb")
    bad_root = tmp_path / "bad.ext4"
    run("cp", "--sparse=always", good_root, bad_root)
    good_root.unlink()
    break_root(bad_root, tmp_path)
    make_bundle(bad_root, "0.0.0+ab-bad", pki, stick_tree / "bad.raucb")
    bad_root.unlink()
    print(f"\nbundle: {good.stat().st_size} bytes (root filesystem {slot_size(image)} bytes of slot)")
    stick = tmp_path / "stick.ext4"
    run("mkfs.ext4", "-q", "-L", "LM-STICK", "-d", stick_tree, stick, f"{stick_size(stick_tree)}M")
    card = Card(image, tmp_path / "card", stick)

    # 1. slot A takes the good bundle
    chosen, said = card.boot("install-good")
    assert chosen["slot"] == "A"
    queued = said["outbox"][0]
    assert len(queued) == 1 and queued[0][0] == "dicom", queued  # the ECG as its DICOM object
    queued_keys = [item[:2] for item in queued]  # kind, key (its state may move: sends are tried)
    (install,) = said["install"]
    assert install["rc"] == 0, install
    (after,) = said["after-install"]
    assert after["env"]["BOOT_ORDER"] == "B A" and after["env"]["BOOT_B_LEFT"] == "3", after
    assert after["boot_mount"].split(",")[0] == "ro", after  # p1 is never written (the state is before it)

    # 2. slot B boots, is marked good, keeps the outbox, takes the bad bundle
    chosen, said = card.boot("check-install-bad")
    assert chosen["slot"] == "B" and chosen["left"] == "2", chosen
    (state,) = said["state"]
    assert state["slot"] == "B" and state["root"] == "PARTUUID=4c4d4731-03"
    assert state["env"]["BOOT_B_LEFT"] == "9", state  # mark-good: a proven slot's tries (boot-attempts)
    assert [item[:2] for item in said["outbox"][0]] == queued_keys
    (after,) = said["after-install"]
    assert after["env"]["BOOT_ORDER"] == "A B" and after["env"]["BOOT_A_LEFT"] == "3", after

    # 3-5. the bad slot A never gets healthy: each boot takes a try, and lastmile-mark-good reboots
    for left in ("2", "1", "0"):
        chosen, said = card.boot("bad")
        assert (chosen["slot"], chosen["left"]) == ("A", left), chosen
        assert said["boot"][0]["slot"] == "A"
        assert "not healthy within 120 s" in (card.work / f"console-{card.boots}.log").read_text(errors="replace")

    # 6. U-Boot falls back to B, which is still good, with the same outbox
    chosen, said = card.boot("check")
    assert chosen["slot"] == "B", chosen
    (state,) = said["state"]
    assert state["slot"] == "B" and state["env"]["BOOT_A_LEFT"] == "0" and state["env"]["BOOT_B_LEFT"] == "9"
    assert [item[:2] for item in said["outbox"][0]] == queued_keys
    # the first update round after it records the rollback: by slot, with what runs instead
    (round_,) = said["round"]
    installed = round_["installed"]
    assert (installed["version"], installed["slot"]) == ("0.0.0+ab-bad", "A"), round_
    rolled_back = installed["rolled_back"]
    assert (rolled_back["booted_slot"], rolled_back["booted_version"]) == ("B", "0.0.0+ab-good"), round_
    # lastmile-mark-good noted each of A's three failed boots on the data partition: the release's
    # fault, not the power's, so the bad bundle is not installed once more
    assert rolled_back["failed_boots"] == 3 and not installed.get("retried"), round_
    print(json.dumps(card.timings, indent=1))


def slot_size(image: Path) -> int:
    return partitions(image)[1].size


def stick_size(tree: Path) -> int:
    """MiB for an ext4 holding `tree` (its files plus a tenth and 16 MiB of metadata)."""
    files = sum(f.stat().st_size for f in tree.iterdir())
    return files * 11 // 10 // 2**20 + 16
