"""Power-cut campaign: the whole gateway (the SD-card image under qemu-system-aarch64 -M virt)
loses power at risky moments while ECGs flow, then boots again on the same card.

Run as root (it puts itself, qemu and Orthanc in a private network namespace):

    LASTMILE_IMAGE=OUT.img .venv/bin/python bench/power_cut.py [--cuts 30] [--seed 1] [--json]

The card is a raw sparse copy of the image, made once at the start (every campaign starts from a
pristine card; the cuts accumulate on it, as on a clinic's card). Its disk is attached with
`cache=none,aio=threads`: O_DIRECT, so no host page cache holds what the guest believes written,
and the guest sees a write-back cache (as behind an SD card's controller), so ext4's barriers and
SQLite's fsyncs become FLUSH requests that qemu turns into fdatasync. A SIGKILL of qemu then loses
exactly what the guest had not yet handed to its disk. (`directsync` would also be safe, but it
advertises a write-through device: the guest would issue no flushes, a path a card never takes.)
What a real card's FTL does on power loss (acknowledged writes lost, torn pages) is not emulated.

Traffic: a cart on the host side C-STOREs distinct 12-lead ECGs (tests.peers.ecg_payloads) to the
gateway's LAN receiver through a forwarded port, one association per object, retrying an object
until it gets Success (that Success is the gateway's acknowledgement); the gateway forwards to
Orthanc (qemu's user network, restrict=on: its only exits are the PACS address relayed to Orthanc
and Orthanc's storage-commitment report relayed back) and purges what is committed. Relays in
this process see the gateway's sends and Orthanc's reports, so each cut is aimed at one moment:

- receive: a cart's C-STORE in flight (or just acknowledged);
- send: the gateway's association to the PACS carrying data;
- awaiting: Orthanc has just stored an object, its commitment report not yet sent;
- committed: a commitment report just delivered (committed, not yet purged);
- boot: during the boot itself (fsck, journal recovery, services starting);
- any: a random moment once the services are READY.

After every cut, on a copy of the card's data partition: `e2fsck -E journal_only` (what the
next mount replays), then `e2fsck -fn` (anything beyond the journal is a repair), then
`PRAGMA integrity_check` on every database in it. Each boot's console (the journal is forwarded
to it) says what the guest's own fsck did. At the end the cart stops, the gateway drains, power is
cut once more and the outbox is read from the card: every acknowledged SOP Instance UID must be in
Orthanc, stored once, and no item left undelivered. `--json` prints one JSON object last.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import logging
import os
import random
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import clinic_day as cd  # bench/ is on sys.path when run as a script

log = logging.getLogger("power_cut")

CACHE_MODE = "none,aio=threads"
GATEWAY_AE = "POWERCUT_GW"
CART_AE = "CART"
LAN_AE = "LASTMILE"
PACS_ADDRESS = "10.0.2.100"  # the reading center as the guest sees it (a guestfwd rule)
PACS_PORT = 4242
GUEST_LAN_PORT = 11112
GUEST_REPORT_PORT = 11113
MOMENTS = {"receive": 3, "send": 3, "awaiting": 2, "committed": 2, "boot": 1, "any": 1}
MOMENT_WAIT_S = 300.0  # a moment that does not come by then: cut anyway (recorded as missed)
READY_TIMEOUT_S = 1200.0
DRAIN_TIMEOUT_S = 1200.0
QUIET_S = 60.0  # > [reading_center] commitment_timeout_s below
DELIVERED = ("committed", "purged")
EMERGENCY = r"Reached target emergency\.target"
READY = {
    "acquire": r"Started lastmile-acquire\.service",
    "forward": r"Started lastmile-forward\.service",
}
# Services the cuts do not need, masked on the kernel command line so boots are shorter (the
# console and the metrics endpoint only read the outbox; no Bluetooth, GPS, Wi-Fi or NTP here).
MASKED = (
    "lastmile-console.service",
    "lastmile-metrics.service",
    "bluetooth.service",
    "gpsd.socket",
    "gpsd.service",
    "wpa_supplicant.service",
    "systemd-timesyncd.service",
)
EXTRA_CMDLINE = [
    *(f"systemd.mask={unit}" for unit in MASKED),
    "systemd.journald.forward_to_console=1",  # the guest's fsck and the services' logs, in console.log
]
CONFIG = f"""\
# The power-cut campaign's clinic: a cart on the LAN, a reading center through qemu's user network.
[gateway]
id = "powercut-gw"
institution = "Power cut test clinic"

[reading_center]
host = "{PACS_ADDRESS}"
port = {PACS_PORT}
called_ae = "READING_CENTER"
calling_ae = "{GATEWAY_AE}"
report_networks = ["10.0.2.2/32"]   # qemu's gateway address: where the relayed reports come from
commitment_timeout_s = 30   # a report lost with the power: ask again soon

[outbox]
backoff_max_s = 30   # the PACS is back as soon as the gateway is: no long waits in the campaign

[ecg]
re_record_hold_s = 0   # the test ECGs go out whatever their quality verdict ...

[patient]
unassigned_ecg_hold_s = 0   # ... and with no patient checked in

[lan_receiver]
enabled = true
port = {GUEST_LAN_PORT}
ae_title = "{LAN_AE}"
allowed_callers = ["{CART_AE}"]

[reports]
source = "off"

[ble]
enabled = false

[serial]
enabled = false
"""
GUEST_FSCK = re.compile(r"systemd-fsck\[\d+\]: (.*?)\r?$", re.M)
# What e2fsck -a (preen) prints at a boot after a cut. Benign: the header, the journal replay,
# "clean", and the free inode/block counts ext4 does not keep current in the superblock while
# mounted ("Setting free ... count"). Anything else is a repair.
FSCK_BENIGN = re.compile(r"^e2fsck \d|: recovering journal$|: clean, |^Setting free (inodes|blocks) count to ")
FAILED_UNIT = re.compile(r"\[FAILED\] Failed to start (.*?)\r?$", re.M)


# -- relays that watch the gateway's traffic --------------------------------------------------------


class WatchingRelay:
    """127.0.0.1:port -> 127.0.0.1:target, one thread pair per connection, counting what passes."""

    def __init__(self, name: str, target: int) -> None:
        self.name = name
        self.target = target
        self.server = socket.create_server(("127.0.0.1", cd.free_port()))
        self.port = self.server.getsockname()[1]
        self.active = 0
        self.opened = 0
        self.closed = 0
        self.last_data_at = 0.0
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True, name=f"relay-{name}").start()

    def accept(self) -> None:
        while True:
            client, _ = self.server.accept()
            threading.Thread(target=self.carry, args=(client,), daemon=True).start()

    def carry(self, client: socket.socket) -> None:
        try:
            peer = socket.create_connection(("127.0.0.1", self.target), timeout=10)
        except OSError:
            client.close()
            return
        with self.lock:
            self.active += 1
            self.opened += 1
        done = threading.Event()

        def pump(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while chunk := src.recv(65536):
                    self.last_data_at = time.monotonic()
                    dst.sendall(chunk)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            done.set()

        threading.Thread(target=pump, args=(peer, client), daemon=True).start()
        pump(client, peer)
        done.wait(60)
        for s in (client, peer):
            s.close()
        with self.lock:
            self.active -= 1
            self.closed += 1


# -- the cart ---------------------------------------------------------------------------------------


@dataclass
class Cart:
    """Sends distinct ECGs to the gateway's LAN receiver; an object is retried until Success."""

    port: int
    rng: random.Random
    log_path: Path | None = None  # acknowledged SOP Instance UIDs, one a line
    acknowledged: dict[str, float] = field(default_factory=dict)  # SOP Instance UID -> when
    attempts: int = 0
    in_flight_since: float = 0.0  # 0: no C-STORE in flight
    last_ack_at: float = 0.0
    stopping: threading.Event = field(default_factory=threading.Event)
    stopped: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        from pydicom import dcmread
        from pynetdicom import AE

        from tests.peers import ecg_payloads

        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
        try:
            while not self.stopping.is_set():
                for payload in ecg_payloads(10):
                    ds = dcmread(io.BytesIO(payload.data))
                    while True:
                        ae = AE(ae_title=CART_AE)
                        ae.add_requested_context(str(ds.SOPClassUID), [str(ds.file_meta.TransferSyntaxUID)])
                        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
                        self.attempts += 1
                        self.in_flight_since = time.monotonic()
                        status = None
                        with contextlib.suppress(Exception):  # a cut mid-association: any error, retry
                            assoc = ae.associate("127.0.0.1", self.port, ae_title=LAN_AE)
                            if assoc.is_established:
                                try:
                                    status = assoc.send_c_store(ds)
                                finally:
                                    assoc.release()
                        self.in_flight_since = 0.0
                        if status is not None and status.get("Status") == 0x0000:
                            self.acknowledged[payload.sop_instance_uid] = time.monotonic()
                            self.last_ack_at = time.monotonic()
                            if self.log_path:  # the truth survives the bench being stopped
                                with self.log_path.open("a") as out:
                                    out.write(payload.sop_instance_uid + "\n")
                            break
                        time.sleep(2.0)  # the gateway is down (or booting): a cart retries
                    if self.stopping.is_set():
                        return
                    time.sleep(self.rng.uniform(0.5, 3.0))
        finally:
            self.stopped.set()


# -- what is on the card ----------------------------------------------------------------------------


def data_partition(card: Path) -> tuple[int, int]:
    from tests.system.qemu_machine import partitions

    part = partitions(card)[-1]  # LM-DATA: build.sh's last partition (p4, after the root slots A and B)
    return part.start, part.size


def read_data_partition(card: Path, scratch: Path) -> dict[str, Any]:
    """The data partition as the next boot finds it: journal replayed (on a copy), then checked."""
    start, size = data_partition(card)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    image = scratch / "data.ext4"
    subprocess.run(
        [
            "dd",
            f"if={card}",
            f"of={image}",
            "bs=1M",
            "iflag=skip_bytes,count_bytes",
            f"skip={start}",
            f"count={size}",
            "conv=sparse",
            "status=none",
        ],
        check=True,
    )
    replay = subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(image)], capture_output=True, text=True)
    check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    dump = scratch / "files"
    dump.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {dump}", str(image)], capture_output=True, check=True)
    image.unlink()
    databases = {}
    for path in sorted(dump.rglob("*")):
        if path.is_file() and path.read_bytes()[:16] == b"SQLite format 3\x00":
            databases[str(path.relative_to(dump))] = integrity(path)
    return {
        "journal_replayed": "recovering journal" in replay.stdout + replay.stderr,
        "replay_exit": replay.returncode,
        "fsck_exit": check.returncode,
        "fsck_problems": [ln for ln in check.stdout.splitlines() if not ln.startswith(("Pass ", "LM-DATA:"))],
        "integrity": databases,
        "outbox": outbox_items(dump / "outbox.sqlite"),
    }


def integrity(path: Path) -> str:
    """integrity_check of the database as the gateway will open it (its WAL applied: a copy is opened)."""
    try:
        conn = sqlite3.connect(path, timeout=5)
        try:
            return "; ".join(r[0] for r in conn.execute("PRAGMA integrity_check"))
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return f"{type(exc).__name__}: {exc}"


def outbox_items(path: Path) -> list[tuple[str, str, int]]:
    """(key, state, interrupted sends) of every DICOM item."""
    if not path.exists():
        return []
    conn = sqlite3.connect(path, timeout=5)
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(items)")}
        interrupted = "interrupted_sends" if "interrupted_sends" in columns else "0"
        return [
            (str(k), str(s), int(n))
            for k, s, n in conn.execute(f"SELECT key, state, {interrupted} FROM items WHERE kind = 'dicom'")
        ]
    except sqlite3.DatabaseError:
        return []
    finally:
        conn.close()


def acknowledged_before(work: Path) -> set[str]:
    """What a stopped campaign's cart was acknowledged: its acknowledged.txt, or (a run without
    one) every object the gateway logged as kept, a superset (kept, then cut before Success)."""
    listed = work / "acknowledged.txt"
    if listed.exists():
        return set(listed.read_text().split())
    kept = re.compile(r"C-STORE from CART: kept ([0-9.]+)")
    return {
        uid for log_file in work.glob("console-*.log") for uid in kept.findall(log_file.read_text(errors="replace"))
    }


# -- the campaign -----------------------------------------------------------------------------------


@dataclass
class Cut:
    number: int
    moment: str
    reached: bool = False
    ready_s: float | None = None  # power-on to acquire and forward READY
    at_s: float = 0.0  # power-on to the cut
    guest_fsck: list[str] = field(default_factory=list)
    failed_units: list[str] = field(default_factory=list)
    card: dict[str, Any] = field(default_factory=dict)


class Campaign:
    def __init__(self, image: Path, work: Path, seed: int, *, resume: bool = False) -> None:
        from tests.peers import OrthancServer, gateway_modality
        from tests.system.qemu_machine import GatewayDisk

        self.work = work
        self.rng = random.Random(seed)
        if resume:  # a stopped campaign's card, Orthanc storage and truth, as they were left
            card = work / "card" / "card.img"
            self.disk = GatewayDisk(card, card, work / "card", "raw")
        else:
            self.disk = GatewayDisk.copy_of(image, work / "card")  # pristine: this campaign's card
            self.disk.put_boot_files({"lastmile/lastmile.toml": CONFIG.encode()})
        self.report_port = cd.free_port()  # qemu's hostfwd to the guest's commitment listener
        self.lan_port = cd.free_port()  # qemu's hostfwd to the guest's LAN receiver
        self.reports = WatchingRelay("reports", self.report_port)
        self.orthanc = OrthancServer(work / "orthanc", modalities=gateway_modality(GATEWAY_AE, self.reports.port))
        self.orthanc.start()
        self.pacs = WatchingRelay("pacs", self.orthanc.dicom_port)
        self.cart = Cart(self.lan_port, random.Random(seed + 1), work / "acknowledged.txt")
        self.cuts: list[Cut] = []
        self.boots = 0
        self.stores_at_cut: list[int] = []  # Orthanc's C-STORE count at each cut: which boot sent what
        if resume:
            self.cart.acknowledged = dict.fromkeys(acknowledged_before(work), 0.0)
            self.boots = len(list(work.glob("console-*.log")))
            # the stopped run's boot boundaries are unknown: none of its stores is called a same-boot repeat
            self.stores_at_cut = list(range(1, len(self.stored()) + 1))

    def network(self) -> list[str]:
        from tests.system.qemu_machine import loopback_network

        return loopback_network(
            relays={f"{PACS_ADDRESS}:{PACS_PORT}": self.pacs.port},
            host_forwards={self.report_port: GUEST_REPORT_PORT, self.lan_port: GUEST_LAN_PORT},
        )

    def machine(self) -> Any:
        from tests.system.qemu_machine import QemuMachine

        self.boots += 1
        return QemuMachine(
            self.disk,
            self.work / f"console-{self.boots:03d}.log",
            extra_cmdline=EXTRA_CMDLINE,
            cache=CACHE_MODE,
            network=self.network(),
            # Direct kernel boot, no U-Boot: every cut lands before lastmile-mark-good, so under
            # U-Boot each would take one of slot A's tries and every third the empty slot B would
            # be tried (a reset: qemu -no-reboot ends). The cuts test the data, not the slot choice.
            firmware="kernel",
        )

    def wait_ready(self, vm: Any, timeout: float) -> float:
        from tests.system.qemu_machine import MachineError

        for pattern in READY.values():
            if vm.wait_for(f"{pattern}|{EMERGENCY}", timeout).group(0).startswith("Reached"):
                # nobody can log in there (root is locked): the gateway is dead until a visit
                raise MachineError("the boot fell into emergency mode")
        return time.monotonic() - vm.started_at

    def wait_moment(self, moment: str, vm: Any) -> bool:
        """Wait for `moment` (True), or MOMENT_WAIT_S (False); then a random offset into it."""
        time.sleep(self.rng.uniform(0.0, 20.0))  # not always the first such moment after READY
        deadline = time.monotonic() + MOMENT_WAIT_S
        c_stores = sum(self.orthanc.c_stores().values())
        reports = self.reports.closed
        while time.monotonic() < deadline and vm.running():
            now = time.monotonic()
            if moment == "receive" and self.cart.in_flight_since:
                time.sleep(self.rng.uniform(0.0, 1.5))
                return True
            if moment == "send" and self.pacs.active and now - self.pacs.last_data_at < 0.3:
                time.sleep(self.rng.uniform(0.0, 0.5))
                return True
            if moment == "awaiting" and sum(self.orthanc.c_stores().values()) > c_stores:
                time.sleep(self.rng.uniform(0.0, 0.3))
                return True
            if moment == "committed" and self.reports.closed > reports:
                time.sleep(self.rng.uniform(0.0, 1.0))
                return True
            time.sleep(0.05)
        return False

    def one_cut(self, number: int) -> Cut:
        moment = self.rng.choices(list(MOMENTS), weights=list(MOMENTS.values()))[0]
        cut = Cut(number, moment)
        vm = self.machine()
        vm.boot()
        try:
            if moment == "boot":
                # somewhere between the kernel and the services' READY (under emulation: ~1-3 min)
                offset = self.rng.uniform(20.0, 120.0)
                with contextlib.suppress(Exception):
                    cut.ready_s = self.wait_ready(vm, offset)
                time.sleep(max(0.0, offset - (time.monotonic() - vm.started_at)))
                cut.reached = cut.ready_s is None
            else:
                cut.ready_s = self.wait_ready(vm, READY_TIMEOUT_S)
                if moment == "any":
                    time.sleep(self.rng.uniform(0.0, 30.0))
                    cut.reached = True
                else:
                    cut.reached = self.wait_moment(moment, vm)
        except Exception as exc:  # noqa: BLE001 — a boot that never got READY is itself a finding
            log.error("cut %d: %s", number, str(exc).splitlines()[0])
        cut.at_s = time.monotonic() - vm.started_at
        vm.kill()
        self.stores_at_cut.append(len(self.stored()))
        self.judge_boot(cut, vm.console)
        cut.card = read_data_partition(self.disk.path, self.work / "check")
        log.info(
            "cut %d: %s%s at %.0f s (READY %s), fsck %s, integrity %s",
            number,
            moment,
            "" if cut.reached else " (missed: cut anyway)",
            cut.at_s,
            "-" if cut.ready_s is None else f"{cut.ready_s:.0f} s",
            cut.card["fsck_exit"],
            sorted(set(cut.card["integrity"].values())),
        )
        return cut

    def stored(self) -> list[str]:
        """SOP Instance UIDs of every C-STORE Orthanc received, in order."""
        try:
            return self.orthanc.c_store_log.read_text().split()
        except FileNotFoundError:
            return []

    def stored_twice_in_one_boot(self) -> list[str]:
        """UIDs the gateway sent twice with no cut between: a re-send no power cut explains."""
        seen: set[tuple[str, int]] = set()
        twice = []
        for index, uid in enumerate(self.stored()):
            boot = sum(1 for boundary in self.stores_at_cut if boundary <= index)
            if (uid, boot) in seen:
                twice.append(uid)
            seen.add((uid, boot))
        return twice

    @staticmethod
    def judge_boot(cut: Cut, console: str) -> None:
        cut.guest_fsck = GUEST_FSCK.findall(console)
        cut.failed_units = FAILED_UNIT.findall(console)

    def drain(self) -> dict[str, Any]:
        """Last boot: the cart stops, everything acknowledged must reach Orthanc and be committed."""
        vm = self.machine()
        vm.boot()
        ready_s = None
        drained = False
        try:
            ready_s = self.wait_ready(vm, READY_TIMEOUT_S)
            self.cart.stopping.set()
            self.cart.stopped.wait(600)
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            wanted = set(self.cart.acknowledged)
            while time.monotonic() < deadline and not wanted <= self.orthanc.sop_instance_uids():
                time.sleep(5)
            # then quiet: no send and no report for longer than the gateway waits before it asks
            # again for a commitment (a report lost with the power), so the outbox is settled
            while time.monotonic() < deadline and (
                self.pacs.active or time.monotonic() - max(self.pacs.last_data_at, self.reports.last_data_at) < QUIET_S
            ):
                time.sleep(2)
            drained = wanted <= self.orthanc.sop_instance_uids()
        except Exception as exc:  # noqa: BLE001
            log.error("drain: %s", str(exc).splitlines()[0])
        vm.kill()
        final = Cut(0, "final")
        self.judge_boot(final, vm.console)
        final.card = read_data_partition(self.disk.path, self.work / "check")
        final.ready_s = ready_s
        return {"cut": final, "drained": drained}

    def run(self, cuts: int, budget_s: float = 0.0) -> dict[str, Any]:
        began = time.monotonic()
        threading.Thread(target=self.cart.run, daemon=True, name="cart").start()
        for number in range(1, cuts + 1):
            if budget_s and self.cuts and time.monotonic() - began > budget_s:
                log.info("time budget spent after %d cuts: draining", len(self.cuts))
                break
            self.cuts.append(self.one_cut(number))
            # so far (nothing drained yet: `lost` is only final after the last boot)
            (self.work / "so-far.json").write_text(json.dumps(self.per_cut(), indent=1))
        end = self.drain()
        return self.summary(end, time.monotonic() - began)

    def per_cut(self) -> list[dict[str, Any]]:
        return [
            {
                "cut": c.number,
                "moment": c.moment,
                "reached": c.reached,
                "at_s": round(c.at_s),
                "ready_s": None if c.ready_s is None else round(c.ready_s),
                "journal_replayed": c.card["journal_replayed"],
                "fsck_exit": c.card["fsck_exit"],
                "guest_fsck": [ln.strip() for ln in c.guest_fsck if not ln.strip().startswith("e2fsck ")],
                "integrity": sorted(set(c.card["integrity"].values())),
                "outbox": dict(collections.Counter(s for _k, s, _n in c.card["outbox"])),
            }
            for c in self.cuts
        ]

    def summary(self, end: dict[str, Any], wall_s: float) -> dict[str, Any]:
        final: Cut = end["cut"]
        every = [*self.cuts, final]
        acknowledged = set(self.cart.acknowledged)
        in_orthanc = self.orthanc.sop_instance_uids()
        c_stores = self.orthanc.c_stores()
        boots = [c.ready_s for c in every if c.ready_s is not None]
        stuck = [(k, s) for k, s, _n in final.card["outbox"] if s not in DELIVERED]
        integrity_failures = [
            f"cut {c.number}: {name}: {result}"
            for c in every
            for name, result in c.card["integrity"].items()
            if result != "ok"
        ]
        fsck_repairs = [
            f"cut {c.number}: host e2fsck -fn exit {c.card['fsck_exit']}: {c.card['fsck_problems'][:3]}"
            for c in every
            if c.card["fsck_exit"] != 0
        ] + [
            f"boot after cut {c.number - 1}: guest fsck: {line}"
            for c in every
            for line in c.guest_fsck
            if not FSCK_BENIGN.search(line.strip())
        ]
        moments: dict[str, dict[str, int]] = {}
        for c in self.cuts:
            entry = moments.setdefault(c.moment, {"cuts": 0, "reached": 0})
            entry["cuts"] += 1
            entry["reached"] += int(c.reached)
        return {
            "cuts": len(self.cuts),
            "moments": moments,
            "cache": CACHE_MODE,
            "acknowledged": len(acknowledged),
            "received": len(acknowledged & in_orthanc),
            "lost": len(acknowledged - in_orthanc),
            "lost_uids": sorted(acknowledged - in_orthanc),
            "duplicated": sum(1 for uid in acknowledged if c_stores.get(uid, 0) > 1),
            "stored_twice": {uid: n for uid, n in c_stores.items() if n > 1},
            # a cut between Orthanc's store and the gateway's record of its Success forces a
            # re-send (the same SOP Instance UID: Orthanc keeps one instance); within one boot
            # nothing explains one
            "duplicated_same_boot": len(self.stored_twice_in_one_boot()),
            "orthanc_instances": len(self.orthanc.instances()),
            "unacknowledged_in_orthanc": len(in_orthanc - acknowledged),
            "cart_attempts": self.cart.attempts,
            "fsck_repairs": len(fsck_repairs),
            "fsck_repair_details": fsck_repairs,
            "journal_replays": sum(1 for c in every if c.card["journal_replayed"]),
            "guest_fsck_lines": sum(len(c.guest_fsck) for c in every),
            "integrity_failures": len(integrity_failures),
            "integrity_details": integrity_failures,
            "databases": sorted(final.card["integrity"]),
            "failed_units": sorted({u for c in every for u in c.failed_units}),
            "drained": end["drained"],
            "stuck": len(stuck),
            "stuck_items": stuck[:20],
            "interrupted_sends_max": max((n for _k, _s, n in final.card["outbox"]), default=0),
            "boot_s": {
                "n": len(boots),
                "min": round(min(boots), 1) if boots else None,
                "median": round(statistics.median(boots), 1) if boots else None,
                "max": round(max(boots), 1) if boots else None,
            },
            "boots": self.boots,
            "boots_never_ready": sum(1 for c in self.cuts if c.ready_s is None and c.moment != "boot")
            + int(final.ready_s is None),
            "wall_s": round(wall_s),
            "per_cut": self.per_cut(),
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cuts", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--image", default=os.environ.get("LASTMILE_IMAGE", ""), help="built image (LASTMILE_IMAGE)")
    ap.add_argument("--resume", action="store_true", help="go on with --workdir's card and Orthanc (--cuts 0: drain)")
    ap.add_argument("--budget-min", type=float, default=0.0, help="start no cut after this many minutes (0: none)")
    ap.add_argument("--workdir", default="", help="where the card copy, consoles and Orthanc go (default: a temp dir)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if not args.image or not Path(args.image).is_file():
        print("bench/power_cut.py: give the built image (--image or LASTMILE_IMAGE)", file=sys.stderr)
        return 2
    cd.reexec_in_private_netns()
    for tool in ("qemu-system-aarch64", "qemu-io", "qemu-img", "mcopy", "sfdisk", "e2fsck", "debugfs", "Orthanc"):
        if shutil.which(tool) is None:
            print(f"bench/power_cut.py: {tool} is missing (scripts/setup.sh --test installs it)", file=sys.stderr)
            return 2
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="power-cut-"))
    work.mkdir(parents=True, exist_ok=True)
    campaign = Campaign(Path(args.image), work, args.seed, resume=args.resume)
    try:
        result = campaign.run(args.cuts, args.budget_min * 60)
    finally:
        campaign.orthanc.stop()
    result["workdir"] = str(work)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    ok = not (result["lost"] or result["integrity_failures"] or result["fsck_repairs"] or result["stuck"])
    return 0 if ok and result["drained"] else 1


if __name__ == "__main__":
    sys.exit(main())
