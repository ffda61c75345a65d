"""`lastmile ble run | scan | pair | unpair | decode`: Bluetooth LE health devices (`run`: the BLE service)."""

from __future__ import annotations

import argparse
import json
import sys

from lastmile.commands.common import DATA_DIR


def register(sub: argparse._SubParsersAction) -> None:
    ble = sub.add_parser("ble", help="Bluetooth LE health devices: the BLE service, scan, pair, decode")
    bsub = ble.add_subparsers(dest="ble_command", metavar="COMMAND")
    ble.set_defaults(func=lambda _a: (ble.print_help(), 2)[1])

    p = bsub.add_parser(
        "run",
        help="run the BLE service: paired devices' readings into the outbox (systemd: lastmile-ble.service)",
        parents=[DATA_DIR],
    )
    p.set_defaults(func=_run)

    p = bsub.add_parser(
        "scan", help="nearby devices advertising a health service (BP, thermometer ...)", parents=[DATA_DIR]
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to listen (default 5)")
    p.add_argument("--all", action="store_true", help="every advertising device, not only health devices")
    p.add_argument("--json", action="store_true", help="one JSON array")
    p.add_argument("--emulated", action="store_true", help=argparse.SUPPRESS)  # scan the demo's emulated devices
    p.set_defaults(func=_scan)

    p = bsub.add_parser("pair", help="allow this device to be connected by this clinic's gateway", parents=[DATA_DIR])
    p.add_argument("address", help="Bluetooth address, e.g. C0:26:DA:01:02:03")
    p.add_argument("--name", default="", help="a name for the device list, e.g. 'cuff, room 2'")
    p.add_argument("--bond", action="store_true", help="bond (encrypt) before using it (found out by itself otherwise)")
    p.set_defaults(func=_pair)

    p = bsub.add_parser("unpair", help="take a device off the allow-list", parents=[DATA_DIR])
    p.add_argument("address")
    p.set_defaults(func=_unpair)

    p = bsub.add_parser("decode", help="what a characteristic value means (2a35 1e7800...)")
    p.add_argument("characteristic", help="16-bit UUID: 2a35, 0x2A35 or the full 128-bit form")
    p.add_argument("hex", nargs="+", help="the value in hex (spaces and colons allowed)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=_decode)


def _run(args: argparse.Namespace) -> int:
    from lastmile.services.process_tuning import prepare_device_process

    prepare_device_process()  # the same process tuning as acquire: sqlite-utils' recipes deferred, malloc
    from lastmile.commands.common import config_from_args
    from lastmile.services.ble_service import BleService
    from lastmile.services.runtime import ServiceRuntime

    runtime = ServiceRuntime("ble", load_config=lambda: config_from_args(args))
    return runtime.run(BleService.start)


def _pair(args: argparse.Namespace) -> int:
    import datetime as dt

    from lastmile.clinic.devices import DeviceRegistry, is_bluetooth_address
    from lastmile.commands.common import config_from_args

    if not is_bluetooth_address(args.address):
        print(
            f"lastmile ble pair: {args.address!r} is not a Bluetooth address (like C0:26:DA:01:02:03)", file=sys.stderr
        )
        return 2
    registry = DeviceRegistry.open(config_from_args(args).data_dir)
    try:
        record = registry.allow(
            args.address, name=args.name, pair_required=args.bond, now=dt.datetime.now(dt.timezone.utc)
        )
    finally:
        registry.close()
    print(
        f"paired {record.address}{' (' + record.name + ')' if record.name else ''}: the gateway will connect "
        f"it when it advertises{'; bonding first' if record.pair_required else ''}"
    )
    return 0


def _unpair(args: argparse.Namespace) -> int:
    import datetime as dt

    from lastmile.clinic.devices import DeviceRegistry
    from lastmile.commands.common import config_from_args

    registry = DeviceRegistry.open(config_from_args(args).data_dir)
    try:
        removed = registry.disallow(args.address, now=dt.datetime.now(dt.timezone.utc))
    finally:
        registry.close()
    print(f"{args.address.upper()} {'taken off the allow-list' if removed else 'was not on the allow-list'}")
    return 0 if removed else 1


def _scan(args: argparse.Namespace) -> int:
    import asyncio

    from bleak.exc import BleakError

    from firmware_bridge.ble.link import ScanResult, scan_health_devices

    paired: set[str] = set()
    if args.data_dir or not args.emulated:
        try:
            from lastmile.clinic.devices import DeviceRegistry
            from lastmile.commands.common import config_from_args

            registry = DeviceRegistry.open(config_from_args(args).data_dir)
            paired = set(registry.allowed())
            registry.close()
        except (OSError, Exception) as exc:  # noqa: BLE001 - the scan still works without the list
            print(f"(allow-list not readable: {exc})", file=sys.stderr)

    async def scan() -> list[ScanResult]:
        if not args.emulated:
            return await scan_health_devices(args.timeout, every_device=args.all)
        from firmware_bridge.ble.emulated_peripherals import BloodPressureCuff, Thermometer
        from firmware_bridge.ble.emulation import EmulatedRadio
        from lastmile.services.ble_devices import DEMO_CUFF, DEMO_THERMOMETER

        radio = EmulatedRadio()
        devices = [
            BloodPressureCuff(radio, DEMO_CUFF, "Demo BP Cuff"),
            Thermometer(radio, DEMO_THERMOMETER, "Demo Thermometer"),
        ]
        for d in devices:
            await d.start()
        try:
            return await scan_health_devices(args.timeout, backend=radio.backends()[0], every_device=args.all)
        finally:
            for d in devices:
                await d.stop()

    try:
        results = asyncio.run(scan())
    except (BleakError, OSError) as exc:
        print(f"lastmile ble scan: Bluetooth is not available: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "address": r.address,
                        "name": r.name,
                        "rssi": r.rssi,
                        "services": list(r.services),
                        "paired": r.address in paired,
                    }
                    for r in results
                ],
                indent=2,
            )
        )
        return 0
    if not results:
        print(f"no health devices heard in {args.timeout:g} s (wake the device: take a measurement)")
        return 0
    for r in results:
        mark = "paired" if r.address in paired else "      "
        print(f"{r.address}  {r.rssi:4d} dBm  {mark}  {r.name or '(no name)':24s}  {', '.join(r.services)}")
    return 0


def _decode(args: argparse.Namespace) -> int:
    from devices.ble import registry
    from devices.ble.uuids import parse_uuid16

    uuid16 = parse_uuid16(args.characteristic)  # ProtocolError -> "lastmile: ProtocolError: ..." exit 1
    text = "".join(args.hex).replace(":", "").replace(" ", "").replace("-", "")
    if text.lower().startswith("0x"):
        text = text[2:]
    try:
        data = bytes.fromhex(text)
    except ValueError:
        print(f"lastmile ble decode: {''.join(args.hex)!r} is not hex", file=sys.stderr)
        return 2
    spec = registry.spec_for(uuid16)
    value = registry.to_jsonable(spec.decode(data))
    if args.json:
        print(
            json.dumps(
                {"characteristic": f"0x{uuid16:04X}", "name": spec.name, "bytes": data.hex(), "value": value},
                indent=2,
                ensure_ascii=False,
            )
        )
        return 0
    print(f"{spec.name} (0x{uuid16:04X}), {len(data)} bytes")
    for line in _describe(value):
        print("  " + line)
    return 0


def _describe(value: object, prefix: str = "") -> list[str]:
    """Human lines for a decoded value; quantities as 'code: value unit (sent ...)'."""
    if isinstance(value, dict) and {"code", "value", "unit"} <= set(value):
        shown = (
            f"{value['value']:g} {value['unit']}" if value["value"] is not None else f"no value ({value['special']})"
        )
        sent = ""
        if value.get("sent_unit") and value["sent_unit"] != value["unit"] and value["sent_value"] is not None:
            sent = f"  (sent {value['sent_value']:g} {value['sent_unit']})"
        return [f"{prefix}{value['code']}: {shown}{sent}"]
    if isinstance(value, dict):
        lines: list[str] = []
        for k, v in value.items():
            # `characteristic`/`user_id` repeat the header/details; False flags say nothing.
            if v is None or v is False or v in ((), [], {}) or (not prefix and k in ("characteristic", "user_id")):
                continue
            if k == "flags" and isinstance(v, int):
                v = f"0x{v:02x}"  # the raw flags byte: what a technician compares with the spec
            if k == "quantities":
                for q in v:
                    lines += _describe(q, prefix)
            elif isinstance(v, (dict, list)):
                lines.append(f"{prefix}{k.replace('_', ' ')}:")
                lines += _describe(v, prefix + "  ")
            else:
                lines.append(f"{prefix}{k.replace('_', ' ')}: {v}")
        return lines
    if isinstance(value, list):
        if all(not isinstance(v, (dict, list)) for v in value):
            return [prefix + ", ".join(str(v) for v in value)]
        return [line for v in value for line in _describe(v, prefix)]
    return [f"{prefix}{value}"]
