"""`lastmile forward | echo | queue | retry`: the reading-center side of the gateway."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sqlite3
import sys
import time
from typing import TYPE_CHECKING, Any

from lastmile.commands.common import DATA_DIR
from uploader.fhir_link import LAST_ERROR_AT
from uploader.masking import mask_server_text

if TYPE_CHECKING:
    from lastmile.config import Config
    from uploader.outbox import Outbox


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("forward", help="run the forwarder in the foreground until stopped", parents=[DATA_DIR])
    p.add_argument("--once", action="store_true", help="one round, then exit (for scripts)")
    p.set_defaults(func=_forward)

    p = sub.add_parser(
        "echo", help="C-ECHO the configured reading center, or HOST PORT (like echoscu)", parents=[DATA_DIR]
    )
    p.add_argument("host", nargs="?")
    p.add_argument("port", nargs="?", type=int)
    p.add_argument("--called-ae", "-aec", help="called AE title (default: from the configuration)")
    p.set_defaults(func=_echo)

    p = sub.add_parser(
        "queue", help="outbox counts per state, oldest waiting, last success, quarantined", parents=[DATA_DIR]
    )
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=_queue)

    p = sub.add_parser("retry", help="send a quarantined item again (after fixing its cause)", parents=[DATA_DIR])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("id", nargs="?", type=int, help="outbox item id")
    g.add_argument("--quarantined", action="store_true", help="every quarantined item")
    p.set_defaults(func=_retry)


def _forward(args: argparse.Namespace) -> int:
    # The forwarder only moves bytes. pydicom and sqlite-utils import numpy when it is there,
    # which costs ~15 MB of RSS on a 512 MB Pi: keep it out of this process.
    sys.modules.setdefault("numpy", None)  # type: ignore[arg-type]
    from lastmile.commands.common import config_from_args
    from lastmile.services.forward import ForwardService

    if args.once:
        import threading

        service = ForwardService(config_from_args(args))
        try:
            service.step(threading.Event())
            print(service.status_line())
        finally:
            service.close()
        return 0
    from lastmile.services.runtime import ServiceRuntime

    runtime = ServiceRuntime("forward", load_config=lambda: config_from_args(args))
    return runtime.run(lambda config: ForwardService(config, alive=runtime.alive, stop=runtime.stop_event))


def _echo(args: argparse.Namespace) -> int:
    from lastmile.commands.common import config_from_args
    from lastmile.services.forward import peer_settings
    from uploader.dicom_association import echo
    from uploader.errors import ConfigurationFault, TransientError

    config = config_from_args(args)
    if (args.host is None) != (args.port is None):
        print("lastmile echo: give both HOST and PORT, or neither", file=sys.stderr)
        return 2
    peer = peer_settings(config.reading_center, host=args.host, port=args.port, called_ae=args.called_ae)
    where = f"{peer.called_ae}@{peer.host}:{peer.port} as {peer.calling_ae}"
    code = 0
    try:
        rtt = echo(peer)
        print(f"OK    C-ECHO {where}: {rtt * 1000:.0f} ms")
    except ConfigurationFault as exc:
        print(
            f"FAIL  {where}: the reading center refuses this gateway: {exc}\n"
            f"      hint: ask the reading center to register AE {peer.calling_ae!r} "
            f"(and this gateway's address), or fix reading_center.* in {config.source}"
        )
        code = 1
    except TransientError as exc:
        from uploader.reachability import local_fault

        local = local_fault(peer.host, peer.port, timeout_s=min(peer.timeout_s, 5.0))
        if local:
            print(
                f"FAIL  {where}: not reachable: {exc}\n      LOCAL FAULT (this gateway, not the reading center): {local}"
            )
        else:
            print(
                f"FAIL  {where}: not reachable now: {exc}\n"
                "      hint: this gateway's network works; check the reading center's host/port, "
                "or ask the reading center whether its PACS is up"
            )
        code = 1
    if args.host is None:
        fault = _recorded_fault(config)
        if fault:
            print(f"NOTE  the forwarder last recorded: {fault}")
    return code


def _recorded_fault(config: Config) -> str | None:
    from lastmile.data_dir import DataDirError, open_existing_outbox

    try:
        outbox = open_existing_outbox(config)  # never creates the data directory
        if outbox is None:
            return None
        with outbox:
            status = outbox.status("reading_center") or {}
    except (DataDirError, OSError, sqlite3.Error):  # unreadable: nothing to add to the echo
        return None
    fault = status.get("fault")
    return mask_server_text(fault) if fault else None


def _empty_stats() -> dict[str, Any]:
    """What `Outbox.stats` says of an outbox that was never created."""
    from uploader.outbox import ItemState

    return {
        "counts": {s.value: 0 for s in ItemState},
        "oldest_waiting_s": None,
        "last_sent_at": None,
        "last_committed_at": None,
        "quarantined": [],
        "statuses": {},
        "waiting_bytes": 0,
        "free_bytes": None,
    }


def _link_wait(conn: sqlite3.Connection, now: float) -> dict[str, Any]:
    """The age of the oldest item waiting for the link: not an ECG held for the doctor."""
    from lastmile.ecg.holds import oldest_wait_s

    return {"oldest_waiting_s": oldest_wait_s(conn, now)}


def _mask_stats(stats: dict[str, Any]) -> None:
    """Reasons recorded by an older version may still hold a server's unmasked text."""
    for q in stats.get("quarantined", []):
        if q.get("reason"):
            q["reason"] = mask_server_text(q["reason"])
    for value in stats.get("statuses", {}).values():
        if isinstance(value, dict):
            for key in ("fault", "last_error", "detail"):
                if isinstance(value.get(key), str):
                    value[key] = mask_server_text(value[key])


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "never"
    secs = max(0.0, now - ts)
    from lastmile.clock import clinic_time

    when = clinic_time(dt.datetime.fromtimestamp(ts, dt.timezone.utc))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if secs >= size:
            return f"{when} ({secs / size:.1f} {unit} ago)"
    return f"{when} ({secs:.0f} s ago)"


def _metered(config: Config, outbox: Outbox | None, now: float) -> dict[str, dict[str, Any]]:
    """Per metered destination: whether routine traffic waits on its window or budget, until
    when, what is spent today and (for queued kinds) how many items wait (lastmile.services.metered,
    as the doctor and the console say it)."""
    from lastmile.services.metered import metered_waits

    if outbox is None:
        return {}
    return {
        name: {
            "what": wait.what,
            "waits_on": None if wait.blocked is None else wait.blocked.reason,
            "until": None if wait.blocked is None else wait.blocked.until,
            "detail": None if wait.blocked is None else wait.blocked.detail,
            "spent_today_bytes": wait.spent_today_bytes,
            "budget_bytes": wait.budget_bytes or None,
            "windows": list(wait.windows),
            "routine_waiting": wait.routine_waiting,
        }
        for name, wait in metered_waits(config, outbox, now).items()
    }


def _metered_line(m: dict[str, Any], now: float) -> str:
    from lastmile.clock import clinic_time

    used = f"{m['spent_today_bytes'] / 2**20:.1f} MB used today" + (
        f" of {m['budget_bytes'] / 2**20:.1f} MB" if m["budget_bytes"] else ""
    )
    windows = f"; sends {', '.join(m['windows'])}" if m["windows"] else ""
    if m["waits_on"] is None:
        return f"metered {m['what']}: open; {used}{windows}"
    count = "" if m["routine_waiting"] is None else f"{m['routine_waiting']} routine item(s) "
    until = clinic_time(dt.datetime.fromtimestamp(m["until"], dt.timezone.utc), minutes=True)
    what = "the send window" if m["waits_on"] == "window" else "the daily budget"
    hours = max(0.0, m["until"] - now) / 3600
    return (
        f"metered {m['what']}: {count}waiting on {what} until {until} (in {hours:.1f} h): {m['detail']}; "
        f"{used}{windows}; STAT goes anyway"
    )


def _ecgs_with_problems(outbox: Outbox, now: float) -> list[dict[str, Any]]:
    """ECGs not yet sent whose quality check found something, for the doctor to see."""
    from uploader.outbox import ItemState, Kind

    found = []
    for state in (ItemState.QUEUED, ItemState.SENDING):
        for item in outbox.items(state=state, kind=Kind.DICOM):
            quality = item.meta.get("quality") or {}
            if quality.get("verdict") not in (None, "acceptable"):
                held = item.held(now)
                found.append(
                    {
                        "id": f"E{item.id}",
                        "state": state.value,
                        "held": held,
                        "held_until": item.hold_until if held else None,
                        "quality": quality,
                    }
                )
    return found


def _queue(args: argparse.Namespace) -> int:
    from lastmile.commands.common import config_from_args
    from lastmile.data_dir import DataPartitionFullError, open_existing_outbox

    config = config_from_args(args)
    now = time.time()
    try:
        outbox = open_existing_outbox(config)  # a read-only command: never creates the data directory
    except DataPartitionFullError:
        # opening writes (recovery, reserve, -shm): on a full partition read what is on disk instead
        from uploader.outbox import snapshot_stats

        outbox = None
        stats = snapshot_stats(config.data_dir, now, read_more=lambda conn: _link_wait(conn, now))
    else:
        if outbox is None:
            stats = _empty_stats()
            print(f"note: no outbox in {config.data_dir} yet: nothing has been queued there", file=sys.stderr)
        else:
            with outbox:
                stats = outbox.stats(now) | _link_wait(outbox.db.conn, now)
                stats["ecgs_with_problems"] = _ecgs_with_problems(outbox, now)
                stats["metered"] = _metered(config, outbox, now)
    free, min_free = stats.get("free_bytes"), config.outbox.min_free_mb * 2**20
    stats["storage_full"] = free is not None and free < min_free
    _mask_stats(stats)
    if args.json:
        print(json.dumps(stats, sort_keys=True, default=str))
        return 0
    counts = stats.get("counts", {})
    order = ("queued", "sending", "sent", "committed", "purged", "quarantined")
    held = stats.get("held", 0)
    print(
        "outbox: "
        + ", ".join(
            f"{k} {counts.get(k, 0)}" + (f" ({held} held for the doctor)" if k == "queued" and held else "")
            for k in order
        )
    )
    oldest = stats.get("oldest_waiting_s")
    print(f"oldest waiting: {'none' if oldest is None else f'{oldest / 60:.1f} min'}")
    print(f"last sent: {_ago(stats.get('last_sent_at'), now)}")
    print(f"last committed: {_ago(stats.get('last_committed_at'), now)}")
    if stats["storage_full"] and free is not None:
        print(
            f"FAULT data partition full: {free / 2**20:.1f} MB free, {min_free / 2**20:.0f} MB must stay free. "
            "New ECGs and readings are refused; what is queued is kept and sent as soon as the "
            "reading center can be reached (sending frees space). If the network is up and this stays, "
            "call the county IT to free space on the data partition."
        )
    statuses = stats.get("statuses", {})
    rc = statuses.get("reading_center") or {}
    if rc.get("fault"):
        print(
            f"FAULT reading center refuses this gateway: {rc['fault']}"
            f" (since {_ago(rc.get('fault_since'), now)}; items stay queued and are retried)"
        )
    elif rc.get("last_error"):
        print(f"last network error: {rc['last_error']} ({_ago(rc.get(LAST_ERROR_AT), now)})")
    sc = statuses.get("storage_commitment") or {}
    if sc.get("supported") is False:
        print(
            f"note: the reading center does not offer storage commitment ({sc.get('detail', '')}); "
            f"policy: {config.reading_center.no_commitment_policy}"
        )
    for m in stats.get("metered", {}).values():
        print(_metered_line(m, now))
    for q in stats.get("quarantined", []):
        print(f"quarantined #{q['id']} {q['kind']} {q['key']}: {q['reason']}")
    from lastmile.commands.common import quality_lines

    for ecg in stats.get("ecgs_with_problems", []):
        where = f"held until {_ago(ecg['held_until'], now)}" if ecg["held"] else ecg["state"]
        lines = quality_lines(ecg["quality"])
        print(f"ECG {ecg['id']} ({where}): " + lines[0])
        for line in lines[1:]:
            print(f"    {line}")
    return 0


def _retry(args: argparse.Namespace) -> int:
    from lastmile.commands.common import config_from_args
    from lastmile.data_dir import open_outbox

    config = config_from_args(args)
    now = time.time()
    with open_outbox(config) as outbox:
        if args.quarantined:
            n = outbox.retry_quarantined(now)
            print(f"{n} quarantined item(s) queued again")
            return 0
        if outbox.retry(args.id, now):
            print(f"item {args.id} queued again")
            return 0
    print(f"lastmile retry: item {args.id} is not quarantined (or does not exist)", file=sys.stderr)
    return 1
