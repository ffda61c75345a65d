"""What polling for reports costs on a metered link, and how fast a STAT report comes back.

Run as root (it puts itself and Orthanc in a private network namespace):

    .venv/bin/python bench/report_poll.py [--studies 50] [--samples 3]

The gateway's real poller talks to Orthanc through a counting TCP relay on loopback. Prints:
- bytes per hour spent polling with N outstanding studies and nothing new (goal ≤ 100 KB/h), for
  three mixes of study ages, on a simulated clock (the rounds are real, against Orthanc; the clock
  jumps to the next due round): counted as TCP payload at the relay, and as IP packets on `lo`
  (headers included: what a 4G link carries), beside a reference in the same run — the same
  schedule asking one study per C-FIND (no batching);
- bytes on the wire for one STAT study's first hour (polled every reports.stat_poll_s), alone, with
  nothing new and with its report arriving after 10 minutes, with and without the association kept
  between rounds (reports.keep_association_s), and how many associations that opened;
- time from a report stored at the PACS (REST) to it being in the gateway's clinic.db, for a STAT
  study in its first hour, in real time with the poller thread (goal ≤ 60 s).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HOUR = 3600.0


def in_private_netns() -> bool:
    return {n for _i, n in socket.if_nameindex()} <= {"lo"}


def lo_bytes() -> int:
    """Bytes sent on loopback (each packet once, with its IP and TCP headers)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        if line.strip().startswith("lo:"):
            return int(line.split(":", 1)[1].split()[8])
    raise RuntimeError("no loopback interface")


class CountingRelay:
    """Listens on a loopback port and relays every connection to `target`, counting payload bytes
    both ways and connections. Both legs are on `lo`: halve its counter for one leg."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.bytes = 0
        self.connections = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name="relay").start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                with self._lock:
                    self.bytes += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.bytes, self.connections


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=50)
    ap.add_argument("--samples", type=int, default=3, help="STAT reports timed in real time")
    ap.add_argument("--no-hour", action="store_true", help="skip the bytes-per-hour part")
    ap.add_argument("--no-stat-hour", action="store_true", help="skip the STAT-first-hour part")
    ap.add_argument(
        "--realtime-stat-s", type=float, default=0.0, help="also poll one STAT study in real time this long"
    )
    ap.add_argument("--stat-poll-s", type=float, help="reports.stat_poll_s (default: the configured default)")
    ap.add_argument("--keep-s", type=float, help="reports.keep_association_s (default: the configured default)")
    args = ap.parse_args()
    if not in_private_netns():
        if os.geteuid() != 0:
            print("bench/report_poll.py: run as root (Orthanc must run in a private network namespace)")
            return 2
        os.execvp(
            "unshare",
            ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, *sys.argv],
        )

    import datetime as dt
    import logging

    from lastmile.config import Config
    from lastmile.demo.cardiologist import ecg_report_sr, part10
    from lastmile.reports.poller import PollerThread
    from lastmile.reports.service import make_poller
    from lastmile.reports.store import ReportStore, SentStudy
    from lastmile.services.forward import peer_settings
    from tests.peers import EcgPayload, OrthancServer, ecg_payloads, free_port
    from tests.report_peers import to_read

    logging.basicConfig(level=logging.INFO if os.environ.get("BENCH_DEBUG") else logging.ERROR)
    n = args.studies
    with tempfile.TemporaryDirectory(prefix="bench-report-poll-") as tmp_name:
        tmp = Path(tmp_name)
        orthanc = OrthancServer(tmp / "orthanc", modalities={"gw": ["CLINIC01", "127.0.0.1", free_port()]}).start()
        try:
            payloads = [ecg_payloads(1)[0] for _ in range(n)]  # one ECG per study
            stat_payload = ecg_payloads(1)[0]
            for p in [*payloads, stat_payload]:  # the ECG studies the gateway sent, at the PACS
                orthanc.rest("/instances", "POST", p.data)
            relay = CountingRelay(orthanc.dicom_port)

            def config_for(name: str) -> Config:
                c = Config()
                c.set_data_dir(tmp / name)
                rc = c.reading_center
                rc.host, rc.port, rc.called_ae, rc.calling_ae = "127.0.0.1", relay.port, orthanc.aet, "CLINIC01"
                return c

            def hour_of_polling(name: str, ages_s: list[float], stat: bool, batch_size: int) -> dict:
                """Bytes over the second simulated hour (the first one settles the schedule). With
                `stat`, a STAT study is sent as that hour begins (its 30 s hurry inside it)."""
                config = config_for(name)
                config.reports.batch_size = batch_size
                t0 = time.time()
                now = [t0]

                def sent(p: EcgPayload, at: float, is_stat: bool = False) -> SentStudy:
                    return SentStudy(p.study_uid, dt.datetime.fromtimestamp(at, dt.timezone.utc), stat=is_stat)

                with ReportStore.open(config.data_dir) as store:
                    for p, age in zip(payloads, ages_s, strict=True):
                        store.record_sent(sent(p, t0 - age))
                    poller = make_poller(config, store, peer_settings(config.reading_center))
                    poller.clock = lambda: now[0]
                    measured = {"rounds": 0, "asked": 0}
                    start = None
                    while now[0] < t0 + 2 * HOUR:
                        if start is None and now[0] >= t0 + HOUR:
                            start = (relay.snapshot(), lo_bytes(), dict(measured))
                            if stat:
                                store.record_sent(sent(stat_payload, now[0], True))
                        result = poller.run_round()
                        assert result.error is None and result.fault is None, result
                        if result.asked:
                            measured["rounds"] += 1
                            measured["asked"] += result.asked
                        wait = poller.next_due_in()
                        step = max(wait if wait is not None else HOUR, 0.001)
                        if now[0] < t0 + HOUR:  # never jump over the start of the measured hour
                            step = min(step, t0 + HOUR - now[0])
                        now[0] += step
                    assert start is not None
                    (payload0, conns0), lo0, counts0 = start
                    payload1, conns1 = relay.snapshot()
                    return {
                        "payload": payload1 - payload0,
                        "wire": (lo_bytes() - lo0) / 2,  # two legs through the relay
                        "connections": conns1 - conns0,
                        "rounds": measured["rounds"] - counts0["rounds"],
                        "asked": measured["asked"] - counts0["asked"],
                    }

            def stat_first_hour(name: str, keep_s: float, report_after_s: float | None) -> dict:
                """One STAT study alone, its first hour on a simulated clock (real rounds): bytes on
                the wire, associations opened; with `report_after_s`, its report lands then."""
                config = config_for(name)
                config.reports.keep_association_s = keep_s
                config.reports.stat_poll_s = stat_s
                ecg = ecg_payloads(1)[0]
                orthanc.rest("/instances", "POST", ecg.data)
                t0 = time.time()
                now = [t0]
                study = SentStudy(ecg.study_uid, dt.datetime.fromtimestamp(t0, dt.timezone.utc), stat=True)
                report = ecg_report_sr(to_read(study), findings=["VT"], impression="Ventricular tachycardia")
                rest_bytes = 0
                with ReportStore.open(config.data_dir) as store:
                    store.record_sent(study)
                    poller = make_poller(config, store, peer_settings(config.reading_center))
                    poller.clock = lambda: now[0]
                    (payload0, conns0), lo0 = relay.snapshot(), lo_bytes()
                    rounds = stored = 0
                    while now[0] < t0 + HOUR:
                        if report_after_s is not None and now[0] >= t0 + report_after_s and not stored:
                            before = lo_bytes()
                            orthanc.rest("/instances", "POST", part10(report))
                            rest_bytes += lo_bytes() - before  # the PACS's REST upload is not polling
                            report_after_s = None
                        result = poller.run_round()
                        assert result.error is None and result.fault is None, result
                        rounds += bool(result.asked)
                        stored += result.stored
                        wait = poller.next_due_in()
                        now[0] += max(wait if wait is not None else HOUR, 0.001)
                    getattr(poller, "close", lambda: None)()  # (absent before the association was kept)
                    kept = getattr(poller, "queries", None)
                    payload1, conns1 = relay.snapshot()
                    return {
                        "wire": (lo_bytes() - lo0 - rest_bytes) / 2,
                        "payload": payload1 - payload0,
                        "connections": conns1 - conns0,
                        "rounds": rounds,
                        "stored": stored,
                        "reused": kept.reused if kept else 0,
                    }

            if not args.no_stat_hour:
                stat_s = args.stat_poll_s or Config().reports.stat_poll_s
                keep_default = (
                    args.keep_s if args.keep_s is not None else getattr(Config().reports, "keep_association_s", 0.0)
                )
                print(
                    f"one STAT study's first hour, alone (simulated clock, real rounds with Orthanc), stat_poll_s {stat_s:g}"
                )
                print(
                    f"{'case':44} {'rounds':>6} {'assocs':>6} {'reused':>6} {'stored':>6} {'payload KB':>10} {'wire KB':>8}"
                )
                for keep_s in sorted({0.0, keep_default}):
                    for report_after in (None, 600.0):
                        r = stat_first_hour(f"stat-{keep_s}-{report_after}", keep_s, report_after)
                        label = (
                            f"{'kept (keep_association_s ' + format(keep_s, 'g') + ')' if keep_s else 'new association per round'}"
                            f", {'report at 10 min' if report_after else 'nothing new'}"
                        )
                        print(
                            f"{label:44} {r['rounds']:>6} {r['connections']:>6} {r['reused']:>6} {r['stored']:>6} "
                            f"{r['payload'] / 1024:>10.1f} {r['wire'] / 1024:>8.1f}"
                        )

            rng = random.Random(14)
            mixes = {
                "spread over 14 days": ([rng.uniform(0, 14 * 24 * HOUR) for _ in range(n)], False),
                "all sent in the last hour": ([rng.uniform(0, HOUR) for _ in range(n)], False),
                "14 days + a STAT's first hour": ([rng.uniform(0, 14 * 24 * HOUR) for _ in range(n)], True),
                "last hour + a STAT's first hour": ([rng.uniform(0, HOUR) for _ in range(n)], True),
            }
            if not args.no_hour:
                print(
                    f"report polling, {n} outstanding studies, nothing new (simulated hour, real rounds with Orthanc)"
                )
                print(
                    f"{'mix':34} {'rounds':>6} {'asks':>5} {'payload KB/h':>13} {'wire KB/h':>10} "
                    f"{'unbatched KB/h':>15} {'ratio':>6}"
                )
            for label, (ages, stat) in ({} if args.no_hour else mixes).items():
                batched = hour_of_polling(f"b-{label}", ages, stat, batch_size=50)
                single = hour_of_polling(f"s-{label}", ages, stat, batch_size=1)
                print(
                    f"{label:34} {batched['rounds']:>6} {batched['asked']:>5} {batched['payload'] / 1024:>13.1f} "
                    f"{batched['wire'] / 1024:>10.1f} {single['wire'] / 1024:>15.1f} "
                    f"{batched['wire'] / max(single['wire'], 1):>6.2f}"
                )
            if not args.no_hour:
                print(
                    "goal: wire KB/h <= 100 with nothing new; a STAT study is asked about every "
                    f"{Config().reports.stat_poll_s:g} s in its first hour"
                )

            if args.realtime_stat_s:
                # -- a STAT study polled in real time: does the PACS's idle timeout leave the kept
                # association alone? (Orthanc's default DicomScpTimeout, 30 s)
                config = config_for("realtime-stat")
                ecg = ecg_payloads(1)[0]
                orthanc.rest("/instances", "POST", ecg.data)
                round_bytes: list[int] = []
                with ReportStore.open(config.data_dir) as store:
                    store.record_sent(SentStudy(ecg.study_uid, dt.datetime.now(dt.timezone.utc), stat=True))
                    poller = make_poller(config, store, peer_settings(config.reading_center))
                    thread = PollerThread(poller, on_round=lambda r: round_bytes.append(r.bytes))
                    (payload0, conns0), lo0 = relay.snapshot(), lo_bytes()
                    thread.start()
                    time.sleep(args.realtime_stat_s)
                    thread.stop()
                    getattr(poller, "close", lambda: None)()
                    (payload1, conns1), lo1 = relay.snapshot(), lo_bytes()
                    kept = getattr(poller, "queries", None)
                print(
                    f"one STAT study polled in real time for {args.realtime_stat_s:g} s (stat_poll_s "
                    f"{config.reports.stat_poll_s:g}, keep_association_s "
                    f"{getattr(config.reports, 'keep_association_s', 0):g}, Orthanc's default idle timeout): "
                    f"{len(round_bytes)} rounds, {conns1 - conns0} associations, payload per round {round_bytes}, "
                    f"{(payload1 - payload0) / 1024:.1f} KB payload, {(lo1 - lo0) / 2 / 1024:.1f} KB on the wire"
                    + (f"; closed by Orthanc: {kept.closed_by_peer}" if kept is not None else "")
                )
            if args.samples < 1:
                return 0
            # -- time to availability, real time -----------------------------------------------
            # Each sample is a new STAT study (a final report ends its hurry), sent a few seconds
            # before, among the N outstanding routine ones; its report lands at a random moment.
            config = config_for("availability")
            latencies = []
            with ReportStore.open(config.data_dir) as store:
                t0 = time.time()
                for i, p in enumerate(payloads):
                    store.record_sent(SentStudy(p.study_uid, dt.datetime.fromtimestamp(t0 - 600 - i, dt.timezone.utc)))
                poller = make_poller(config, store, peer_settings(config.reading_center))
                thread = PollerThread(poller)
                thread.start()
                try:
                    for _ in range(args.samples):
                        ecg = ecg_payloads(1)[0]
                        orthanc.rest("/instances", "POST", ecg.data)
                        study = SentStudy(ecg.study_uid, dt.datetime.now(dt.timezone.utc), stat=True)
                        store.record_sent(study)
                        thread.wake()  # as the recorder does when the forwarder sent a study
                        time.sleep(rng.uniform(1.0, 30.0))  # the report lands at any moment of the cycle
                        sr = ecg_report_sr(to_read(study), findings=["VT"], impression="Ventricular tachycardia")
                        orthanc.rest("/instances", "POST", part10(sr))
                        stored_at = time.monotonic()
                        while not store.has_object(str(sr.SOPInstanceUID)):
                            if time.monotonic() - stored_at > 120:
                                raise TimeoutError("the STAT report did not come back within 120 s")
                            time.sleep(0.05)
                        latencies.append(time.monotonic() - stored_at)
                finally:
                    thread.stop()
            print(
                f"STAT report stored at the PACS -> in clinic.db: "
                f"{', '.join(f'{x:.1f}' for x in latencies)} s (median {statistics.median(latencies):.1f}, "
                f"max {max(latencies):.1f}; goal <= 60 s; poll interval {config.reports.stat_poll_s:g} s)"
            )
            kept = getattr(poller, "queries", None)
            if kept is not None:  # real time, Orthanc's default idle timeout (DicomScpTimeout 30 s)
                getattr(poller, "close", lambda: None)()
                print(
                    f"  C-FIND associations in real time: {kept.opened} opened, {kept.reused} rounds reused one, "
                    f"{kept.closed_by_peer} closed by Orthanc (keep_association_s {config.reports.keep_association_s:g})"
                )
        finally:
            orthanc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
