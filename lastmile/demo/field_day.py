"""A field day, scripted: home visits along a replayed GPS track with the link down, then the sync.

`run_field_day(work_dir)` is what `lastmile demo` shows and what the field-day test checks:

1. The gateway boots with its clock in 1970 (no RTC). A synthetic NMEA 0183 receiver stream
   (GGA/GSA/RMC with checksums) of the doctor's route is replayed through the real decoder
   (`devices.gps.NmeaStreamDecoder`); its fixes anchor the clock and make the visits' tracks.
2. At each household of the county register: visit start (best fix), a reading or two from the
   BLE devices (BP, temperature), visit stop → checks, chain record, signature, FHIR bundle
   queued in the outbox. One visit is recorded 2 km from its household: it is flagged.
3. All day the link is down: every send attempt fails as transient, nothing is lost.
4. The link returns: an embedded FHIR receiver (conditional create) takes everything, once.

Time is simulated (monotonic seconds advance per fix), so the day runs in about a second.
"""

from __future__ import annotations

import datetime as dt
import math
import socket
import time
from collections.abc import Callable
from pathlib import Path

from devices.gps import Fix, NmeaStreamDecoder
from devices.gps.nmea import checksum
from devices.identity import DeviceIdentity, TimeSource
from devices.observation import Observation, Quantity
from lastmile.clock import GatewayClock
from lastmile.demo.fhir_receiver import FhirReceiver
from lastmile.visits.book import FixRecord, VisitBook, VisitPolicy, record_observation
from lastmile.visits.chain import verify_lines
from uploader.fhir_bundle import FhirNaming
from uploader.fhir_forwarder import forward_fhir_once
from uploader.fhir_sender import FhirSender, FhirSenderSettings
from uploader.outbox import ItemState, Kind, Outbox

VILLAGE = (31.2480, 121.5874)  # where the synthetic road starts
METRES_PER_DEG_LAT = 111_195.0
CUFF = DeviceIdentity("Omron", "HEM-7600T", "DEMO-BP-1", "F0:00:00:00:00:01")
THERMOMETER = DeviceIdentity("Braun", "IRT6520", "DEMO-T-1", "F0:00:00:00:00:02")


class SimulatedClocks:
    """A Pi's clocks: the wall clock starts in 1970, monotonic seconds advance by hand."""

    def __init__(self) -> None:
        self.mono = 12.0

    def wall(self) -> float:
        return self.mono  # 1970: no RTC, no NTP in the field

    def monotonic(self) -> float:
        return self.mono


def _ddmm(value: float, lat: bool) -> str:
    hemi = ("N" if value >= 0 else "S") if lat else ("E" if value >= 0 else "W")
    value = abs(value)
    degrees = int(value)
    minutes = (value - degrees) * 60
    return f"{degrees:0{2 if lat else 3}d}{minutes:07.4f},{hemi}"


def _sentence(body: str) -> bytes:
    return f"${body}*{checksum(body):02X}\r\n".encode("ascii")


def nmea_cycle(
    when: dt.datetime, lat: float, lon: float, *, hdop: float = 0.9, sats: int = 9, altitude_m: float = 35.0
) -> bytes:
    """One receiver epoch: GGA, GSA, RMC (what a u-blox/Quectel-class receiver sends)."""
    hhmmss = when.strftime("%H%M%S") + f".{when.microsecond // 10000:02d}"
    prns = ",".join(f"{p:02d}" for p in range(1, sats + 1)) + "," * (12 - sats)
    return (
        _sentence(
            f"GPGGA,{hhmmss},{_ddmm(lat, True)},{_ddmm(lon, False)},1,{sats:02d},{hdop:.1f},{altitude_m:.1f},M,8.3,M,,"
        )
        + _sentence(f"GNGSA,A,3,{prns},{hdop * 1.6:.1f},{hdop:.1f},{hdop * 1.3:.1f}")
        + _sentence(f"GNRMC,{hhmmss},A,{_ddmm(lat, True)},{_ddmm(lon, False)},0.5,90.0,{when.strftime('%d%m%y')},,,A")
    )


def household_positions(count: int, spacing_m: float = 400.0) -> list[tuple[str, float, float]]:
    """Households along a road running north-east out of the village."""
    out = []
    for i in range(count):
        north = (i + 1) * spacing_m * math.cos(math.radians(30))
        east = (i + 1) * spacing_m * math.sin(math.radians(30))
        lat = VILLAGE[0] + north / METRES_PER_DEG_LAT
        lon = VILLAGE[1] + east / (METRES_PER_DEG_LAT * math.cos(math.radians(VILLAGE[0])))
        out.append((f"HH-{i + 1:03d}", lat, lon))
    return out


def _route(a: tuple[float, float], b: tuple[float, float], step_m: float) -> list[tuple[float, float]]:
    d_lat, d_lon = b[0] - a[0], b[1] - a[1]
    metres = math.hypot(d_lat * METRES_PER_DEG_LAT, d_lon * METRES_PER_DEG_LAT * math.cos(math.radians(a[0])))
    steps = max(1, int(metres / step_m))
    return [(a[0] + d_lat * k / steps, a[1] + d_lon * k / steps) for k in range(1, steps + 1)]


def _unused_loopback_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/fhir"  # nobody listens: the link is down


def run_field_day(
    work_dir: str | Path,
    *,
    visits: int = 3,
    far_visit: int | None = None,
    gateway_id: str = "demo-gateway",
    doctor_id: str = "DR-DEMO",
    receiver_factory: Callable[[], FhirReceiver] = FhirReceiver,
    gps_day: dt.date | None = None,
    data_dir: str | Path | None = None,
) -> dict:
    """Run the day; returns counts (visits, visits_synced, visits_flagged, observations_synced,
    chain_verified, link_down_attempts ...) and per-visit flags. `far_visit` (1-based; default
    the last) is recorded 2 km from its household. `data_dir`: the gateway's (the demo's own, so
    its console lists the visits); default `work_dir`/field-gateway. Its sync claims FHIR bundles
    only: ECGs and readings already in that outbox are left as they are."""
    work = Path(work_dir)
    data_dir = Path(data_dir) if data_dir is not None else work / "field-gateway"
    far = visits if far_visit is None else far_visit
    houses = household_positions(visits)
    register = work / "households.csv"
    register.write_text(
        "household_id,latitude,longitude\n" + "".join(f"{h},{lat:.7f},{lon:.7f}\n" for h, lat, lon in houses),
        encoding="utf-8",
    )
    clocks = SimulatedClocks()
    clock = GatewayClock(clocks.wall, clocks.monotonic, lambda: "field-demo-boot")
    day = gps_day or dt.datetime.now(dt.timezone.utc).date()
    gps_time = dt.datetime.combine(day, dt.time(7, 30), tzinfo=dt.timezone.utc)
    naming = FhirNaming(gateway_id=gateway_id)
    decoder = NmeaStreamDecoder()
    readings = 0
    visit_ids: list[str] = []
    with (
        VisitBook.open(data_dir, gateway_id=gateway_id, policy=VisitPolicy(radius_m=200.0), clock=clock) as book,
        Outbox.open(data_dir, min_free_bytes=0, backoff_base_s=5.0, backoff_max_s=60.0) as outbox,
    ):
        book.register.import_csv(register, gps_time.isoformat())
        last_fix: FixRecord | None = None

        def walk(points: list[tuple[float, float]], seconds_per_point: float) -> None:
            nonlocal gps_time, last_fix
            for lat, lon in points:
                clocks.mono += seconds_per_point
                gps_time += dt.timedelta(seconds=seconds_per_point)
                for event in decoder.receive_data(nmea_cycle(gps_time, lat, lon)):
                    if isinstance(event, Fix):
                        last_fix = book.observe_fix(event, book.clock.now()) or last_fix
            for event in decoder.flush():
                if isinstance(event, Fix):
                    last_fix = book.observe_fix(event, book.clock.now()) or last_fix

        position = VILLAGE
        for n, (household, lat, lon) in enumerate(houses, start=1):
            target = (lat, lon)
            if n == far:  # the doctor records this household while 2 km away from it
                target = (lat - 2000.0 / METRES_PER_DEG_LAT, lon)
            walk(_route(position, target, 15.0), 10.0)
            position = target
            patient = f"P-{n:04d}"
            visit = book.start(patient, doctor_id=doctor_id, household_id=household, fix=last_fix)
            visit_ids.append(visit.id)
            walk([target] * 3, 60.0)
            stamp = book.clock.now()
            assert stamp.time is not None
            kinds: list[tuple[str, DeviceIdentity, tuple[Quantity, ...]]] = [
                (
                    "blood-pressure",
                    CUFF,
                    (
                        Quantity("systolic", 120.0 + n, "mm[Hg]"),
                        Quantity("diastolic", 78.0 + n % 5, "mm[Hg]"),
                        Quantity("pulse-rate", 70.0 + n % 7, "/min"),
                    ),
                )
            ]
            if n % 2 == 0:
                kinds.append(("body-temperature", THERMOMETER, (Quantity("body-temperature", 36.6, "Cel"),)))
            for kind, device, quantities in kinds:
                obs = Observation(
                    kind=kind,
                    quantities=quantities,
                    measured_at=stamp.time,
                    time_source=TimeSource.GATEWAY_RECEIPT,
                    received_at=stamp.time,
                    device=device,
                    record_key=f"{visit.id}/{kind}",
                    patient_id=patient,
                )
                record_observation(book, outbox, naming, obs)
                readings += 1
            walk([target] * 10, 60.0)
            book.stop(last_fix)
            book.queue_closed(outbox, naming)
        flagged = {v.id: v.flags for v in book.visits() if v.flags}
        chain_ok = verify_lines(_export(book)).ok

        # The link is down all day: attempts fail as transient, nothing is lost or quarantined.
        now = time.time()
        link_down_attempts = 0
        with FhirSender(
            FhirSenderSettings(base_url=_unused_loopback_url(), timeout_s=2.0, connect_timeout_s=1.0)
        ) as offline:
            for _ in range(3):
                counts = forward_fhir_once(outbox, offline, now)
                link_down_attempts += counts.transient
                now += 120.0
        # The link returns.
        with receiver_factory() as receiver, FhirSender(FhirSenderSettings(base_url=receiver.base_url)) as sender:
            for _ in range(20):
                if not outbox.items(state=ItemState.QUEUED, kind=Kind.FHIR_BUNDLE):
                    break
                forward_fhir_once(outbox, sender, now)
                now += 120.0
            encounters = [r["identifier"][0]["value"] for r in receiver.resources("Encounter")]
            observations = len(receiver.resources("Observation"))
            stats = receiver.stats
        committed = len(outbox.items(state=ItemState.COMMITTED, kind=Kind.FHIR_BUNDLE))
    return {
        "visits": visits,
        "readings": readings,
        "visits_synced": len(set(encounters) & set(visit_ids)),
        "visits_flagged": len(flagged),
        "observations_synced": observations,
        "encounters_on_server": len(encounters),
        "bundles_committed": committed,
        "link_down_attempts": link_down_attempts,
        "server_requests": stats.requests,
        "chain_verified": chain_ok,
        "flags": flagged,
        "visit_ids": visit_ids,
        "data_dir": str(data_dir),
    }


def _export(book: VisitBook) -> list[str]:
    from lastmile.visits.chain import export_lines, public_key_b64

    return list(export_lines(book.gateway_id, public_key_b64(book.signing_key), book.chain_entries()))
