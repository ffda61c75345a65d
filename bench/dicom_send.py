"""C-STORE throughput of uploader.dicom_store on one association, against dcmtk's storescu.

Run as root (it re-executes itself in a private network namespace, because Orthanc listens on
every interface):

    .venv/bin/python bench/dicom_send.py [--objects 200] [--runs 3] [--peer orthanc|storescp]

Prints medians for N ECG objects (pydicom's waveform_ecg.dcm, 291 KB) sent on ONE association,
each as a ratio to storescu sending the same files in the same run:
- deflated / explicit / implicit-only peer, our raw send path (no decode) vs pynetdicom encoding;
- without TCP_NODELAY on our side (why we set it);
- bytes on the wire per object.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def in_private_netns() -> bool:
    return {n for _i, n in socket.if_nameindex()} <= {"lo"}


def reexec_in_netns() -> None:
    if in_private_netns():
        return
    if os.geteuid() != 0:
        sys.exit("run as root: Orthanc must run in a private network namespace")
    os.execvp(
        "unshare",
        [
            "unshare",
            "-n",
            "-m",
            "--",
            "sh",
            "-c",
            'ip link set lo up && mount -t sysfs sysfs /sys && exec "$@"',
            "sh",
            sys.executable,
            *sys.argv,
        ],
    )


def median_time(fn: Callable[[], None], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--peer", choices=["orthanc", "storescp"], default="orthanc")
    args = ap.parse_args()
    if args.peer == "orthanc":
        reexec_in_netns()

    import logging

    logging.basicConfig(level=logging.CRITICAL)
    from tests.peers import OrthancServer, StorescpServer, ecg_payloads, gateway_modality
    from uploader.dicom_association import PeerSettings
    from uploader.dicom_part10 import parse_part10
    from uploader.dicom_store import StoreAssociation

    payloads = ecg_payloads(args.objects)
    raw_size = len(payloads[0].data)
    tmp = Path(tempfile.mkdtemp(prefix="bench-dicom-"))
    files = []
    for i, p in enumerate(payloads):
        f = tmp / "in" / f"{i:04d}.dcm"
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(p.data)
        files.append(f)

    def fresh_peer(accept: str = "default"):  # a new, empty peer per measurement keeps runs alike
        if args.peer == "orthanc":
            srv = OrthancServer(Path(tempfile.mkdtemp(dir=tmp)), modalities=gateway_modality("LASTMILE", 11113))
            srv.start()
            return srv, srv.dicom_port, "READING_CENTER"
        srv = StorescpServer(Path(tempfile.mkdtemp(dir=tmp)), ae_title="READING_CENTER", accept=accept)
        srv.start()
        return srv, srv.port, "READING_CENTER"

    def ours(
        deflate: bool, *, fast: bool = True, nodelay: bool = True, level: int = 4, accept: str = "default"
    ) -> tuple[float, int]:
        wire = []

        # time only the sending: start/stop of the peer is outside
        times = []
        for _ in range(args.runs):
            srv, port, aet = fresh_peer(accept)
            try:
                peer = PeerSettings(
                    "127.0.0.1", port, aet, "LASTMILE", deflate=deflate, deflate_level=level, tcp_nodelay=nodelay
                )
                t = time.perf_counter()
                with StoreAssociation(peer, raw_send=fast) as assoc:
                    for p in payloads:
                        o = assoc.store(p.data)
                        assert o.stored, o
                        wire.append(o.wire_bytes)
                times.append(time.perf_counter() - t)
            finally:
                srv.stop()
        return statistics.median(times), int(statistics.median(wire))

    def storescu(*options: str) -> float:
        times = []
        for _ in range(args.runs):
            srv, port, aet = fresh_peer()
            try:
                t = time.perf_counter()
                subprocess.run(
                    ["storescu", *options, "-aet", "LASTMILE", "-aec", aet, "127.0.0.1", str(port), *map(str, files)],
                    check=True,
                    env={**os.environ, "TCP_NODELAY": "1"},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                times.append(time.perf_counter() - t)
            finally:
                srv.stop()
        return statistics.median(times)

    print(
        f"{args.objects} ECG objects of {raw_size / 1024:.0f} KB to {args.peer}, one association, median of {args.runs}"
    )
    ref = storescu()
    print(f"  {'storescu (reference, process start included)':58s} {ref:6.2f} s  1.00")
    ref_deflated = storescu("-xd")
    print(
        f"  {'storescu -xd (dcmtk deflates; not a ratio reference)':58s} {ref_deflated:6.2f} s  "
        f"{ref_deflated / ref:4.2f}"
    )
    rows = [
        ("lastmile deflated (level 4, default), raw send", dict(deflate=True)),
        ("lastmile deflated (level 6), raw send", dict(deflate=True, level=6)),
        ("lastmile deflated (level 1), raw send", dict(deflate=True, level=1)),
        ("lastmile explicit VR LE, raw send", dict(deflate=False)),
        ("lastmile deflated, pynetdicom encodes (public API path)", dict(deflate=True, fast=False)),
        ("lastmile explicit, pynetdicom encodes (public API path)", dict(deflate=False, fast=False)),
        ("lastmile explicit, raw send, no TCP_NODELAY on our side", dict(deflate=False, nodelay=False)),
    ]
    for label, kw in rows:
        secs, wire = ours(**kw)  # type: ignore[arg-type]
        print(
            f"  {label:58s} {secs:6.2f} s  {secs / ref:4.2f}  {wire / 1024:6.1f} KB/object "
            f"({wire / raw_size:.2f} of the file)"
        )
    body = payloads[0].data[parse_part10(payloads[0].data).dataset_offset :]
    for level in (1, 4, 6):
        t = time.perf_counter()
        for _ in range(20):
            out = zlib.compressobj(level, zlib.DEFLATED, -15)
            n = len(out.compress(body) + out.flush())
        print(
            f"  zlib level {level}: {(time.perf_counter() - t) / 20 * 1000:5.1f} ms/object, "
            f"{n / len(body):.2f} of the data set"
        )


if __name__ == "__main__":
    main()
