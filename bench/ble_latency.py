"""BLE acquisition: indication -> durable observation latency, and CPU while idle but connected.

    .venv/bin/python bench/ble_latency.py [--seconds 20] [--idle-seconds 10] [--data-dir DIR]

Three emulated devices (bumble, in-process link) stream through the real path (bleak API ->
decoder -> time resolution -> ObservationStore -> outbox, synchronous=FULL): a BP cuff and a
thermometer indicating a new measurement every 0.5 s each, and a pulse oximeter notifying
continuous SpO2 10 times a second (stored every value: continuous_store_interval_s = 0).

Latency: from just before the peripheral sends the indication/notification to just after the
outbox `add` returned (the observation is durable), matched per device in order. Reference in
the same run: a bare `Outbox.add` of the same payloads (what durability alone costs here).

Idle CPU: the streams stop, the three links stay connected; process CPU time / wall time over
--idle-seconds (gateway, emulated radio and peripherals share this one process, so this is an
upper bound for the gateway's part). Reference: the same process with a bare asyncio loop.
Goals (issue 4): p99 <= 50 ms, idle CPU <= 0.5 % of a core.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devices.observation import Observation
from firmware_bridge.ble.emulated_peripherals import BloodPressureCuff, BpRecord, PulseOximeter, Thermometer
from firmware_bridge.ble.emulation import EmulatedRadio
from firmware_bridge.ble.link import BleDeviceManager, LinkSettings
from lastmile.clinic.devices import DeviceRegistry
from lastmile.clinic.observations import ObservationStore, observation_payload
from lastmile.services.ble_devices import ClinicBlePort
from uploader.outbox import Outbox

UTC = dt.timezone.utc
CUFF, THERMO, OXI = "C0:00:00:00:00:01", "C0:00:00:00:00:02", "C0:00:00:00:00:03"


class TimedPort(ClinicBlePort):
    """Notes when each observation became durable (right after the outbox add returned)."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.durable: dict[str, list[float]] = {}
        self.payloads: list[bytes] = []

    def store(self, observation: Observation) -> bool:
        now = self.clock()
        result = self.store_.record(observation, now=now)
        t = time.perf_counter()
        if result.outcome == "stored":
            self.durable.setdefault(observation.device.address, []).append(t)
            self.payloads.append(observation_payload(observation))
        self.outcomes[result.outcome] += 1
        return result.outcome != "duplicate"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def stream(seconds: float, idle_seconds: float, data_dir: Path) -> dict:
    outbox = Outbox.open(data_dir, min_free_bytes=0)
    store = ObservationStore.open(data_dir, outbox=outbox, idle_timeout_s=24 * 3600)
    registry = DeviceRegistry(store.db)
    now = dt.datetime.now(UTC)
    for a in (CUFF, THERMO, OXI):
        registry.allow(a, now=now)
    store.context.set_patient("BENCH-1", now=now - dt.timedelta(seconds=5))
    port = TimedPort(store, registry)

    radio = EmulatedRadio()
    cuff = BloodPressureCuff(radio, CUFF, "Bench cuff", hang_up_after_memory=False)
    thermo = Thermometer(radio, THERMO, "Bench thermometer", hang_up_after_memory=False)
    oxi = PulseOximeter(radio, OXI, "Bench oximeter", stream_interval_s=0)
    peripherals = [cuff, thermo, oxi]
    scanner, client = radio.backends()
    manager = BleDeviceManager(
        port,
        LinkSettings(scan_pass_s=1.0, device_tz=UTC, continuous_store_interval_s=0.0),
        scanner_backend=scanner,
        client_backend=client,
    )
    await radio.start()
    for p in peripherals:
        await p.start()
    stop = asyncio.Event()
    runner = asyncio.ensure_future(manager.run(stop))
    while len(manager.connected()) < 3 or any(p.connection is None for p in peripherals):  # noqa: ASYNC110 — polls state no event covers
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # subscriptions and clock writes done

    async def every(period: float, action) -> None:  # type: ignore[no-untyped-def]
        k = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            await action(k)
            k += 1
            await asyncio.sleep(period)

    await asyncio.gather(
        every(0.5, lambda k: cuff.measure(BpRecord(100 + k % 60, 60 + k % 30, 80, 60 + k % 40, None))),
        every(0.5, lambda k: thermo.measure(36.0 + (k % 30) / 10)),
        every(0.1, lambda k: oxi.send_now(90 + k % 10, 50 + k % 100)),
    )
    await asyncio.sleep(0.5)  # last ones land

    latencies: dict[str, list[float]] = {}
    for p in peripherals:
        sent, durable = p.send_times, port.durable.get(p.address, [])
        latencies[p.name] = [(d - s) * 1000 for s, d in zip(sent, durable)]
        if len(sent) != len(durable):
            print(f"warning: {p.name}: {len(sent)} sent, {len(durable)} durable", file=sys.stderr)

    # Idle but connected.
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(idle_seconds)
    idle_cpu = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    still_connected = len(manager.connected())

    stop.set()
    await runner
    for p in peripherals:
        await p.stop()
    await radio.close()
    store.close()
    outbox.close()
    return {
        "latencies": latencies,
        "idle_cpu": idle_cpu,
        "connected_while_idle": still_connected,
        "payloads": port.payloads,
    }


def bare_adds(payloads: list[bytes], data_dir: Path) -> list[float]:
    outbox = Outbox.open(data_dir, min_free_bytes=0)
    times = []
    try:
        for i, payload in enumerate(payloads):
            t = time.perf_counter()
            outbox.add("observation", f"bench-ref-{i}", payload, now=time.time())
            times.append((time.perf_counter() - t) * 1000)
    finally:
        outbox.close()
    return times


async def idle_loop(seconds: float) -> float:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    return (time.process_time() - cpu0) / (time.perf_counter() - wall0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="streaming time")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="idle-but-connected CPU measurement")
    parser.add_argument("--data-dir", type=Path, help="where the outbox lives (default: a temporary directory)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(dir=args.data_dir) as tmp:
        result = asyncio.run(stream(args.seconds, args.idle_seconds, Path(tmp) / "ble"))
        reference = bare_adds(result["payloads"], Path(tmp) / "ref")
    ref_idle = asyncio.run(idle_loop(min(args.idle_seconds, 5.0)))

    everything = [v for values in result["latencies"].values() for v in values]
    print(
        f"BLE indication -> durable observation, {len(everything)} observations in {args.seconds:g} s "
        f"(3 devices; outbox synchronous=FULL on {args.data_dir or tempfile.gettempdir()})"
    )
    print(f"  {'device':20s} {'n':>5s} {'p50 ms':>8s} {'p99 ms':>8s} {'max ms':>8s}")
    for name, values in [*result["latencies"].items(), ("all", everything)]:
        if values:
            print(
                f"  {name:20s} {len(values):5d} {statistics.median(values):8.2f} {pct(values, 99):8.2f} "
                f"{max(values):8.2f}"
            )
    ref_p50, ref_p99 = statistics.median(reference), pct(reference, 99)
    all_p50, all_p99 = statistics.median(everything), pct(everything, 99)
    print(f"  reference: bare Outbox.add of the same payloads: p50 {ref_p50:.2f} ms, p99 {ref_p99:.2f} ms")
    print(f"  ratio BLE path / bare add: p50 {all_p50 / ref_p50:.1f}x, p99 {all_p99 / ref_p99:.1f}x")
    print(f"  goal p99 <= 50 ms: {'met' if all_p99 <= 50 else 'NOT met'} ({all_p99:.1f} ms)")
    print(
        f"idle but connected ({result['connected_while_idle']} links, {args.idle_seconds:g} s): "
        f"{result['idle_cpu'] * 100:.3f} % of a core "
        f"(reference, bare asyncio loop: {ref_idle * 100:.3f} %); goal <= 0.5 %: "
        f"{'met' if result['idle_cpu'] <= 0.005 else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
