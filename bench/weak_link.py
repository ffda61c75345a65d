"""Forwarding over village links: Lastmile vs dcmtk's storescu through an emulated link into Orthanc.

Run as root (it puts itself, Orthanc and the link relay in a private network namespace):

    .venv/bin/python bench/weak_link.py [--profile P] [--studies N] [--json] [--cpu-share 0.25]

For each link profile (tests/link_emulator.py: lan, 4g, 3g, edge, satellite), with the same ECG
objects, each sender into a fresh Orthanc through the same relay:
- Lastmile's forward service (its own process, the configured associations, deflate on);
- storescu, one association, uncompressed; storescu `-xd` (proposing deflate).
Figures per profile:
- floor_ratio       = Lastmile's time to store all (from the forward service's READY; with its
                      process start-up as `lastmile_with_start_s`) ÷ the floor (deflated wire
                      bytes ÷ uplink rate + 1 RTT). `lan` has no link rate, so no floor: null
                      (there the CPU and the peer set the pace: bench/forward.py). On a lossy link
                      (edge) `floor_with_stalls_ratio` also counts the time the emulated loss
                      stalled the link during Lastmile's run (any sender pays it; the floor not);
- storescu_xd_ratio = Lastmile's time ÷ storescu -xd's;
- stat_ratio        = time from a STAT ECG made durable (while 100 routine studies wait and are in
                      flight) to Orthanc having it ÷ that one object's own floor on the link: its
                      bytes ÷ uplink rate + the one-way delay (alone on the link, an association
                      open already). `--stat-trials` STAT studies (default 5) come one after
                      another, each at another moment of the routine object then on the link
                      (0, 1/5, 2/5 ... of its time after the one before was stored): the median,
                      and `stat_ratio_max` the worst; `stat_ratio_rtt` the median against the
                      bulk's floor function (bytes ÷ rate + 1 RTT: the gateway knows it
                      stored); `stat_ratio_with_pacs` against the floor plus the PACS's own
                      time to store the object (`pacs_store_s`: C-STORE to response on
                      loopback, association open - no sender avoids it);
                      `stat_ratio_with_stalls` (edge) the median against the floor plus the
                      time the emulated loss held the uplink while that STAT study was on its
                      way (a stall begun on a routine segment before it came included: each
                      trial's `stat_N_stall_s`; `stat_N_queued_s`: how long the uplink
                      still needed for what it held when the study became durable, and
                      `stat_N_since_stall_s` since the uplink's last stall ended then). The STAT run is the
                      same gateway after an outage: its forwarder starts with the link rate the bulk run measured and
                      kept in the outbox (`stat_warm` 1; with --stat-only nothing was measured
                      before: 0, the first objects go unpaced). `stat_routine_waiting_min`: the
                      fewest routine studies still waiting when a STAT one came (never 0).
                      `cold_stat_ratio`, `cold_stat_ratio_max` (and every `cold_stat_...`): the
                      same STAT run on a new gateway whose first backlog it is (nothing
                      measured before: as --stat-only), where the pacer learns the link's rate
                      while the STAT studies come.
`--cpu-share 0.25`: Lastmile's forward process and storescu each get a quarter of one core (a CPU
cgroup's quota: bench/cpu_share.py), the nearest this machine comes to a Pi-class gateway; the
relay and Orthanc keep the whole machine.
Goals (issue 16): floor_ratio ≤ 1.10 everywhere; storescu_xd_ratio ≤ 0.6 on edge and satellite;
stat_ratio ≤ 1.5 everywhere. With --json the last line is one JSON object: profile → figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cpu_share import CpuShare  # (after the path: run as a script)

if TYPE_CHECKING:
    from tests.peers import OrthancServer

ORDER = ("lan", "4g", "3g", "edge", "satellite")
STAT_BACKLOG = 100
# the STAT figures that are ratios to the STAT object's floor (null without a link rate: lan)
STAT_RATIO_KEYS = ("stat_ratio", "stat_ratio_max", "stat_ratio_rtt", "stat_ratio_with_stalls", "stat_ratio_with_pacs")


def in_private_netns() -> bool:
    return {n for _i, n in socket.if_nameindex()} <= {"lo"}


def worker(cfg: str, stop_file: str) -> None:
    """The real forward service, in its own process, until the bench creates `stop_file`."""
    sys.modules.setdefault("numpy", None)  # before anything imports pydicom, as `lastmile forward` does
    from lastmile.config import load_config
    from lastmile.services.forward import ForwardService

    if os.environ.get("BENCH_LOG"):  # --log: what the forwarder did, with times, on stderr
        import logging

        logging.basicConfig(
            level=logging.DEBUG if os.environ["BENCH_LOG"] == "debug" else logging.INFO,
            format="%(asctime)s.%(msecs)03d %(threadName)s %(name)s %(message)s",
        )
        if os.environ["BENCH_LOG"] == "uploader":  # ours in detail, pynetdicom's not (its CPU)
            logging.getLogger("uploader").setLevel(logging.DEBUG)
    service = ForwardService(load_config(cfg))
    stop = threading.Event()
    print("ready", flush=True)
    while not os.path.exists(stop_file):
        wait = service.step(stop)
        if wait:
            time.sleep(min(wait, 0.02))
    service.close()


def enqueue_stat(cfg: str, recording, key: str) -> tuple[float, str, int]:
    """Make a STAT study durable (in the bench's intake process, not the relay's): when
    (time.monotonic, one clock for every process), its SOP Instance UID and its size. In the
    relay's process the intake (quality check, DICOM build, deflate) held the GIL for up to ~80 ms
    at a time: the relay's thread froze, the link idled, then took at once the routine bytes that
    had piled up meanwhile - and the STAT study waited behind them (the 4G worst, 1.6-2.0)."""
    from lastmile.config import load_config
    from lastmile.data_dir import open_outbox
    from lastmile.ecg.intake import enqueue_recording

    config = load_config(cfg)
    with open_outbox(config) as outbox:
        item = enqueue_recording(outbox, recording, config, key=key).item
        return time.monotonic(), str(item.meta["sop_instance_uid"]), item.size


def warm_intake() -> None:
    """The intake process imports what it needs before the first trial."""
    import lastmile.ecg.intake  # noqa: F401


def write_config(path: Path, data_dir: Path, port: int, listen: int) -> None:
    path.write_text(
        f'[gateway]\ndata_dir = "{data_dir}"\n[outbox]\nmin_free_mb = 1\n'
        f'[reading_center]\nhost = "127.0.0.1"\nport = {port}\ncalled_ae = "READING_CENTER"\n'
        f'calling_ae = "CLINIC01"\nlisten_port = {listen}\nlisten_host = "127.0.0.1"\n'
        "timeout_s = 120.0\n"
    )


class Forwarder:
    """The forward service as a child process of the bench."""

    def __init__(self, cfg: Path, tmp: Path, *, log: bool = False, share: CpuShare | None = None) -> None:
        self.stop_file = tmp / f"stop-{cfg.stem}"
        argv = [sys.executable, __file__, "--worker", str(cfg), str(self.stop_file)]
        self.proc = subprocess.Popen(
            share.wrap(argv) if share else argv,
            stdout=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "MALLOC_ARENA_MAX": "2",
                **({"BENCH_LOG": os.environ.get("BENCH_LOG", "1")} if log else {}),
            },
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("forward worker did not start")

    def close(self) -> None:
        self.stop_file.touch()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def stored(orthanc: OrthancServer) -> int:
    """How many instances the PACS holds."""
    return int(orthanc.statistics()["CountInstances"])


def wait_until(check, timeout_s: float, what: str, poll_s: float = 0.01) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(poll_s)
    raise TimeoutError(what)


def run_profile(
    name: str,
    n: int,
    tmp: Path,
    files: Path,
    deflated_bytes: int,
    recordings: list,
    stat_recording,
    *,
    log: bool = False,
    stat_only: bool = False,
    stat_after: int = 1,
    stat_trials: int = 5,
    share: CpuShare | None = None,
) -> dict[str, float | None]:
    from lastmile.config import load_config
    from lastmile.data_dir import open_outbox
    from lastmile.ecg.intake import enqueue_recording
    from tests.link_emulator import PROFILES, LinkRelay
    from tests.peers import OrthancServer, free_port, gateway_modality
    from uploader.ecg_forwarder import LINK_STATUS_NAME

    profile = PROFILES[name]
    storescu = shutil.which("storescu")
    assert storescu
    listen = free_port()
    env = {**os.environ, "TCP_NODELAY": "1"}
    out: dict[str, float | None] = {}

    def storescu_time(*options: str) -> float:
        with (
            OrthancServer(
                tmp / f"orthanc-{name}-scu{len(options)}", modalities=gateway_modality("CLINIC01", listen)
            ) as orthanc,
            LinkRelay(profile, "127.0.0.1", orthanc.dicom_port) as relay,
        ):
            t0 = time.monotonic()
            argv = [
                storescu,
                "-aet",
                "CLINIC01",
                "-aec",
                "READING_CENTER",
                *options,
                "-to",
                "120",
                "-ta",
                "120",
                "-td",
                "120",
                "127.0.0.1",
                str(relay.port),
                "+sd",
                str(files),
            ]
            subprocess.run(
                share.wrap(argv) if share else argv,
                check=True,
                env=env,
                capture_output=True,
            )
            took = time.monotonic() - t0
            assert len(orthanc.instances()) == n, "storescu did not store everything"
        return took

    link_kept = None  # the link rate the bulk run's forwarder measured and kept
    if not stat_only:
        out["storescu_s"] = storescu_time()
        out["storescu_xd_s"] = storescu_time("-xd")

        # Lastmile: everything queued first (as after an outage), then the service starts
        with (
            OrthancServer(tmp / f"orthanc-{name}-lm", modalities=gateway_modality("CLINIC01", listen)) as orthanc,
            LinkRelay(profile, "127.0.0.1", orthanc.dicom_port) as relay,
        ):
            cfg = tmp / f"lm-{name}.toml"
            write_config(cfg, tmp / f"data-{name}", relay.port, listen)
            config = load_config(cfg)
            with open_outbox(config) as outbox:
                for i, r in enumerate(recordings):
                    enqueue_recording(outbox, r, config, key=f"bench-{i}")
            t0 = time.monotonic()
            fwd = Forwarder(cfg, tmp, log=log, share=share)
            # the service is running when a link comes back: timed from its READY (process start-up,
            # seconds on a loaded machine, is reported apart)
            t_ready = time.monotonic()
            try:
                t1 = wait_until(
                    lambda: stored(orthanc) >= n,
                    3600,
                    f"{name}: Lastmile did not store {n}",
                    poll_s=0.02,
                )
            finally:
                fwd.close()
            out["lastmile_s"] = t1 - t_ready
            # the link's stalls (emulated loss) are not in the floor: how much of the time they took
            assert relay.up is not None
            out["stall_s"] = relay.up.stalls * profile.stall_s
            # where the time went: the uplink's first byte after READY; then, to its last byte, the
            # time it carried nothing (waits between objects, and the association set-ups,
            # commitments and releases: their round trips), stalls apart
            assert relay.up.first_at is not None
            out["uplink_gaps_s"] = relay.up.free_at - relay.up.first_at - relay.up.busy_s - out["stall_s"]
            out["link_busy_s"] = relay.up.busy_s
            out["ready_to_first_byte_s"] = relay.up.first_at - t_ready  # (the loop's clock is time.monotonic)
            out["last_byte_to_stored_s"] = t1 - relay.up.free_at
            out["lastmile_with_start_s"] = t1 - t0
            with open_outbox(config) as outbox:
                link_kept = outbox.status(LINK_STATUS_NAME)
        out["floor_s"] = profile.floor_s(deflated_bytes)
        # no link rate (lan): the link sets no floor (the CPU and the peer do: bench/forward.py)
        limited = profile.up_bps is not None
        out["floor_ratio"] = out["lastmile_s"] / out["floor_s"] if limited else None
        out["floor_with_stalls_ratio"] = out["lastmile_s"] / (out["floor_s"] + out["stall_s"]) if limited else None
        out["storescu_xd_ratio"] = out["lastmile_s"] / out["storescu_xd_s"]

    # STAT overtakes: 100 routine waiting and in flight, then STAT studies become durable one
    # after another, each at another moment of the routine object on the link
    # - as the same gateway after an outage (it remembers the link's rate from the bulk run) and,
    # keys `cold_...`, as a new gateway whose first backlog it is (nothing measured: the first
    # objects go unpaced - a STAT study then waited behind an estimate 1.6x the link's, 0df995e)
    # a routine object's time on the link: the STAT studies come at fractions of it after a
    # routine one was stored (the next is then on the link)
    object_s = profile.link_time_s(deflated_bytes // n)

    def stat_trial(
        trial: int, cfg: Path, relay: LinkRelay, orthanc: OrthancServer, intake: ProcessPoolExecutor
    ) -> dict[str, Any]:
        """One STAT study made durable behind the routine backlog: how long until the PACS had it."""
        before = stored(orthanc)
        wait_until(lambda: stored(orthanc) > before, 3600, f"{name}: the routine backlog stopped")
        time.sleep(object_s * trial / stat_trials)
        stalls_before = relay.stalls
        stat = replace(stat_recording, acquired_at=stat_recording.acquired_at + dt.timedelta(minutes=trial))
        # durable once add() committed; intake before it (quality check, DICOM build, deflate:
        # ~0.25 s here) is not the link's time
        t_durable, sop, size = intake.submit(enqueue_stat, str(cfg), stat, f"{cfg.stem}-{trial}").result()
        fig: dict[str, Any] = {"size": size}
        assert relay.up is not None
        # what the uplink still had to carry then (the modem buffer ahead of the STAT study, a
        # stall's rest included), in the link's seconds
        fig["queued_s"] = relay.up.queued_s_at(t_durable)
        ended = [b for _a, b in relay.up.stall_spans if b <= t_durable]
        fig["since_stall_s"] = t_durable - max(ended) if ended else None
        fig["waiting"] = STAT_BACKLOG - (stored(orthanc) - trial)  # routine not yet at the PACS
        if log:
            print(f"{dt.datetime.now().time()} bench: STAT {trial} durable", file=sys.stderr, flush=True)
        t_stored = wait_until(
            lambda: orthanc.instance_id_of(sop) is not None,
            3600,
            f"{name}: the STAT study never arrived",
            poll_s=0.005,
        )
        fig["s"] = t_stored - t_durable
        # the emulated loss's stalls meanwhile (either way; routine bytes' too): any sender pays
        # those that hold the STAT object's segments, the floor counts none
        fig["stalls"] = relay.stalls - stalls_before
        # ... and how long they held the uplink until its last byte left it (also a stall a
        # routine segment began before it came, which the count misses; the responses' way and
        # the one-way delay after hold nothing it waits for)
        fig["stall_s"] = relay.up.stalled_s(t_durable, t_stored - profile.rtt_s / 2)
        return fig

    def stat_figures(mode: str, kept: dict | None) -> dict[str, float | None]:
        """`stat_trials` STAT studies behind `STAT_BACKLOG` routine ones, on a gateway that keeps
        the link's rate `kept` (None: a new one); the keys without `mode`'s prefix."""
        with (
            OrthancServer(
                tmp / f"orthanc-{name}-{mode}stat", modalities=gateway_modality("CLINIC01", listen)
            ) as orthanc,
            LinkRelay(profile, "127.0.0.1", orthanc.dicom_port) as relay,
        ):
            cfg = tmp / f"{mode}stat-{name}.toml"
            write_config(cfg, tmp / f"data-{mode}stat-{name}", relay.port, listen)
            config = load_config(cfg)
            backlog = [recordings[i % len(recordings)] for i in range(STAT_BACKLOG)]
            with open_outbox(config) as outbox:
                for i, r in enumerate(backlog):
                    enqueue_recording(outbox, r, config, key=f"routine-{i}")
                if kept is not None:
                    # the same gateway after an outage: it remembers the link's rate from the bulk run
                    outbox.record_status(LINK_STATUS_NAME, kept, time.time())
            intake = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            intake.submit(warm_intake).result()
            fwd = Forwarder(cfg, tmp, log=log, share=share)
            try:
                # routine transfers are on the wire: the first `stat_after` have arrived
                wait_until(lambda: stored(orthanc) >= stat_after, 3600, f"{name}: no routine study arrived")
                trials = [stat_trial(t, cfg, relay, orthanc, intake) for t in range(stat_trials)]
            finally:
                fwd.close()
                intake.shutdown()
            pacs_s = pacs_store_s(config, stat_recording, orthanc.dicom_port, stat_trials)
        size = trials[-1]["size"]
        fig: dict[str, float | None] = {"stat_warm": float(kept is not None)}
        for t, trial in enumerate(trials):
            fig |= {f"stat_{t}_{k}": trial[k] for k in ("queued_s", "since_stall_s", "s", "stalls", "stall_s")}
        fig["stat_s"] = statistics.median(trial["s"] for trial in trials)
        fig["stat_floor_s"] = profile.arrival_floor_s(size)
        fig["pacs_store_s"] = pacs_s
        # every STAT study came while routine ones were still waiting (else it overtook nothing)
        fig["stat_routine_waiting_min"] = float(min(trial["waiting"] for trial in trials))
        if profile.up_bps is None:  # no link rate (lan): the STAT object's floor is its one-way delay only
            return fig | dict.fromkeys(STAT_RATIO_KEYS)
        ratios = [trial["s"] / profile.arrival_floor_s(trial["size"]) for trial in trials]
        fig["stat_ratio"] = statistics.median(ratios)
        fig["stat_ratio_max"] = max(ratios)
        # against the bulk's floor function (bytes ÷ rate + 1 RTT), as before
        fig["stat_ratio_rtt"] = statistics.median(trial["s"] / profile.floor_s(trial["size"]) for trial in trials)
        # against the floor + the stalls that held the link meanwhile
        fig["stat_ratio_with_stalls"] = statistics.median(
            trial["s"] / (profile.arrival_floor_s(trial["size"]) + trial["stall_s"]) for trial in trials
        )
        # against a floor that also holds the PACS's own storing (no sender avoids it): what is ours
        fig["stat_ratio_with_pacs"] = fig["stat_s"] / (fig["stat_floor_s"] + pacs_s)
        return fig

    for mode, kept in [("", link_kept)] + ([("cold_", None)] if link_kept is not None else []):
        out |= {mode + key: value for key, value in stat_figures(mode, kept).items()}
    return out


def pacs_store_s(config, recording, port: int, trials: int) -> float:
    """The PACS's own time to store a STAT object (median of `trials`): C-STORE to response on
    loopback, association open, the object's bytes ready - what no sender's link time includes."""
    from lastmile.ecg.intake import deflated_part10, station_of
    from lastmile.services.forward import forwarder_settings
    from uploader.dicom_ecg import build_ecg_dataset, mint_uids
    from uploader.dicom_store import StoreAssociation

    peer = replace(forwarder_settings(config).peer, host="127.0.0.1", port=port)
    times: list[float] = []
    with StoreAssociation(peer) as assoc:
        for _ in range(trials):
            # the object as intake makes it (deflated), not put in the outbox (where it would
            # wait to be sent); new UIDs each: a PACS answers an instance it has without storing it again
            payload = deflated_part10(build_ecg_dataset(recording, mint_uids(), station_of(config)))
            started = time.monotonic()
            if not assoc.store(payload).stored:
                raise RuntimeError("the PACS refused the STAT object stored directly")
            times.append(time.monotonic() - started)
    return statistics.median(times)


def ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", choices=ORDER, help="one profile (default: all)")
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    ap.add_argument("--log", action="store_true", help="the STAT run's forwarder log on stderr")
    ap.add_argument("--stat-only", action="store_true", help="only the STAT figure (no storescu, no bulk run)")
    ap.add_argument(
        "--stat-after",
        type=int,
        default=1,
        help="routine studies stored before the STAT one is made (1: the backlog has just started)",
    )
    ap.add_argument("--stat-trials", type=int, default=5, help="STAT studies, one after another (median, max)")
    ap.add_argument(
        "--cpu-share",
        type=float,
        metavar="CORES",
        help="Lastmile's forwarder and storescu each get this share of one core (0.25: a Pi-class CPU; bench/cpu_share.py)",
    )
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    if not in_private_netns():
        if os.geteuid() != 0:
            print("bench/weak_link.py: run as root (Orthanc must run in a private network namespace)")
            return 2
        os.execvp(
            "unshare",
            ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, *sys.argv],
        )
    if not shutil.which("storescu") or not shutil.which("Orthanc"):
        print("bench/weak_link.py: needs dcmtk (storescu) and Orthanc: run scripts/setup.sh --test")
        return 2

    from lastmile.config import Config
    from lastmile.data_dir import open_outbox
    from lastmile.demo.runner import demo_recordings
    from lastmile.ecg.intake import enqueue_recording
    from uploader.dicom_ecg import StationInfo, mint_uids, recording_to_dicom_bytes

    tmp = Path(tempfile.mkdtemp(prefix="lastmile-weak-"))
    n = args.studies
    recordings = [replace(r, stat=False) for r in demo_recordings(n, dt.datetime(2026, 11, 1, 8, tzinfo=dt.UTC))]
    stat_recording = replace(recordings[0], stat=True, acquired_at=recordings[0].acquired_at + dt.timedelta(hours=9))
    # storescu sends uncompressed Explicit VR LE files (what the builder makes); the floor counts
    # the deflated objects Lastmile stores and sends
    files = tmp / "files"
    files.mkdir()
    for i, r in enumerate(recordings):
        (files / f"{i:04d}.dcm").write_bytes(recording_to_dicom_bytes(r, mint_uids(), StationInfo()))
    probe = Config()
    probe.set_data_dir(tmp / "probe")
    probe.outbox.min_free_mb = 1
    with open_outbox(probe) as outbox:
        deflated = sum(enqueue_recording(outbox, r, probe, key=f"p{i}").item.size for i, r in enumerate(recordings))

    results: dict[str, dict[str, float]] = {}
    share = CpuShare(args.cpu_share, "weak-link") if args.cpu_share else None
    for name in (args.profile,) if args.profile else ORDER:
        with contextlib.nullcontext() if share is None else share:
            results[name] = run_profile(
                name,
                n,
                tmp,
                files,
                deflated,
                recordings,
                stat_recording,
                log=args.log,
                stat_only=args.stat_only,
                stat_after=args.stat_after,
                stat_trials=args.stat_trials,
                share=share,
            )
        r = results[name]
        stat = (
            f"stat {r['stat_s']:.3f} s / {r['stat_floor_s']:.3f} s = {ratio(r['stat_ratio'])} "
            f"(max {ratio(r['stat_ratio_max'])}; ÷ bytes/rate + RTT {ratio(r['stat_ratio_rtt'])}; "
            f"÷ floor + the PACS storing it {r['pacs_store_s']:.3f} s {ratio(r['stat_ratio_with_pacs'])}"
            + (
                f"; ÷ floor + the stalls that held it {ratio(r['stat_ratio_with_stalls'])})"
                if any(r.get(f"stat_{t}_stall_s") for t in range(args.stat_trials))
                else ")"
            )
            + (
                f"; a new gateway's first backlog: {ratio(r['cold_stat_ratio'])} (max {ratio(r['cold_stat_ratio_max'])})"
                if "cold_stat_ratio" in r
                else ""
            )
        )
        if args.stat_only:
            print(f"{name:10} {stat}", flush=True)
            continue
        print(
            f"{name:10} Lastmile {r['lastmile_s']:7.2f} s (with start-up {r['lastmile_with_start_s']:.2f})  "
            f"floor {r['floor_s']:7.2f} s  "
            f"storescu {r['storescu_s']:7.2f} s  -xd {r['storescu_xd_s']:7.2f} s  "
            f"(Lastmile's link stalled {r['stall_s']:.0f} s: ÷ floor + stalls {ratio(r['floor_with_stalls_ratio'])})  |  "
            f"floor_ratio {ratio(r['floor_ratio'])}  storescu_xd_ratio {r['storescu_xd_ratio']:.2f}  {stat}",
            flush=True,
        )
    print(
        f"({n} studies, {deflated / n / 1024:.0f} KB each deflated; {args.stat_trials} STAT behind {STAT_BACKLOG} routine; "
        "goals: floor_ratio <= 1.10, storescu_xd_ratio <= 0.6 on edge/satellite, stat_ratio <= 1.5)"
    )
    if args.json:
        print(json.dumps({k: {m: v if v is None else round(v, 3) for m, v in r.items()} for k, r in results.items()}))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
