"""`lastmile patient set | clear | assign | show` and `lastmile devices`: the clinic session."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

from lastmile.commands.common import DATA_DIR


def register(sub: argparse._SubParsersAction) -> None:
    patient = sub.add_parser("patient", help="the current patient; assign held (unassigned) observations")
    psub = patient.add_subparsers(dest="patient_command", metavar="COMMAND")
    patient.set_defaults(func=lambda _a: (patient.print_help(), 2)[1])

    p = psub.add_parser(
        "set", help="make ID the current patient (readings from now on land on them)", parents=[DATA_DIR]
    )
    p.add_argument("patient_id")
    p.add_argument("--name", default="", help='name in DICOM form, "Family^Given"')
    p.add_argument("--doctor", default="", help="the examining doctor's id")
    p.set_defaults(func=_set)

    p = psub.add_parser("clear", help="end the current patient's session (next readings are held)", parents=[DATA_DIR])
    p.set_defaults(func=_clear)

    p = psub.add_parser("assign", help="give a held observation (see 'patient show') its patient", parents=[DATA_DIR])
    p.add_argument("observation_id", type=int, help="the held observation's number")
    p.add_argument("patient_id")
    p.add_argument("--name", default="", help='name in DICOM form, "Family^Given"')
    p.set_defaults(func=_assign)

    p = psub.add_parser(
        "show", help="the current patient and the observations waiting to be assigned", parents=[DATA_DIR]
    )
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=_show)

    p = sub.add_parser(
        "devices", help="every known device: connected or not, last reading, last error", parents=[DATA_DIR]
    )
    p.add_argument("--json", action="store_true", help="one JSON array")
    p.set_defaults(func=_devices)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _context(args: argparse.Namespace):  # -> (Config, PatientContext), both imported lazily
    from lastmile.clinic.patients import PatientContext
    from lastmile.commands.common import config_from_args

    config = config_from_args(args)
    return PatientContext.open(config.data_dir, config.patient.idle_timeout_s)


def _local(t: dt.datetime | None) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _set(args: argparse.Namespace) -> int:
    context = _context(args)
    try:
        if args.doctor:
            context.set_doctor(args.doctor, now=_now())
        current = context.set_patient(args.patient_id, args.name, now=_now())
    except ValueError as exc:
        print(f"lastmile patient set: {exc}", file=sys.stderr)
        return 2
    finally:
        context.close()
    print(
        f"current patient: {current.patient_id}{' ' + current.name if current.name else ''} "
        f"(until {_local(current.expires_at)} without activity)"
    )
    return 0


def _clear(args: argparse.Namespace) -> int:
    context = _context(args)
    try:
        cleared = context.clear(now=_now())
    finally:
        context.close()
    print("patient session ended" if cleared else "no current patient")
    return 0


def _assign(args: argparse.Namespace) -> int:
    from lastmile.clinic.observations import ObservationStore, UnknownObservationError
    from lastmile.commands.common import config_from_args
    from lastmile.data_dir import open_outbox

    config = config_from_args(args)
    with open_outbox(config) as outbox:
        store = ObservationStore.open(config.data_dir, outbox=outbox, idle_timeout_s=config.patient.idle_timeout_s)
        try:
            result = store.assign(args.observation_id, args.patient_id, name=args.name, now=_now())
        except UnknownObservationError as exc:
            print(f"lastmile patient assign: {exc} (see 'lastmile patient show')", file=sys.stderr)
            return 1
        except ValueError as exc:
            print(f"lastmile patient assign: {exc}", file=sys.stderr)
            return 2
        finally:
            store.close()
    print(f"observation #{args.observation_id} assigned to {result.patient_id} (outbox item {result.item_id})")
    return 0


def _show(args: argparse.Namespace) -> int:
    from lastmile.clinic.db import DB_NAME, open_clinic_db
    from lastmile.clinic.observations import observation_to_json, summary
    from lastmile.clinic.patients import PatientContext
    from lastmile.commands.common import config_from_args
    from lastmile.data_dir import existing_file

    config = config_from_args(args)
    current, doctor, rows = None, None, []
    if existing_file(config, DB_NAME) is not None:  # a read-only command creates nothing
        db = open_clinic_db(config.data_dir)
        try:
            context = PatientContext(db, config.patient.idle_timeout_s)
            now = _now()
            current = context.current(now)
            doctor = context.current_doctor(now)
            # Held observations live in clinic.db: no outbox needed to list them.
            rows = db.conn.execute("SELECT id, observation FROM held_observations ORDER BY id").fetchall()
        finally:
            db.conn.close()
    from lastmile.clinic.observations import observation_from_json

    held = [(int(r["id"]), observation_from_json(json.loads(r["observation"]))) for r in rows]
    if args.json:
        print(
            json.dumps(
                {
                    "current_patient": None
                    if current is None
                    else {
                        "patient_id": current.patient_id,
                        "name": current.name,
                        "since": current.since.isoformat(),
                        "expires_at": current.expires_at.isoformat(),
                    },
                    "doctor_id": doctor,
                    "unassigned": [{"id": i, **observation_to_json(o)} for i, o in held],
                },
                indent=2,
                ensure_ascii=False,
            )
        )
        return 0
    if current is None:
        print("no current patient" + (f" (doctor {doctor})" if doctor else ""))
    else:
        print(
            f"current patient: {current.patient_id}{' ' + current.name if current.name else ''} since "
            f"{_local(current.since)}, until {_local(current.expires_at)} without activity"
            + (f", doctor {doctor}" if doctor else "")
        )
    if not held:
        print("no observations waiting to be assigned")
        return 0
    print(f"{len(held)} observation(s) waiting to be assigned ('lastmile patient assign ID PATIENT'):")
    for i, o in held:
        print(f"  #{i:<5d} {_local(o.measured_at)}  {o.kind:18s} {summary(o):36s} {o.device.label()}")
    return 0


def _devices(args: argparse.Namespace) -> int:
    from lastmile.clinic.db import DB_NAME
    from lastmile.clinic.devices import DeviceRegistry
    from lastmile.commands.common import config_from_args
    from lastmile.data_dir import existing_file

    config = config_from_args(args)
    records = []
    if existing_file(config, DB_NAME) is not None:  # a read-only command creates nothing
        registry = DeviceRegistry.open(config.data_dir)
        try:
            records = registry.all()
        finally:
            registry.close()
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=2, ensure_ascii=False))
        return 0
    if not records:
        print("no devices known (pair BLE devices with 'lastmile ble pair ADDRESS')")
        return 0
    for r in records:
        state = "connected" if r.connected else "not connected"
        allowed = "" if r.allowed or r.transport != "ble" else " (not paired)"
        ident = " ".join(x for x in (r.manufacturer, r.model, r.serial) if x)
        if r.transport == "serial" and r.name:
            # "<name> (<profile>) on <port>": where a technician finds it
            ident = f"{r.name}  {ident}".rstrip()
        ident = ident or r.name or "-"
        print(f"{r.transport:6s} {r.address:17s}  {state:13s}{allowed}  {ident}")
        if r.last_reading:
            print(f"       last reading {_local(r.last_reading_at)}: {r.last_reading}")
        if r.last_error:
            print(f"       last error   {_local(r.last_error_at)}: {r.last_error}")
    return 0
