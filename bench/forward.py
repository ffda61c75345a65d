"""Forwarding benchmark: 200 ECG studies to Orthanc, Lastmile against dcmtk's storescu.

Run as root (it puts itself and Orthanc in a private network namespace):

    .venv/bin/python bench/forward.py [--studies 200] [--runs 3] [--associations 2]

Prints, side by side from one run (medians):
- forwarding time: Lastmile's `forward` process (start → every study stored) ÷ storescu's
  (one association, same objects, same fresh Orthanc); goal ≤ 1.0;
- bytes on the wire per study ÷ the object's uncompressed Explicit VR LE size; goal ≤ 0.50;
- bytes written to disk per study (intake + forwarding, /proc/<pid>/io) ÷ object size; goal ≤ 1.5;
- the forward process's peak RSS (VmHWM); goal ≤ 60 MB (issue 16);
- CPU seconds (user + sys) per study: the forward process from READY to all stored, storescu's
  whole process; goal ≤ 1.5 times storescu's (issue 16).
TCP_NODELAY is set on every side (Orthanc and storescu through the environment, Lastmile itself).

Where the forward process's CPU goes: `--thread-cpu` prints CPU per study by kind of thread
(pynetdicom's DUL and association reactors, the send threads, ...); `--cprofile OUT` writes a
cProfile (CPU time, every thread merged) to OUT.<run> for `python -m pstats`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def in_private_netns() -> bool:
    return {n for _i, n in socket.if_nameindex()} <= {"lo"}


def lo_tx_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        if line.strip().startswith("lo:"):
            return int(line.split(":", 1)[1].split()[8])
    raise RuntimeError("no loopback interface")


def proc_io(pid: int | str = "self") -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        k, v = line.split(":")
        out[k] = int(v)
    return out


def cpu_s(who: int = resource.RUSAGE_SELF) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def thread_kind(thread: object) -> str:
    """A name for a family of threads (pynetdicom's are per association)."""
    name = getattr(thread, "name", "")
    cls = type(thread).__name__
    if cls in ("DULServiceProvider", "Association"):
        return f"pynetdicom {cls}"
    if name.startswith("Thread-") and "(" in name:  # Thread-12 (target): the target says what it is
        return name[name.index("(") :]
    return name.rstrip("0123456789_-").rstrip() or cls


def count_thread_cpu() -> dict[str, float]:
    """CPU seconds per kind of thread, counted as each thread ends (most are short-lived:
    two per association); the main thread is added on reading."""
    import threading

    spent: dict[str, float] = {}
    lock = threading.Lock()
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        try:
            original(self)
        finally:
            with lock:
                kind = thread_kind(self)
                spent[kind] = spent.get(kind, 0.0) + time.thread_time()

    threading.Thread.run = run  # type: ignore[method-assign]

    class WithMain(dict):  # type: ignore[type-arg]
        at_ready = 0.0  # the main thread's start-up is not per-study work

        def values(self):  # type: ignore[no-untyped-def, override]
            self.refresh()
            return super().values()

        def items(self):  # type: ignore[no-untyped-def, override]
            self.refresh()
            return super().items()

        def refresh(self) -> None:
            with lock:
                self.update(spent)
            self["main"] = time.thread_time() - self.at_ready

    return WithMain()


def profile_threads() -> list[object]:
    """cProfile in every thread started from now on (and the main one)."""
    import cProfile
    import threading

    profiles: list[object] = []
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        prof = cProfile.Profile(time.thread_time)  # CPU, not waits
        profiles.append(prof)
        prof.runcall(original, self)

    threading.Thread.run = run  # type: ignore[method-assign]
    main = cProfile.Profile(time.thread_time)
    main.enable()
    profiles.append(main)
    return profiles


def worker(cfg: str, n: int) -> None:
    """The measured side: the real forward service until every study is stored and committed."""
    import threading

    # before anything imports pydicom: as `lastmile forward` does (numpy would add ~12 MB of RSS
    # that the real service never has)
    sys.modules.setdefault("numpy", None)
    from lastmile.config import load_config
    from lastmile.services.forward import ForwardService

    t_start = float(os.environ["BENCH_T0"])
    thread_cpu = count_thread_cpu() if os.environ.get("BENCH_THREAD_CPU") else None
    profiles = profile_threads() if os.environ.get("BENCH_CPROFILE") else None
    service = ForwardService(load_config(cfg))
    t_ready = time.time()
    cpu_ready = cpu_s()
    if thread_cpu is not None:
        thread_cpu.at_ready = time.thread_time()  # type: ignore[attr-defined]
    spy = None
    if os.environ.get("BENCH_PY_SPY"):  # where the CPU goes: sampled stacks of every thread
        out_file, pid = os.environ["BENCH_PY_SPY"], str(os.getpid())
        spy = subprocess.Popen(
            ["perf", "record", "-F", "999", "-g", "-p", pid, "-o", out_file]
            if ".perf" in out_file
            else ["py-spy", "record", "-p", pid, "-r", "250", "-f", "raw", "-o", out_file],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # py-spy attaches
    stop = threading.Event()
    t_sent = None
    cpu_sent = 0.0
    while True:
        wait = service.step(stop)
        c = service.outbox.stats(time.time())["counts"]
        if t_sent is None and c.get("sent", 0) + c.get("committed", 0) + c.get("purged", 0) >= n:
            t_sent = time.time() - t_start
            cpu_sent = cpu_s() - cpu_ready
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait()
        if c.get("purged", 0) + c.get("committed", 0) >= n:
            break
        if wait:
            time.sleep(min(wait, 0.02))
    t_committed = time.time() - t_start
    service.close()
    if thread_cpu is not None:
        total = sum(thread_cpu.values())
        for name, seconds in sorted(thread_cpu.items(), key=lambda kv: -kv[1]):
            print(f"thread CPU {name:28} {seconds * 1000 / n:7.2f} ms/study ({seconds / total:5.1%})")
    if profiles is not None:
        import pstats

        merged = pstats.Stats(profiles[0])
        for prof in profiles[1:]:
            merged.add(prof)
        merged.dump_stats(os.environ["BENCH_CPROFILE"])
    hwm = next(
        int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM")
    )
    print(
        json.dumps(
            {
                "t_sent": t_sent,
                "t_committed": t_committed,
                "rss_kb": hwm,
                "t_service": t_sent - (t_ready - t_start),
                "write_bytes": proc_io()["write_bytes"],
                "cpu_sent_s": cpu_sent,
            }
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--associations", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--no-deflate", action="store_true", help="send uncompressed")
    ap.add_argument("--py-spy", metavar="OUT", help="record the forward process with py-spy (raw stacks)")
    ap.add_argument("--thread-cpu", action="store_true", help="print CPU per study by kind of thread (forward process)")
    ap.add_argument("--cprofile", metavar="OUT", help="cProfile every thread of the forward process into OUT.<run>")
    ap.add_argument("--worker", nargs=2, metavar=("CFG", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]))
        return 0
    if not in_private_netns():
        if os.geteuid() != 0:
            print("bench/forward.py: run as root (Orthanc must run in a private network namespace)")
            return 2
        os.execvp(
            "unshare",
            ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, *sys.argv],
        )

    import datetime as dt

    from lastmile.config import Config
    from lastmile.demo.runner import demo_recordings
    from lastmile.ecg.intake import enqueue_recording
    from lastmile.services.forward import open_outbox
    from tests.peers import OrthancServer, free_port, gateway_modality

    storescu = shutil.which("storescu")
    if not storescu or not shutil.which("Orthanc"):
        print("bench/forward.py: needs dcmtk (storescu) and Orthanc: run scripts/setup.sh --test")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="lastmile-bench-"))
    n = args.studies
    rec = demo_recordings(n, dt.datetime(2026, 11, 1, 8, tzinfo=dt.timezone.utc))
    listen = free_port()

    def make_config(run: int, port: int) -> tuple[Config, Path]:
        c = Config()
        c.gateway.data_dir = str(tmp / f"data{run}")
        rc = c.reading_center
        rc.host, rc.port, rc.called_ae, rc.calling_ae = "127.0.0.1", port, "READING_CENTER", "CLINIC01"
        rc.listen_port, rc.associations, rc.batch_size = listen, args.associations, args.batch_size
        c.outbox.min_free_mb = 1
        cfg = tmp / f"lastmile{run}.toml"
        cfg.write_text(
            f'[gateway]\ndata_dir = "{c.gateway.data_dir}"\n[outbox]\nmin_free_mb = 1\n'
            f'[reading_center]\nhost = "127.0.0.1"\nport = {port}\n'
            f'called_ae = "READING_CENTER"\ncalling_ae = "CLINIC01"\n'
            f'listen_port = {listen}\nlisten_host = "127.0.0.1"\n'
            f"associations = {args.associations}\n"
            f"batch_size = {args.batch_size}\n"
            f"deflate = {'false' if args.no_deflate else 'true'}\n"
        )
        return c, cfg

    results: dict[str, list[float]] = {
        k: []
        for k in (
            "storescu_s",
            "storescu_deflated_s",
            "lastmile_service_s",
            "lastmile_sent_s",
            "lastmile_committed_s",
            "wire_lastmile",
            "wire_storescu",
            "disk_ratio",
            "rss_mb",
            "cpu_lastmile_ms",
            "cpu_storescu_ms",
        )
    }
    object_size = 0
    for run in range(args.runs):
        # intake: the outbox as the acquire side fills it (measured: bytes written to disk)
        config, cfg = make_config(run, 0)
        io0 = proc_io()["write_bytes"]
        with open_outbox(config) as outbox:
            items = [enqueue_recording(outbox, r, config, key=f"bench-{i}").item for i, r in enumerate(rec)]
            files_dir = tmp / f"files{run}"
            files_dir.mkdir()
            for item in items:
                (files_dir / f"{item.id:05d}.dcm").write_bytes(outbox.read_payload(item))
        # ratios are against the uncompressed Explicit VR LE object (what the builder makes)
        from uploader.dicom_ecg import EcgStudyUids, StationInfo, recording_to_dicom_bytes

        object_size = statistics.mean(
            len(recording_to_dicom_bytes(r, EcgStudyUids("1.2", "1.3", "1.4"), StationInfo())) for r in rec[:3]
        )
        stored_size = statistics.mean(i.size for i in items)
        # the copies for storescu were written too: subtract them
        intake_io = proc_io()["write_bytes"] - io0 - sum(i.size for i in items)

        # reference: storescu, one association, a fresh Orthanc
        with OrthancServer(tmp / f"orthanc-ref{run}", modalities=gateway_modality("CLINIC01", listen)) as orthanc:
            env = {**os.environ, "TCP_NODELAY": "1"}
            tx0 = lo_tx_bytes()
            t0 = time.perf_counter()
            cpu0 = cpu_s(resource.RUSAGE_CHILDREN)
            subprocess.run(
                [
                    storescu,
                    "-aet",
                    "CLINIC01",
                    "-aec",
                    "READING_CENTER",
                    "127.0.0.1",
                    str(orthanc.dicom_port),
                    "+sd",
                    str(files_dir),
                ],
                check=True,
                env=env,
                capture_output=True,
            )
            results["storescu_s"].append(time.perf_counter() - t0)
            results["cpu_storescu_ms"].append((cpu_s(resource.RUSAGE_CHILDREN) - cpu0) / n * 1000)
            results["wire_storescu"].append((lo_tx_bytes() - tx0) / n / object_size)
            assert len(orthanc.instances()) == n, "storescu did not store everything"
        with OrthancServer(tmp / f"orthanc-refz{run}", modalities=gateway_modality("CLINIC01", listen)) as orthanc:
            t0 = time.perf_counter()
            subprocess.run(
                [
                    storescu,
                    "-aet",
                    "CLINIC01",
                    "-aec",
                    "READING_CENTER",
                    "-xd",
                    "127.0.0.1",
                    str(orthanc.dicom_port),
                    "+sd",
                    str(files_dir),
                ],
                check=True,
                env=env,
                capture_output=True,
            )
            results["storescu_deflated_s"].append(time.perf_counter() - t0)

        # Lastmile: the forward service in its own process, a fresh Orthanc
        with OrthancServer(tmp / f"orthanc-lm{run}", modalities=gateway_modality("CLINIC01", listen)) as orthanc:
            config, cfg = make_config(run, orthanc.dicom_port)
            tx0 = lo_tx_bytes()
            t0 = time.time()
            out = subprocess.run(
                [sys.executable, __file__, "--worker", str(cfg), str(n)],
                check=True,
                capture_output=True,
                text=True,
                env={
                    **os.environ,
                    "BENCH_T0": repr(t0),
                    "MALLOC_ARENA_MAX": "2",
                    **({"BENCH_PY_SPY": f"{args.py_spy}.{run}"} if args.py_spy else {}),
                    **({"BENCH_THREAD_CPU": "1"} if args.thread_cpu else {}),
                    **({"BENCH_CPROFILE": f"{args.cprofile}.{run}"} if args.cprofile else {}),
                },
            )
            *notes, last = out.stdout.strip().splitlines()
            for line in notes:
                print(f"run {run}: {line}")
            w = json.loads(last)
            results["wire_lastmile"].append((lo_tx_bytes() - tx0) / n / object_size)
            results["lastmile_sent_s"].append(w["t_sent"])
            results["lastmile_service_s"].append(w["t_service"])
            results["lastmile_committed_s"].append(w["t_committed"])
            results["rss_mb"].append(w["rss_kb"] / 1024)
            results["cpu_lastmile_ms"].append(w["cpu_sent_s"] / n * 1000)
            results["disk_ratio"].append((intake_io + w["write_bytes"]) / n / object_size)
            got = len(orthanc.instances())
            assert got == n, f"Orthanc has {got} of {n}"

    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["lastmile_service_s"] / med["storescu_s"]
    print(
        f"\nforwarding {n} ECG studies ({object_size / 1024:.0f} KB each in Explicit VR LE, "
        f"{stored_size / 1024:.0f} KB stored deflated) to Orthanc, "
        f"medians of {args.runs} runs, {args.associations} association(s)"
    )
    print(f"{'':34}{'Lastmile':>12}{'storescu':>12}{'goal':>10}")
    print(f"{'time to store all, service (s)':34}{med['lastmile_service_s']:12.2f}{med['storescu_s']:12.2f}")
    print(f"{'  ratio Lastmile / storescu':34}{ratio:12.2f}{'':12}{'<= 1.0':>10}")
    print(f"{'  storescu proposing deflate (s)':34}{'':12}{med['storescu_deflated_s']:12.2f}")
    print(f"{'  ratio / storescu deflated':34}{med['lastmile_service_s'] / med['storescu_deflated_s']:12.2f}")
    print(f"{'  whole process incl. start (s)':34}{med['lastmile_sent_s']:12.2f}")
    print(f"{'  ... until all committed (s)':34}{med['lastmile_committed_s']:12.2f}{'n/a':>12}")
    print(
        f"{'wire bytes per study / object':34}{med['wire_lastmile']:12.2f}{med['wire_storescu']:12.2f}{'<= 0.50':>10}"
    )
    print(f"{'disk bytes written per study / obj':34}{med['disk_ratio']:12.2f}{'':12}{'<= 1.5':>10}")
    print(f"{'forward process peak RSS (MB)':34}{med['rss_mb']:12.1f}{'':12}{'<= 60':>10}")
    cpu_ratio = med["cpu_lastmile_ms"] / med["cpu_storescu_ms"]
    print(f"{'CPU per study, user+sys (ms)':34}{med['cpu_lastmile_ms']:12.2f}{med['cpu_storescu_ms']:12.2f}")
    print(f"{'  ratio Lastmile / storescu':34}{cpu_ratio:12.2f}{'':12}{'<= 1.5':>10}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
