"""One week of field backlog synced to a loopback FHIR receiver: our forwarder vs a bare requests loop.

700 visits (100 a day) with 5 readings each (BP panel with pulse, temperature, SpO2, weight,
glucose → 3,500 readings, 4,200 Observation resources with the pulses) are built as transaction
Bundles and queued in a real outbox. Then, against the same receiver (conditional create, the
structure check of `lastmile.demo.fhir_receiver`; a fresh receiver per run):

- reference: a bare `requests.Session` loop POSTing each bundle as it is, no outbox;
- ours: `forward_fhir_once` rounds (outbox claim/settle, merged transactions, gzip);
- ours without merging (batch 1): one request per bundle like the reference, to show what the
  outbox bookkeeping itself costs.

On loopback each small request of a plain requests loop stalls ~40 ms (headers and body go in two
segments: Nagle + delayed ACK, see NOTES); merging bundles is what removes most of that.

Prints wall times (median of --runs), the ratio ours/reference (goal ≤ 1.3) and bytes on the wire.
With `--profile P` (or `all`) both go through the emulated village link (tests/link_emulator.py:
rate, latency, stalls) instead of loopback, one figure set per profile; `--json`: the last line is
one JSON object, profile → figures. Keep --visits small on slow profiles (edge: ~1 s per visit).
Usage: .venv/bin/python bench/sync.py [--visits 700] [--runs 3] [--batch 20] [--profile P|all] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests

from devices.identity import DeviceIdentity, TimeSource
from devices.observation import Observation, Quantity
from lastmile.demo.fhir_receiver import FhirReceiver
from uploader.fhir_bundle import FhirNaming, VisitPosition, VisitSignature, VisitSummary, bundle_bytes, visit_bundle
from uploader.fhir_forwarder import enqueue_bundle, forward_fhir_once
from uploader.fhir_sender import FhirSender, FhirSenderSettings
from uploader.outbox import ItemState, Kind, Outbox

NAMING = FhirNaming(gateway_id="bench-gw")
T0 = dt.datetime(2026, 3, 2, 7, 0, tzinfo=dt.timezone.utc)
DEVICES = {k: DeviceIdentity("Acme", k, f"SN-{k}", "") for k in ("bp", "t", "o", "w", "g")}


def readings(n: int, at: dt.datetime, patient: str) -> list[Observation]:
    def obs(kind: str, dev: str, *qs: Quantity) -> Observation:
        return Observation(
            kind=kind,
            quantities=qs,
            measured_at=at,
            time_source=TimeSource.DEVICE_CLOCK,
            received_at=at,
            device=DEVICES[dev],
            record_key=f"{n}/{kind}",
            patient_id=patient,
        )

    return [
        obs(
            "blood-pressure",
            "bp",
            Quantity("systolic", 120.0 + n % 30, "mm[Hg]"),
            Quantity("diastolic", 80.0 + n % 10, "mm[Hg]"),
            Quantity("pulse-rate", 70.0 + n % 9, "/min"),
        ),
        obs("body-temperature", "t", Quantity("body-temperature", 36.5 + (n % 10) / 10, "Cel")),
        obs("spo2", "o", Quantity("spo2", 95.0 + n % 4, "%")),
        obs("body-weight", "w", Quantity("body-weight", 60.0 + n % 25, "kg")),
        obs("glucose", "g", Quantity("glucose", 90.0 + n % 40, "mg/dL")),
    ]


def backlog(visits: int) -> list[tuple[str, str, bytes]]:
    out = []
    for n in range(visits):
        start = T0 + dt.timedelta(days=n // 100, minutes=4 * (n % 100))
        patient = f"P-{n % 400:05d}"
        summary = VisitSummary(
            visit_id=f"10000000-0000-4000-8000-{n:012d}",
            doctor_id="DR-1",
            patient_id=patient,
            started_at=start,
            ended_at=start + dt.timedelta(minutes=20),
            time_source=TimeSource.GPS,
            household_id=f"HH-{n:05d}",
            position=VisitPosition(31.2 + n * 1e-4, 121.5, 30.0, 9.5, start, 3),
        )
        sig = VisitSignature(n + 1, f"{n:064x}", f"{n - 1:064x}", "c2ln" * 22, "a2V5" * 11, start)
        body = bundle_bytes(visit_bundle(summary, readings(n, start, patient), NAMING, sig))
        out.append((summary.visit_id, patient, body))
    return out


LINK: str | None = None  # --profile: the link every request crosses (None: loopback)


@contextlib.contextmanager
def receiver_url(receiver: FhirReceiver) -> Iterator[str]:
    """The receiver's base URL, through the emulated link when a profile is chosen."""
    if LINK is None:
        yield receiver.base_url
        return
    from tests.link_emulator import PROFILES, LinkRelay

    port = int(receiver.base_url.rsplit(":", 1)[1].split("/")[0])
    with LinkRelay(PROFILES[LINK], "127.0.0.1", port) as relay:
        yield f"http://127.0.0.1:{relay.port}/fhir"


def run_reference(bodies: list[bytes]) -> tuple[float, int, int]:
    with FhirReceiver() as receiver, requests.Session() as session, receiver_url(receiver) as url:
        t = time.perf_counter()
        for body in bodies:
            r = session.post(url, data=body, timeout=30, headers={"Content-Type": "application/fhir+json"})
            r.raise_for_status()
        elapsed = time.perf_counter() - t
        return elapsed, sum(len(b) for b in bodies), len(receiver.resources("Encounter"))


def run_ours(items: list[tuple[str, str, bytes]], batch: int) -> tuple[float, int, int, int]:
    import json

    with tempfile.TemporaryDirectory() as tmp:
        with Outbox.open(Path(tmp), min_free_bytes=0) as outbox:
            for visit_id, patient, body in items:
                enqueue_bundle(outbox, json.loads(body), f"fhir:visit:{visit_id}", patient_id=patient, now=1000.0)
            with (
                FhirReceiver() as receiver,
                receiver_url(receiver) as url,
                FhirSender(FhirSenderSettings(base_url=url)) as sender,
            ):
                t = time.perf_counter()
                now = 2000.0
                while outbox.items(state=ItemState.QUEUED, kind=Kind.FHIR_BUNDLE, limit=1):
                    forward_fhir_once(outbox, sender, now, batch_size=batch, max_items=200)
                    now += 1.0
                elapsed = time.perf_counter() - t
                return elapsed, sender.bytes_sent, len(receiver.resources("Encounter")), sender.requests_sent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visits", type=int, default=700)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--profile", choices=("lan", "4g", "3g", "edge", "satellite", "all"), help="emulated link")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object, profile → figures")
    args = parser.parse_args()
    global LINK
    figures: dict[str, dict[str, float]] = {}
    profiles = ("lan", "4g", "3g", "edge", "satellite") if args.profile == "all" else (args.profile,)
    for LINK in profiles:
        if LINK is not None:
            print(f"-- link profile {LINK}")
        figures[LINK or "loopback"] = run(args)
    if args.json:
        print(json.dumps(figures))
    return 0


def run(args: argparse.Namespace) -> dict[str, float]:
    items = backlog(args.visits)
    bodies = [b for _, _, b in items]
    n_obs = sum(b.count(b'"resourceType":"Observation"') for b in bodies)
    print(
        f"backlog: {len(items)} visits, {args.visits * 5} readings ({n_obs} Observation resources), "
        f"{sum(map(len, bodies)) / 1e6:.2f} MB of bundles"
    )
    ref_times, our_times, one_times = [], [], []
    for run in range(args.runs):
        ref_t, ref_bytes, ref_n = run_reference(bodies)
        our_t, our_bytes, our_n, requests_sent = run_ours(items, args.batch)
        one_t, one_bytes, one_n, one_requests = run_ours(items, 1)
        assert ref_n == our_n == one_n == len(items), (ref_n, our_n, one_n)
        ref_times.append(ref_t)
        our_times.append(our_t)
        one_times.append(one_t)
        print(
            f"run {run + 1}: reference {ref_t:.2f} s ({len(bodies)} requests, {ref_bytes / 1e6:.2f} MB) | "
            f"ours {our_t:.2f} s ({requests_sent} requests, {our_bytes / 1e6:.2f} MB) | "
            f"ours one bundle per request {one_t:.2f} s ({one_requests} requests, {one_bytes / 1e6:.2f} MB)"
        )
    ref, ours = statistics.median(ref_times), statistics.median(our_times)
    one = statistics.median(one_times)
    print(
        f"median: reference {ref:.2f} s, ours {ours:.2f} s, ratio {ours / ref:.2f} (goal <= 1.30); "
        f"ours without merging {one:.2f} s, ratio {one / ref:.2f}"
    )
    print(
        f"bytes on the wire (request bodies): reference {ref_bytes / 1e6:.2f} MB, ours {our_bytes / 1e6:.2f} MB "
        f"({our_bytes / ref_bytes:.2f}x)"
    )
    return {"reference_s": round(ref, 3), "ours_s": round(ours, 3), "ratio": round(ours / ref, 3)}


if __name__ == "__main__":
    raise SystemExit(main())
