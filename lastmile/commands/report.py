"""`lastmile report list | show | print | ack | poll`: the county's reports, back in the village."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lastmile.commands.common import DATA_DIR

if TYPE_CHECKING:
    from lastmile.config import Config
    from lastmile.reports.store import ReportStore, StoredReport


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="reports from the reading center: list, show, print, acknowledge")
    rsub = p.add_subparsers(dest="report_command", metavar="ACTION", required=True)

    q = rsub.add_parser("list", help="every ECG sent (last 14 days) and its report status", parents=[DATA_DIR])
    q.add_argument("--json", action="store_true", help="one JSON document")
    q.add_argument("--all", action="store_true", help="every ECG still on record, not only the last 14 days")
    q.set_defaults(func=_list)

    q = rsub.add_parser("show", help="one report in full", parents=[DATA_DIR])
    q.add_argument("id", type=int, help="report id (from `lastmile report list`)")
    q.set_defaults(func=_show)

    q = rsub.add_parser("print", help="print a report (CUPS lp), or write it to a file", parents=[DATA_DIR])
    q.add_argument("id", type=int)
    q.add_argument("-d", "--printer", help="CUPS destination (default: the default printer)")
    q.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of printing")
    q.set_defaults(func=_print)

    q = rsub.add_parser("ack", help="the doctor has read this (critical) report", parents=[DATA_DIR])
    q.add_argument("id", type=int)
    q.add_argument("--by", help="who acknowledges (default: the clinic session's doctor)")
    q.set_defaults(func=_ack)

    q = rsub.add_parser("poll", help="ask the reading center now, for every outstanding study", parents=[DATA_DIR])
    q.set_defaults(func=_poll)


def _store(args: argparse.Namespace) -> tuple[Config, ReportStore]:
    from lastmile.commands.common import config_from_args
    from lastmile.reports.store import ReportStore

    config = config_from_args(args)
    return config, ReportStore.open(config.data_dir)


def _list(args: argparse.Namespace) -> int:
    from lastmile.reports.views import render_list, study_lines

    config, store = _store(args)
    with store:
        since = None if args.all else dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=config.reports.window_days)
        lines = study_lines(store, since=since)
    if args.json:
        print(json.dumps([line.to_json() for line in lines], ensure_ascii=False, indent=2))
    else:
        print(render_list(lines))
    return 0


def _report_or_fail(store: ReportStore, report_id: int) -> StoredReport | None:
    report = store.get(report_id)
    if report is None:
        print(f"lastmile report: no report {report_id} (see `lastmile report list`)", file=sys.stderr)
    return report


def _show(args: argparse.Namespace) -> int:
    from lastmile.reports.views import render_report, speaker_for

    config, store = _store(args)
    with store:
        report = _report_or_fail(store, args.id)
        if report is None:
            return 1
        print(render_report(store, report, speaker_for(config.console.language)))
    return 0


def _print(args: argparse.Namespace) -> int:
    from lastmile.reports.printing import lp_command, print_behind_note
    from lastmile.reports.views import note_for_pdf, printable, speaker_for

    config, store = _store(args)
    with store:
        report = _report_or_fail(store, args.id)
        if report is None:
            return 1
        speaker = speaker_for(config.console.language)
        data, suffix = printable(store, report, speaker)
        # what the county's PDF cannot say (replaced; sent without a patient): a page of its own first
        note = note_for_pdf(store, report, speaker) if suffix == ".pdf" else ""
    if note:
        print(note)  # a PDF written to a file cannot carry it
    if lp_command() and not args.output:
        title = f"ECG report {report.id}"
        done = print_behind_note(note, data, title, args.printer)
        if done.sent:
            print(f"report {report.id} sent to the printer: {done.message}")
            return 0
        print(f"lp failed ({done.message}); writing a file instead", file=sys.stderr)
    path = Path(args.output or f"lastmile-report-{report.id}{suffix}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # patient data: owner only
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    print(
        f"report {report.id} written to {path}" + ("" if lp_command() else " (no printer: CUPS `lp` is not installed)")
    )
    return 0


def _ack(args: argparse.Namespace) -> int:
    from lastmile.clinic.db import utc_now
    from lastmile.clinic.patients import PatientContext

    config, store = _store(args)
    by = args.by
    if not by:
        session = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
        try:
            by = session.current_doctor(utc_now()) or ""
        finally:
            session.close()
    with store:
        try:
            report = store.acknowledge(args.id, by, utc_now())
        except KeyError:
            print(f"lastmile report: no report {args.id} (see `lastmile report list`)", file=sys.stderr)
            return 1
    what = "critical report" if report.critical else "report"
    print(f"{what} {report.id} acknowledged" + (f" by {report.acknowledged_by}" if report.acknowledged_by else ""))
    return 0


def _poll(args: argparse.Namespace) -> int:
    from lastmile.commands.common import config_from_args
    from lastmile.reports.service import make_poller
    from lastmile.reports.store import ReportStore
    from lastmile.services.forward import peer_settings

    config = config_from_args(args)
    if config.reports.source == "off":
        print("reports.source is off: nothing to ask", file=sys.stderr)
        return 2
    with ReportStore.open(config.data_dir) as store:
        poller = make_poller(config, store, peer_settings(config.reading_center))
        try:
            result = poller.run_round(force=True)
        finally:
            if poller.fhir is not None:
                poller.fhir.close()
    print(
        f"asked about {result.asked} studies: {result.found} report objects at the reading center, "
        f"{result.stored} new ({result.critical} critical), {result.bytes} bytes"
    )
    if result.error or result.fault:
        print(f"lastmile report poll: {result.error or result.fault}", file=sys.stderr)
        return 1
    return 0
