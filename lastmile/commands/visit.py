"""`lastmile visit start|note|stop|retry|list|export|verify|households`: home visits, offline."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING

from lastmile.clock import clinic_time
from lastmile.config import fhir_naming

if TYPE_CHECKING:
    from collections.abc import Callable

    from devices.gps.fix import Fix
    from lastmile.visits.book import Visit

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    visit = sub.add_parser("visit", help="home visits: start, note, stop, retry, list, export, verify")
    vsub = visit.add_subparsers(dest="visit_command", metavar="SUBCOMMAND")
    p = vsub.add_parser("start", help="start a visit (records where and when)")
    p.add_argument("--patient", required=True, metavar="ID")
    p.add_argument("--household", metavar="ID", help="household id from the county register")
    p.add_argument("--clinic", action="store_true", help="a clinic visit rather than a home visit")
    p.add_argument("--no-gps", action="store_true", help="do not wait for a fix")
    p.set_defaults(func=start)
    p = vsub.add_parser("note", help="add a note to the open visit")
    p.add_argument("text")
    p.set_defaults(func=note)
    p = vsub.add_parser("stop", help="stop the open visit: check, sign, queue for the county")
    p.add_argument("--no-gps", action="store_true")
    p.set_defaults(func=stop)
    p = vsub.add_parser("retry", help="send a set-aside (damaged) visit again once its record is repaired")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("visit_id", nargs="?", metavar="ID", help="the visit's id (or its first characters)")
    which.add_argument("--all", action="store_true", help="every set-aside visit")
    p.set_defaults(func=retry)
    p = vsub.add_parser("list", help="recent visits and their flags")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=list_visits)
    p = vsub.add_parser("export", help="export the signed visit chain (JSON Lines)")
    p.add_argument("file")
    p.set_defaults(func=export)
    p = vsub.add_parser("verify", help="verify an exported visit chain")
    p.add_argument("file")
    p.add_argument("--public-key", metavar="B64", help="expected gateway public key (base64)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=verify)
    p = vsub.add_parser("households", help="import the county's household register (CSV)")
    p.add_argument("file", nargs="?", help="CSV: household_id, latitude, longitude (default: config)")
    p.set_defaults(func=households)
    visit.set_defaults(func=lambda args: (visit.print_help(), 2)[1])


def _book(args: argparse.Namespace):
    from lastmile.commands.common import config_from_args
    from lastmile.visits.book import VisitBook, VisitPolicy

    config = config_from_args(args)
    book = VisitBook.open(config.data_dir, gateway_id=config.gateway.id, policy=VisitPolicy.from_config(config.visits))
    if config.visits.household_register:
        stamp = book.clock.now()
        try:
            register, datum = config.visits.household_register, config.visits.register_datum
            if book.register.sync_from(register, stamp.time.isoformat() if stamp.time else "", datum):
                log.info("household register re-imported from %s (%s)", register, datum)
        except (ValueError, OSError) as exc:
            log.warning("household register not imported: %s", exc)
    return config, book


def _fix(config, book, skip: bool):
    """The best fix within visits.fix_wait_s; every fix seen also feeds the clock and the track."""
    if skip or config.gps.source == "none":
        return None
    from firmware_bridge.errors import GnssError
    from firmware_bridge.gnss import best_fix
    from lastmile.visits.book import FixRecord
    from lastmile.visits.gnss_share import SharedFixes, open_receiver

    def seen(fix) -> bool:
        record = book.observe_fix(fix)
        if record is None:
            return False  # stale: e.g. the receiver's buffered cycle from the last household
        records[id(fix)] = record
        return True

    try:
        source = open_receiver(config.gps, lambda: book, config.visits.fix_wait_s, owns_book=False)
        assert source is not None
        records: dict[int, FixRecord] = {}  # of a receiver this command reads itself
        on_fix: Callable[[Fix], bool] | None = seen
        if isinstance(source, SharedFixes):  # recorded by the acquire service (track, anchor)
            records, on_fix = source.records, None
        try:
            fix = best_fix(source, config.visits.fix_wait_s, on_fix=on_fix)
        finally:
            source.close()
    except GnssError as exc:
        print(f"no GPS: {exc} (the visit is recorded and flagged)", file=sys.stderr)
        return None
    if fix is None:
        print("no position fix within the wait (the visit is recorded and flagged)", file=sys.stderr)
        return None
    record = records.get(id(fix))
    return record if record is not None else FixRecord(fix, book.clock.now())


def _fail(exc: Exception) -> int:
    print(f"lastmile visit: {exc}", file=sys.stderr)
    return 1


def start(args: argparse.Namespace) -> int:
    from lastmile.clinic.patient_ids import clinic_patient
    from lastmile.visits.book import VisitError

    config, book = _book(args)
    with book:
        try:
            patient_id = clinic_patient(args.patient, "", config).patient_id  # checked per [patient] id_kind
        except ValueError as exc:
            return _fail(exc)
        try:
            fix = _fix(config, book, args.no_gps)
            visit = book.start(
                patient_id,
                doctor_id=config.visits.doctor_id,
                household_id=args.household,
                fix=fix,
                setting="clinic" if args.clinic else None,
            )
        except VisitError as exc:
            return _fail(exc)
        print(
            f"visit {visit.id} started"
            + (
                f" at {clinic_time(visit.start.time)} ({visit.start.source.value})"
                if visit.start.time
                else " (time provisional until GPS or NTP)"
            )
        )
    return 0


def note(args: argparse.Namespace) -> int:
    from lastmile.visits.book import VisitError

    _, book = _book(args)
    with book:
        try:
            book.note(args.text)
        except VisitError as exc:
            return _fail(exc)
    return 0


def stop(args: argparse.Namespace) -> int:
    from lastmile.visits.book import START_TIME_LOST, VisitError
    from lastmile.visits.chain import KEY_FILE

    config, book = _book(args)
    with book:
        try:
            fix = _fix(config, book, args.no_gps)
            visit = book.stop(fix)
        except VisitError as exc:
            # A stop that died after closing the visit but before queueing it (power cut, kill)
            # leaves it closed and unqueued: the doctor's second stop finds nothing open, and
            # must still queue it (found by bench/kill_campaign.py).
            _queue_closed(config, book)
            return _fail(exc)
        flags = ", ".join(visit.flags) or "none"
        key_damaged = not visit.chain_seq and book.notices.key_damaged  # its time is known: the key failed
        if visit.chain_seq:
            signed = f"chain record {visit.chain_seq}"
        elif key_damaged:
            signed = "not signed: the gateway's signing key is damaged"
        else:
            signed = "signed once GPS or NTP gives the time"
        print(f"visit {visit.id} stopped; {signed}; flags: {flags}")
        start_pending = visit.start.time is None and START_TIME_LOST not in visit.flags
        queued = _queue_closed(config, book)
        if not queued and key_damaged:
            print(
                f"the signing key {book.data_dir / KEY_FILE} is damaged (SD card): restore it from its backup "
                "(tell the county IT). The visit is kept, and is signed and sent once the key is repaired"
            )
        elif not queued and (start_pending or visit.end is None or visit.end.time is None):
            print(
                "not queued yet: its time is provisional until GPS or NTP gives one; the forward service sends it then"
            )
        fault = (book.get(visit.id) or visit).fhir_fault
        if fault:
            print(f"it cannot be sent to the county platform: {fault}")
        if START_TIME_LOST in visit.flags:
            print("its start time was lost in a reboot (no time was known yet): it is sent without one")
    return 0


def _queue_closed(config, book) -> int:
    from lastmile.data_dir import open_outbox

    with open_outbox(config) as outbox:
        queued = book.queue_closed(outbox, fhir_naming(config))
    if queued:
        print(f"{queued} visit(s) queued for the county platform")
    return queued


def retry(args: argparse.Namespace) -> int:
    from lastmile.visits.book import VisitError

    _, book = _book(args)
    with book:
        try:
            retried = book.retry_set_aside(None if args.all else args.visit_id)
        except VisitError as exc:
            return _fail(exc)
    if not retried:
        print("no visit is set aside")
        return 0
    print(
        f"{len(retried)} visit(s) will be signed and sent again by the forward service; one still damaged "
        "is set aside again (`lastmile visit list` says why)"
    )
    return 0


def list_visits(args: argparse.Namespace) -> int:
    from lastmile.visits.book import START_TIME_LOST

    _, book = _book(args)
    with book:
        visits = book.visits(limit=args.limit)
    if args.json:
        for v in visits:
            print(json.dumps(v.to_json(), sort_keys=True))
        return 0
    if not visits:
        print("no visits")
    for v in visits:
        if v.start.time:
            when = clinic_time(v.start.time, minutes=True)
        elif v.row_damaged:
            when = f"{'record damaged':22}"
        else:  # a start lost to a reboot is never repaired: not "pending"
            when = f"{'start time lost' if START_TIME_LOST in v.flags else 'time pending':22}"
        dist = f"{v.distance_m:.0f} m" if v.distance_m is not None else "-"
        print(
            f"{when}  {v.state:6}  patient {v.patient_id:12} household {v.household_id or '-':10} "
            f"{dist:>8}  {', '.join(v.flags) or ('not checked' if v.recorded_again else 'ok')}{_damage_advice(v)}"
            f"{_sent_alone(v)}"
        )
    return 0


def _sent_alone(v: Visit) -> str:
    """Its readings that went to the county platform on their own, and those released that went
    nowhere yet (quarantined: a damaged record, or one FHIR cannot say; "" when none was released)."""
    said = ""
    if n := v.readings_sent_alone:
        said += f"  {n} reading{'s' if n != 1 else ''} sent without the visit"
    if n := v.readings_not_sent:
        said += f"  {n} reading{'s' if n != 1 else ''} not sent: see lastmile queue"
    return said


def _damage_advice(v: Visit) -> str:
    """What the doctor does about a visit whose record is damaged ("" for a sound one)."""
    if not v.fhir_fault:
        return ""
    if v.state == "open":  # nothing is set aside yet, so nothing to retry: stop closes it aside
        return (
            f"  its record is damaged: cannot be sent to the county platform ({v.fhir_fault}); "
            "`lastmile visit stop` closes it and keeps it aside"
        )
    if v.recorded_again:  # never checked, and recorded again as stop said: a retry would send it twice
        return f"  kept aside, never sent: its record was damaged when it was stopped ({v.fhir_fault})"
    return (
        f"  set aside, its record is damaged: cannot be sent to the county platform ({v.fhir_fault}); "
        f"once repaired: lastmile visit retry {v.id[:8]}"
    )


def export(args: argparse.Namespace) -> int:
    _, book = _book(args)
    with book:
        count = book.export_chain(args.file)
    print(f"{count} visit records exported to {args.file}")
    return 0


def verify(args: argparse.Namespace) -> int:
    from lastmile.visits.chain import verify_export

    try:
        report = verify_export(args.file, args.public_key)
    except OSError as exc:
        return _fail(exc)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": report.ok,
                    "records": report.records,
                    "gateway_id": report.gateway_id,
                    "public_key": report.public_key,
                    "head": report.head,
                    "problems": report.problems,
                }
            )
        )
    else:
        for problem in report.problems:
            print(f"FAIL {problem}")
        print(
            f"{'OK' if report.ok else 'FAILED'}: {report.records} records from gateway {report.gateway_id}; "
            f"head {report.head[:16]}..."
        )
    return 0 if report.ok else 1


def households(args: argparse.Namespace) -> int:
    from lastmile.visits.households import RegisterError

    config, book = _book(args)
    path = args.file or config.visits.household_register
    if not path:
        return _fail(ValueError("no file given and visits.household_register is not set"))
    with book:
        try:
            count = book.register.import_csv(
                path, (book.clock.now().time or "").__str__(), config.visits.register_datum
            )
        except (RegisterError, OSError, UnicodeDecodeError) as exc:
            return _fail(exc)
    print(f"{count} households imported from {path} (positions read in {config.visits.register_datum})")
    return 0
