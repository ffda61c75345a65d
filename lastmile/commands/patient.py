"""`lastmile patient set | clear | assign | show` and `lastmile devices`: the clinic session."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from typing import TYPE_CHECKING

from lastmile.commands.common import DATA_DIR

if TYPE_CHECKING:  # the command imports its modules when it runs: `lastmile --help` stays quick
    from devices.identity import Patient
    from lastmile.clinic.device_users import DeviceUser
    from uploader.outbox import OutboxItem


def register(sub: argparse._SubParsersAction) -> None:
    patient = sub.add_parser("patient", help="the current patient; assign held (unassigned) observations")
    psub = patient.add_subparsers(dest="patient_command", metavar="COMMAND")
    patient.set_defaults(func=lambda _a: (patient.print_help(), 2)[1])

    p = psub.add_parser(
        "set", help="make ID the current patient (readings from now on land on them)", parents=[DATA_DIR]
    )
    p.add_argument("patient_id", help="the patient's ID (a resident ID is checked when [patient] id_kind says so)")
    name = p.add_mutually_exclusive_group()
    name.add_argument("--name", default="", help='name, e.g. "张三" or "Family^Given" (a pinyin group is added)')
    # an empty --name keeps the checked-in patient's name (a scanned card names none): clearing is on purpose
    name.add_argument("--clear-name", action="store_true", help="the checked-in patient's name was wrong: no name")
    p.add_argument("--doctor", default="", help="the doctor on duty (name or id): Referring Physician of the ECGs")
    # default None: setting the checked-in patient again (a name fixed) keeps their STAT as it is
    p.add_argument(
        "--stat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="urgent: this patient's ECGs are read first, never held (--no-stat: routine again; "
        "neither: as the check-in has it)",
    )
    reason = p.add_mutually_exclusive_group()
    reason.add_argument("--reason", default="", metavar="TEXT", help='why the ECG is taken, e.g. "胸痛 chest pain"')
    reason.add_argument("--clear-reason", action="store_true", help="the checked-in patient's reason was wrong: none")
    # the name a cuff's user was mapped with is one the doctor typed too: another one is asked about
    p.add_argument(
        "--correct-name",
        action="store_true",
        help="--name is right: a device user mapped to ID under another name was mapped with a wrong name "
        "(it is corrected)",
    )
    # another ID under the checked-in patient's own name: only the doctor knows which (as Today asks);
    # each flag stores its `SameName` value in `same_name`, read by `_same_name_answer`
    whose = p.add_mutually_exclusive_group()
    whose.add_argument(
        "--corrected",
        dest="same_name",
        action="store_const",
        const="corrected",
        help="ID corrects the checked-in patient's mistyped ID (same name): the old ID loses the name",
    )
    whose.add_argument(
        "--other-id",
        dest="same_name",
        action="store_const",
        const="other-id",
        help="ID is the checked-in patient's other ID (same name; ID card and clinic number): both keep the name",
    )
    whose.add_argument(
        "--another-person",
        dest="same_name",
        action="store_const",
        const="another-person",
        help="ID is another patient who has the checked-in patient's name: his check-in ends, he keeps his name",
    )
    # the answer names whom it answers about: a card read since the question gets no answer meant for another
    p.add_argument(
        "--about",
        metavar="CHECKED_IN_ID",
        help="with an answer: the checked-in patient the question was about (the command it printed has it); "
        "refused if another is checked in now",
    )
    p.set_defaults(func=_set)

    p = psub.add_parser("clear", help="end the current patient's session (next readings are held)", parents=[DATA_DIR])
    p.set_defaults(func=_clear)

    p = psub.add_parser(
        "assign", help="give a held observation or ECG (see 'patient show') its patient", parents=[DATA_DIR]
    )
    p.add_argument("held_id", metavar="HELD", help="a held observation's number (12) or ECG's (E12)")
    p.add_argument("patient_id")
    _name_arguments(p, "PATIENT_ID")
    p.set_defaults(func=_assign)

    p = psub.add_parser(
        "map-user",
        help="whose readings user N of a multi-user device (BP cuff, scale) are; unmapped, user 1's are the "
        "checked-in patient's and other users' are held",
        parents=[DATA_DIR],
    )
    p.add_argument("address", help="the device's Bluetooth address, like C0:26:DA:01:02:03")
    p.add_argument("user", type=int, help="the user number the device gives (its user button: 1, 2 ...)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--patient", metavar="ID", help="this patient's readings, whoever is checked in")
    who.add_argument(
        "--current", action="store_true", help="the checked-in patient's (the clinic measures as this user)"
    )
    who.add_argument(
        "--remove", action="store_true", help="forget the mapping: user 1 is the checked-in patient's, others held"
    )
    _name_arguments(p, "--patient")
    p.set_defaults(func=_map_user)

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


def _name_arguments(p: argparse.ArgumentParser, whose: str) -> None:
    """--name and --correct-name of a command that gives a patient ID its name (`_which_name`)."""
    p.add_argument(
        "--name",
        default="",
        help=f"the {whose}'s name (default: the name his ID was checked in under in the last 24 h; another one is refused)",
    )
    p.add_argument(
        "--correct-name",
        action="store_true",
        help=f"--name is right: the name the {whose} was checked in under in the last 24 h was wrong (it is corrected)",
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _context(args: argparse.Namespace):  # -> (Config, PatientContext), both imported lazily
    from lastmile.clinic.patients import PatientContext
    from lastmile.commands.common import config_from_args

    config = config_from_args(args)
    return PatientContext.open(config.data_dir, config.patient.idle_timeout_s)


def _local(t: dt.datetime | None) -> str:
    """A time as the clinic reads it: in its zone, with the offset (+08:00)."""
    from lastmile.clock import clinic_time

    return clinic_time(t)


def _set(args: argparse.Namespace) -> int:
    from lastmile.clinic.device_users import DeviceUsers
    from lastmile.clinic.patient_ids import clinic_patient
    from lastmile.clinic.patients import PatientChanged, PatientContext
    from lastmile.commands.common import config_from_args

    config = config_from_args(args)
    try:
        patient = clinic_patient(args.patient_id, args.name, config)
    except ValueError as exc:
        print(f"lastmile patient set: {exc}", file=sys.stderr)
        return 2
    answer = _same_name_answer(args)
    about = (args.about or "").strip()
    if (answer is None) != (not about):
        print(_answer_without_about(answer), file=sys.stderr)
        return 2
    if args.correct_name and not patient.name:
        print(_correct_name_without_name(), file=sys.stderr)
        return 2
    given = f"--about {about} --{answer.value}" if answer is not None else ""  # to leave out when run again
    context = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
    expected = ""  # whoever was checked in when asked ("": nobody); an answer's --about is him
    try:
        now = _now()
        seen = context.current(now)  # before the question: a card read between is refused below
        expected = seen.patient_id if seen is not None else ""
        replaced = context.same_name_replaced(patient.patient_id, patient.name, now)
        if replaced is not None and answer is None:
            print(_whose_id(replaced.patient_id, args), file=sys.stderr)
            return 2
        if answer is not None and about != expected:
            print(_changed_meanwhile(about, expected, patient.patient_id, given), file=sys.stderr)
            return 2
        if seen is not None and answer is not None and replaced is None and seen.patient_id != patient.patient_id:
            print(_no_question(given, seen, patient.patient_id), file=sys.stderr)
            return 2
        mapped = DeviceUsers(context.db).mapped_otherwise(patient.patient_id, patient.name)
        if mapped and not args.correct_name:
            print(_mapped_as(mapped, patient), file=sys.stderr)
            return 2
        # checked in the check-in's transaction: a card read since the question is refused, never
        # taken for the patient asked about (nor, unasked, for a typo corrected)
        current = context.check_in(
            patient.patient_id,
            patient.name,
            now=_now(),
            stat=args.stat,
            reason=args.reason,
            expected_patient_id=expected,
            doctor_id=args.doctor,  # in its transaction: a refused check-in changes no doctor
            clear_name=args.clear_name,
            clear_reason=args.clear_reason,
            same_name=answer,
        ).after
        if args.correct_name:  # his cuff's users too, for good (the session's log forgets in a day)
            context.correct_name(patient.patient_id, patient.name, now=_now())
    except PatientChanged as exc:
        print(_changed_meanwhile(expected, exc.current_patient_id, patient.patient_id, given), file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"lastmile patient set: {exc}", file=sys.stderr)
        return 2
    finally:
        context.close()
    born = f", born {patient.birth_date.isoformat()} {patient.sex}" if patient.birth_date else ""
    triage = (" STAT" if current.stat else "") + (f", reason: {current.reason}" if current.reason else "")
    print(
        f"current patient: {current.patient_id}{' ' + current.name if current.name else ''}{born}{triage} "
        f"(until {_local(current.expires_at)} without activity)"
    )
    return 0


def _same_name_answer(args: argparse.Namespace):  # -> SameName | None (imported lazily)
    """The doctor's answer the flags gave (--corrected, --other-id, --another-person), or None."""
    from lastmile.clinic.patients import SameName

    return None if args.same_name is None else SameName(args.same_name)


def _whose_id(checked_in: str, args: argparse.Namespace) -> str:
    """The question Today asks the doctor, for a command that cannot ask: each answer a command
    to paste, naming whom it answers about (`--about`)."""
    patient_id = args.patient_id.strip()
    answers = (
        ("corrected", f"更正输错的号码，{checked_in} 不再有此姓名", f"{checked_in} was a typo: it loses the name"),
        ("other-id", "同一人的另一个号码，两个都保留姓名", "the same patient's other ID: both keep the name"),
        (
            "another-person",
            f"另一位同名的患者，结束 {checked_in} 的就诊",
            f"another patient of the same name: {checked_in}'s check-in ends",
        ),
    )
    return "\n".join(
        [
            f"lastmile patient set: 同名患者已用 {checked_in} 登记就诊。{patient_id} 是哪种？请问医生，然后运行对应的命令：",
            f"lastmile patient set: {checked_in} is checked in under the same name. Which is {patient_id}? "
            "Ask the doctor, then run the command for the answer:",
        ]
        + [f"  {zh} / {en}\n    {_answer_command(args, checked_in, value)}" for value, zh, en in answers]
    )


def _answer_command(args: argparse.Namespace, about: str, answer: str) -> str:
    """`lastmile patient set` as typed (every option of it), with the answer about `about`:
    copy-paste ready."""
    words = ["lastmile", *(["--config", args.config] if args.config else []), "patient", "set", args.patient_id]
    words += ["--name", args.name] if args.name else ["--clear-name"] if args.clear_name else []
    words += ["--correct-name"] if args.correct_name else []
    words += ["--doctor", args.doctor] if args.doctor else []
    words += [] if args.stat is None else ["--stat" if args.stat else "--no-stat"]
    words += ["--reason", args.reason] if args.reason else ["--clear-reason"] if args.clear_reason else []
    words += ["--data-dir", args.data_dir] if args.data_dir else []
    return shlex.join([*words, "--about", about, f"--{answer}"])


def _mapped_as(mapped: list[DeviceUser], patient: Patient) -> str:
    """The ID checked in under another name than a device user mapped to it: his cuff's readings
    would go to the county under the check-in's name, unasked. One of the two is wrong: the
    doctor says which (as map-user and assign ask). Names as people write them (张三 (Zhang San))."""
    from lastmile.reports.report_text import display_name

    pid, given, known = patient.patient_id, display_name(patient.name), display_name(mapped[0].mapping.patient_name)
    typed = shlex.quote(known.split(" (")[0])  # as --name takes it: 张三, not 张三 (Zhang San)
    users = "、".join(f"{user.address} 用户 {user.user_id}" for user in mapped)
    users_en = ", ".join(f"user {user.user_id} of {user.address}" for user in mapped)
    return (
        f"lastmile patient set: 设备用户（{users}）归属的患者 {pid} 姓名是 {known}，不是 {given}：其中一个是错的，"
        f"{pid} 未登记。{known} 对：把 --name 改为 {typed} 再运行；{given} 对：加上 --correct-name（设备用户的姓名一并更正）。 / "
        f"{pid} is mapped as {known} ({users_en}), not {given}: one of them is wrong; {pid} was not checked in. "
        f"If {known} is right, run the command again with --name {typed}; if {given} is right, add --correct-name "
        "(the device users' name is corrected too)"
    )


def _correct_name_without_name() -> str:
    return (
        "lastmile patient set: --correct-name 须与 --name 一起用：请写上正确的姓名\n"
        "lastmile patient set: --correct-name goes with --name: give the right name"
    )


def _answer_without_about(answer) -> str:  # answer: SameName | None
    """An answer that names no patient it answers about, or --about with no answer."""
    if answer is None:
        zh, en = "--about 只与 --corrected、--other-id 或 --another-person 一起用", "--about goes with an answer"
    else:
        zh = f"--{answer.value} 须用 --about 指明回答的是哪位患者"
        en = f"--{answer.value} must name the checked-in patient it answers about (--about ID)"
    return (
        f"lastmile patient set: {zh}：请运行问题中打印的命令\n"
        f"lastmile patient set: {en}: run the command the question printed"
    )


def _no_question(flag: str, seen, patient_id: str) -> str:  # flag: the answer given; seen: CurrentPatient
    """An answer (`flag`) given when the patient checked in has another name: it must not apply
    to whoever is by the time of the check-in."""
    from lastmile.reports.report_text import display_name

    return (
        f"lastmile patient set: {flag} 无需回答：当前患者 {seen.patient_id} 的姓名不同；{patient_id} 未登记，"
        f"请去掉 {flag} 后重新运行\n"
        f"lastmile patient set: {flag} answers no question: {seen.patient_id} {display_name(seen.name) or '(no name)'} is "
        f"checked in under another name; {patient_id} was not checked in: run the command again without {flag}"
    )


def _changed_meanwhile(expected: str, now_current: str, patient_id: str, given: str = "") -> str:
    """The current patient changed between the question and the check-in (a card read at the
    acquire service, a check-in on Today): what was asked, or not asked, was about another.
    `given`: the answer given, about him (run again without it: it asks again if it must)."""
    zh_again, en_again = (
        (f"请去掉 {given} 后重新运行", f"run the command again without {given}")
        if given
        else (
            "请重新运行此命令",
            "run the command again",
        )
    )
    return (
        f"lastmile patient set: 在此期间当前患者已变更（现在是 {now_current or '无人'}，"
        f"不是 {expected or '无人'}）；{patient_id} 未登记，{zh_again}\n"
        f"lastmile patient set: the current patient changed meanwhile: {now_current or 'nobody'} is checked "
        f"in now, not {expected or 'nobody'}; {patient_id} was not checked in: {en_again} "
        "(it asks again if it must)"
    )


def _clear(args: argparse.Namespace) -> int:
    context = _context(args)
    try:
        cleared = context.clear(now=_now())
    finally:
        context.close()
    print("patient session ended" if cleared else "no current patient")
    return 0


def _map_user(args: argparse.Namespace) -> int:
    from lastmile.clinic.db import open_clinic_db
    from lastmile.clinic.device_users import DEFAULT_USER, DeviceUsers
    from lastmile.clinic.devices import is_bluetooth_address
    from lastmile.clinic.patient_ids import clinic_patient
    from lastmile.clinic.patients import NameConflict, PatientContext
    from lastmile.commands.common import config_from_args

    if not is_bluetooth_address(args.address):
        print(f"error: {args.address!r} is not a Bluetooth address (like C0:26:DA:01:02:03)", file=sys.stderr)
        return 2
    config = config_from_args(args)
    db = open_clinic_db(config.data_dir)
    try:
        users = DeviceUsers(db)
        if args.remove:
            removed = users.unmap_user(args.address, args.user)
            unmapped = "the checked-in patient's again" if args.user == DEFAULT_USER else "held again"
            print(f"user {args.user} of {args.address}: " + (f"readings {unmapped}" if removed else "was not mapped"))
            return 0
        try:
            patient = None if args.current else clinic_patient(args.patient, args.name, config)
            context = PatientContext(db, config.patient.idle_timeout_s)
            patient = users.map_patient(
                args.address, args.user, patient, context=context, now=_now(), correct_name=args.correct_name
            )
        except NameConflict as exc:
            print(_which_name(exc, "map-user"), file=sys.stderr)
            return 2
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    finally:
        db.conn.close()
    whose = "the checked-in patient's" if patient is None else f"{patient.patient_id}'s"
    print(f"user {args.user} of {args.address}: readings are {whose} from now on")
    return 0


def _which_name(conflict, command: str) -> str:  # (NameConflict, str) -> str
    """Two names for one ID: one is wrong, only the doctor knows which (zh-CN first, as the CLI's
    other bilingual refusals); `command`: the `lastmile patient` command refused."""
    from lastmile.reports.report_text import display_name

    # names as people write them (张三 (Zhang San)), not as stored (Zhang^San=张^三)
    pid, known, given = conflict.patient_id, display_name(conflict.known), display_name(conflict.given)
    return (
        f"lastmile patient {command}: {pid} 24 小时内登记的姓名是 {known}，不是 {given}：其中一个是错的。"
        f"{known} 对：去掉 --name 再运行；{given} 对：加上 --correct-name（登记的姓名一并更正）。 / "
        f"{pid} was checked in as {known} within 24 h, not {given}: one of them is wrong. If {known} is right, "
        f"run the command again without --name; if {given} is right, add --correct-name (the check-in's "
        "name is corrected too)"
    )


def _assign(args: argparse.Namespace) -> int:
    from lastmile.clinic.observations import ObservationStore, UnknownObservationError
    from lastmile.clinic.patient_ids import clinic_patient
    from lastmile.clinic.patients import NameConflict, PatientContext
    from lastmile.commands.common import config_from_args
    from lastmile.data_dir import open_outbox

    config = config_from_args(args)
    held = args.held_id.strip()
    try:
        patient = clinic_patient(args.patient_id, args.name, config)
        number = int(held[1:] if held[:1] in ("E", "e") else held)
    except ValueError as exc:
        print(f"lastmile patient assign: {exc}", file=sys.stderr)
        return 2
    now = _now()
    context = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
    try:  # named as map-user names him: the check-in's name, or the doctor says which of two is right
        patient = context.given_name(patient, now, correct=args.correct_name)
        doctor = context.current_doctor(now) or ""
        if held[:1] in ("E", "e"):
            code = _assign_ecg(config, number, patient, doctor=doctor, now=now)
            if code == 0 and args.correct_name:  # only once assigned: the ECG is the outbox's, not clinic.db's
                context.correct_name(patient.patient_id, patient.name, now=now)
            return code
    except NameConflict as exc:
        print(_which_name(exc, "assign"), file=sys.stderr)
        return 2
    finally:
        context.close()
    with open_outbox(config) as outbox:
        store = ObservationStore.open(config.data_dir, outbox=outbox, idle_timeout_s=config.patient.idle_timeout_s)
        try:
            result = store.assign(
                number, patient.patient_id, name=patient.name, now=now, correct_name=args.correct_name
            )
        except UnknownObservationError as exc:
            print(f"lastmile patient assign: {exc} (see 'lastmile patient show')", file=sys.stderr)
            return 1
        except ValueError as exc:
            print(f"lastmile patient assign: {exc}", file=sys.stderr)
            return 2
        finally:
            store.close()
    print(f"observation #{number} assigned to {result.patient_id} (outbox item {result.item_id})")
    return 0


def _assign_ecg(config, item_id: int, patient, *, doctor: str, now: dt.datetime) -> int:  # (Config, int, Patient)
    from lastmile.data_dir import open_outbox
    from lastmile.ecg.intake import HeldEcgError, assign_held_ecg

    with open_outbox(config) as outbox:
        try:
            item = assign_held_ecg(outbox, item_id, patient, now=now, by=doctor)
        except HeldEcgError as exc:
            print(f"lastmile patient assign: {exc} (see 'lastmile patient show')", file=sys.stderr)
            return 1
    now_on = item.patient or {}
    whose = f"{now_on.get('patient_id', patient.patient_id)} {now_on.get('name') or ''}".rstrip()
    what = (
        f"still held: its quality is in doubt ('lastmile ecg release E{item_id}' to send it anyway, "
        f"'lastmile ecg discard E{item_id}' if recorded again)"
        if item.hold_until is not None
        else "released for sending"
    )
    print(f"ECG E{item_id} assigned to {whose}, {what} (accession {item.meta.get('accession_number', '-')})")
    return 0


def _show(args: argparse.Namespace) -> int:
    from lastmile.clinic.db import DB_NAME, open_clinic_db
    from lastmile.clinic.observations import observation_to_json, summary
    from lastmile.clinic.patients import PatientContext
    from lastmile.commands.common import config_from_args, quality_lines
    from lastmile.data_dir import existing_file

    config = config_from_args(args)
    current, doctor, rows = None, None, []
    known: dict[str, str] = {}
    now = _now()
    ecgs = _held_ecgs(config, now)
    held_for_name = {_held_patient_id(item) for item in ecgs if item.hold_reason == "name-mismatch"}
    if existing_file(config, DB_NAME) is not None:  # a read-only command creates nothing
        db = open_clinic_db(config.data_dir)
        try:
            context = PatientContext(db, config.patient.idle_timeout_s)
            current = context.current(now)
            doctor = context.current_doctor(now)
            # Held observations live in clinic.db: no outbox needed to list them.
            rows = db.conn.execute("SELECT id, key, observation FROM held_observations ORDER BY id").fetchall()
            # an ECG held for its name: its ID as the session names it now (the doctor may have
            # corrected it since), as Today and its "it is his" answer do
            known = context.known_names(held_for_name, now)
        finally:
            db.conn.close()
    from lastmile.clinic.observations import observation_from_json

    assigned = _in_outbox(config, [r["key"] for r in rows])  # an assignment a power cut cut short
    held = [
        (int(r["id"]), observation_from_json(json.loads(r["observation"]))) for r in rows if r["key"] not in assigned
    ]
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
                        "stat": current.stat,
                        "reason": current.reason,
                    },
                    "doctor_id": doctor,
                    "unassigned": [{"id": i, **observation_to_json(o)} for i, o in held],
                    "held_ecgs": [
                        {
                            "id": f"E{item.id}",
                            "reason": item.hold_reason,
                            "held_until": _local(_utc(item.hold_until)),
                            "acquired_at": item.meta.get("acquired_at"),
                            "device": item.meta.get("device"),
                            "file_patient_id": item.meta.get("file_patient_id"),
                            **_names_of_held(item, known),
                            "flags": item.meta.get("flags", []),
                            "quality": item.meta.get("quality"),
                        }
                        for item in ecgs
                    ],
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
    if ecgs:
        print(
            f"{len(ecgs)} ECG(s) held for you: 'lastmile patient assign E<n> PATIENT', "
            "'lastmile ecg release E<n>' (send anyway) or 'lastmile ecg discard E<n>' (recorded again):"
        )
        for item in ecgs:
            acquired = item.meta.get("acquired_at")
            when = _local(dt.datetime.fromisoformat(acquired)) if acquired else "-"
            why = {
                "unassigned": _unassigned_why(item),
                "re-record": "quality check says record again",
                "patient-id-conflict": (
                    f"gives sex {(item.patient or {}).get('sex') or '-'}, born {(item.patient or {}).get('birth_date') or '-'}, "
                    f"but ID {_held_patient_id(item) or '?'} says {item.meta.get('id_sex') or '-'}, "
                    f"born {item.meta.get('id_birth_date') or '-'}: the previous patient's details? "
                    f"(assign E{item.id} to that ID to send the ID's)"
                ),
                "name-mismatch": (
                    f"names {_held_patient_id(item) or '?'} as {item.meta.get('file_patient_name', '?')}, "
                    f"checked in as {_checked_in_as(_names_of_held(item, known))}: whose is it?"
                ),
            }.get(item.hold_reason or "", f"names patient {item.meta.get('file_patient_id', '?')}, not the current one")
            print(
                f"  E{item.id:<5d} {when}  ECG {item.meta.get('leads', '?')} leads "
                f"{item.meta.get('duration_s', '?')} s  {item.meta.get('device', '')}: {why}; "
                f"sent as it is at {_local(_utc(item.hold_until))}"
            )
            for line in quality_lines(item.meta.get("quality")):
                print(f"         {line}")
    if not held:
        print("no observations waiting to be assigned")
        return 0
    print(f"{len(held)} observation(s) waiting to be assigned ('lastmile patient assign ID PATIENT'):")
    for i, o in held:
        user = "" if o.device_user is None else f" (user {o.device_user})"
        print(f"  #{i:<5d} {_local(o.measured_at)}  {o.kind:18s} {summary(o):36s} {o.device.label()}{user}")
    return 0


def _unassigned_why(item: OutboxItem) -> str:
    """Why an ECG held with no patient has none: its file named none, or named one under a patient ID
    refused (`lastmile.ecg.intake.refused_patient_meta`: what the cart wrote, never lost)."""
    if "file_patient_id_problem" not in item.meta:
        return "names no patient"
    named = " ".join(str(item.meta.get(key) or "") for key in ("file_patient_id", "file_patient_name")).strip()
    problem = item.meta.get("file_patient_id_problem") or "not valid"
    return f"its file names {named or '?'}, but that patient ID is refused ({problem}): check it, whose is it?"


def _held_patient_id(item: OutboxItem) -> str:
    return str((item.patient or {}).get("patient_id") or "")


def _names_of_held(item: OutboxItem, known: dict[str, str]) -> dict[str, str]:
    """The names of an ECG held for its name: the file's, the check-in's stored at intake, and the
    check-in's now - the one "it is his" sends it under (`known`: the session's names by ID; the
    one stored when the session knows none, as on Today). {} for an ECG held for another cause."""
    if item.hold_reason != "name-mismatch":
        return {}
    at_intake = str(item.meta.get("checked_in_name") or "")
    return {
        "file_patient_name": str(item.meta.get("file_patient_name") or ""),
        "checked_in_name": known.get(_held_patient_id(item)) or at_intake,
        "checked_in_name_at_intake": at_intake,
    }


def _checked_in_as(names: dict[str, str]) -> str:
    """The check-in's name of an ECG held for its name (`_names_of_held`), and the one stored when it
    was held if the doctor corrected it since ({} for an ECG held for another cause: "?")."""
    now, at_intake = names.get("checked_in_name") or "?", names.get("checked_in_name_at_intake", "")
    return now if not at_intake or at_intake == now else f"{now} (corrected; {at_intake} when it was held)"


def _utc(epoch: float | None) -> dt.datetime | None:
    return None if epoch is None else dt.datetime.fromtimestamp(epoch, dt.timezone.utc)


def _in_outbox(config, keys: list[str]) -> set[str]:  # (Config, keys) -> the keys the outbox holds
    from lastmile.data_dir import existing_file, open_outbox
    from uploader.outbox import DB_NAME

    if not keys or existing_file(config, DB_NAME) is None:  # a read-only command creates nothing
        return set()
    with open_outbox(config) as outbox:
        return outbox.present_keys(keys)  # one query, not one per held reading


def _held_ecgs(config, now: dt.datetime) -> list:  # (Config, datetime) -> list[OutboxItem]
    from lastmile.data_dir import existing_file, open_outbox
    from lastmile.ecg.holds import held_ecgs
    from uploader.outbox import DB_NAME

    if existing_file(config, DB_NAME) is None:  # a read-only command creates nothing
        return []
    with open_outbox(config) as outbox:
        return held_ecgs(outbox, now.timestamp())


def _devices(args: argparse.Namespace) -> int:
    from lastmile.clinic.db import DB_NAME
    from lastmile.clinic.devices import DeviceRegistry, held_words
    from lastmile.commands.common import config_from_args
    from lastmile.data_dir import existing_file

    config = config_from_args(args)
    records = []
    if existing_file(config, DB_NAME) is not None:  # a read-only command creates nothing
        registry = DeviceRegistry.open(config.data_dir)
        try:
            records = registry.all(config)
        finally:
            registry.close()
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=2, ensure_ascii=False))
        return 0
    if not records:
        print("no devices known (pair BLE devices with 'lastmile ble pair ADDRESS')")
        return 0
    now = dt.datetime.now(dt.timezone.utc)
    for r in records:
        state = "removed" if r.removed else "connected" if r.connected else "not connected"
        why = "" if not r.removed else " (not paired)" if r.transport == "ble" else " (not configured)"
        ident = " ".join(x for x in (r.manufacturer, r.model, r.serial) if x)
        if r.name:
            # a serial device's "<name> (<profile>) on <port>": where a technician finds it; a BLE
            # device's name given at pairing: which room's cuff it is, two of one model alike
            ident = f"{r.name}  {ident}".rstrip()
        print(f"{r.transport:6s} {r.address:17s}  {state:13s}{why}  {ident or '-'}")
        if r.advertised_name and r.advertised_name != r.name:
            print(f"       advertised as {r.advertised_name}")
        if r.last_reading:
            print(f"       last reading {_local(r.last_reading_at)}: {r.last_reading}")
        if r.battery_level is not None:  # a BLE device's: read at connect, then kept current while connected
            print(f"       battery      {_local(r.battery_at)}: {r.battery_level}%")
        if r.waiting:  # until stored, whatever its later errors (unplugged ...) say
            print(f"       waiting      {r.waiting}")
        if r.last_error and not r.removed:  # a removed device's error is history (--json keeps it)
            print(f"       last error   {_local(r.last_error_at)}: {r.last_error}")
        if not r.removed and r.lost_said_until(now) is not None:
            stopped = f"the gateway stopped after {_local(r.lost_after)}, found {_local(r.lost_at)}"
            if memory := held_words(*r.lost_from_memory):
                print(f"       lost         {memory} held in memory only, when {stopped}")
            if disk := held_words(*r.lost_from_disk):
                print(f"       lost         {disk} kept on disk, not read back from {r.lost_damage}, when {stopped}")
    return 0
