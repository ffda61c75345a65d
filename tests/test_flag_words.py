"""Every flag a reading or a home visit can carry reads in the doctor's words on a Chinese page.

Today's readings showed any flag lastmile/console/templates/macros.html did not name (13 of them)
as its code: an amber "implausible-body-temperature" beside 不可能的数值 (设备显示 26251 °C), and
"cuff-too-loose", "sample-control-solution" ... from the Bluetooth status bits. The flags are
collected here from the device code's own tables, so a new bit or code fails this test until
lastmile/console/flag_words.py words it (or says why it is not shown).
"""

from __future__ import annotations

import datetime as dt
import html
import re
from pathlib import Path

from devices.ble import blood_pressure, glucose, pulse_oximeter, thermometer
from devices.identity import STORED_TIME_UNKNOWN, DeviceIdentity
from devices.observation import Observation, Quantity, TimeSource
from devices.plausibility import FLAG_PREFIX, PLAUSIBLE_RANGES
from lastmile.console.flag_words import NOT_SHOWN, NOTES, UNKNOWN_FLAG, WARNINGS, flag_badges
from lastmile.console.i18n import Localizer
from tests.conftest import REPO
from tests.console_harness import DOCTOR, VALID_ID, Client, console_config, record_readings, running_console

ZH = Localizer("zh-CN", dt.timezone.utc)
EN = Localizer("en", dt.timezone.utc)
# A flag written as a literal in a decoder: `flags=("measurement-unsuccessful",)`, `status_flags +=
# ("device-clock-not-set",)`, `labels.append("exercise-duration-overrun")`, `flags.add("no-fix")`.
LITERAL_FLAG = re.compile(r'(?:flags\s*(?:=|\+=)\s*\(|labels\.append\(|flags\.add\()\s*"([a-z0-9-]+)"\s*[,)]')
# English words; "GPS" is what Chinese calls GPS too (the catalog's 没有 GPS 定位)
ASCII_WORD = re.compile(r"(?!GPS\b)\b[A-Za-z]{2,}")


def literal_flags(*paths: Path) -> set[str]:
    return {flag for path in paths for flag in LITERAL_FLAG.findall(path.read_text(encoding="utf-8"))}


def emitted_flags() -> set[str]:
    """Every flag the device code can put on a reading, and the visit book on a visit."""
    flags: set[str] = set(blood_pressure.STATUS_BITS.values())
    flags |= {f for f in blood_pressure.PULSE_RATE_RANGE.values() if f}
    flags |= {"sample-" + t for t in glucose.SAMPLE_TYPES.values()}
    flags |= {"site-" + s for s in glucose.SAMPLE_LOCATIONS.values() if s != "not-available"}
    flags |= {"control-solution"} | set(glucose.SENSOR_STATUS_BITS.values())
    flags |= {"carbohydrate-" + c for c in glucose.CARBOHYDRATE_IDS.values()}
    flags |= {"meal-" + m for m in glucose.MEALS.values()}
    flags |= {"tester-" + t for t in glucose.TESTERS.values()}
    flags |= {"health-" + h for h in glucose.HEALTH.values()}
    flags |= {"medication-" + m for m in glucose.MEDICATION_IDS.values()}
    flags |= set(pulse_oximeter.MEASUREMENT_STATUS_BITS.values()) | set(
        pulse_oximeter.DEVICE_SENSOR_STATUS_BITS.values()
    )
    flags |= {"site-" + s for s in thermometer.TEMPERATURE_TYPES.values()}
    flags.add(STORED_TIME_UNKNOWN)
    codes = {code for code, _unit in PLAUSIBLE_RANGES}
    flags |= {FLAG_PREFIX + c + suffix for c in codes for suffix in ("", "-fast", "-slow")}
    flags |= literal_flags(*sorted((REPO / "devices" / "ble").glob("*.py")), REPO / "lastmile/visits/book.py")
    flags |= {"start-time-lost", "end-time-lost"}  # book.py's START_TIME_LOST, END_TIME_LOST
    return flags


def test_the_walk_finds_the_flags_the_decoders_write_as_literals() -> None:
    """The literal scan is not empty: a decoder's flag outside the tables is walked too."""
    literals = literal_flags(*sorted((REPO / "devices" / "ble").glob("*.py")), REPO / "lastmile/visits/book.py")
    assert {"measurement-unsuccessful", "device-clock-not-set", "exercise-duration-overrun", "no-fix"} <= literals


def test_every_flag_a_device_can_emit_reads_in_chinese_or_is_left_out_for_a_reason() -> None:
    raw = {}
    for flag in sorted(emitted_flags()):
        badges = flag_badges([flag], ZH)
        if flag in NOT_SHOWN or flag.startswith(FLAG_PREFIX):
            assert badges == [], (flag, badges)
            continue
        [badge] = badges
        english = flag_badges([flag], EN)[0].text
        if ASCII_WORD.search(badge.text) or english == EN.gettext(UNKNOWN_FLAG) or english == flag:
            raw[flag] = badge.text
    assert raw == {}, f"flags a Chinese page would show in English or not at all in words: {raw}"


def test_no_flag_is_worded_that_nothing_emits() -> None:
    """A name for a flag no device sends is a typo of one that shows raw."""
    assert set(WARNINGS) | set(NOTES) | set(NOT_SHOWN) <= emitted_flags()
    assert not set(WARNINGS) & set(NOTES) and not (set(WARNINGS) | set(NOTES)) & set(NOT_SHOWN)


def test_a_flag_no_table_knows_is_said_as_the_devices_mark_never_as_its_code() -> None:
    [badge] = flag_badges(["some-future-status-bit"], ZH)
    assert badge.text == ZH.gettext(UNKNOWN_FLAG) and not ASCII_WORD.search(badge.text)
    assert badge.code == "some-future-status-bit"  # kept for the technician (data-flag)


def test_a_control_solution_is_said_once() -> None:
    badges = flag_badges(["sample-control-solution", "site-control-solution", "control-solution"], ZH)
    assert [b.text for b in badges] == ["质控液，不是病人的血"] and badges[0].warn


def readings_panel_rows(page: str) -> dict[str, str]:
    """Each of the checked-in patient's readings as the doctor reads it: its <li>'s visible text."""
    rows = re.findall(r'<li data-key="([^"]+)">(.*?)</li>', page, flags=re.S)
    return {key: " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split()) for key, body in rows}


def test_a_26251_degree_reading_on_a_chinese_today_shows_no_english(tmp_path: Path) -> None:
    """A thermometer's 26251 °C for the checked-in patient read "体温 不可能的数值 (设备显示 26251 °C)
    implausible-body-temperature"; a loose cuff "cuff-too-loose irregular-pulse"... Now the value's
    own words say it is impossible (no second badge), and a cuff's flags are Chinese badges."""
    config = console_config(tmp_path / "data")
    with running_console(config) as server:
        client = Client(server.url, language="zh-CN")
        client.login(DOCTOR)
        assert client.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"}).status == 303
        hot, loose = flagged_readings(dt.datetime.now(dt.timezone.utc))
        assert [r.outcome for r in record_readings(config, hot, loose)] == ["stored", "stored"]
        rows = readings_panel_rows(client.get("/today").body)
    assert set(rows) >= {"flags:hot", "flags:loose"}, rows
    hot_row, loose_row = rows["flags:hot"], rows["flags:loose"]
    assert "不可能的数值（设备显示 26251 °C）" in hot_row and "腋下" in hot_row, hot_row
    assert "袖带太松" in loose_row and "脉搏不齐" in loose_row and "测量姿势不对" in loose_row, loose_row
    for row in (hot_row, loose_row):
        assert ASCII_WORD.findall(row.replace("mmHg", "")) == [], row


def flagged_readings(now: dt.datetime) -> tuple[Observation, Observation]:
    """A thermometer's 26251 °C at the armpit and a loose cuff's 131/84 with an irregular pulse."""
    thermometer_id = DeviceIdentity("体温计厂", "体温计", "42", "AA:BB:CC:DD:EE:03")
    cuff_id = DeviceIdentity("血压计厂", "血压计", "43", "AA:BB:CC:DD:EE:04")
    hot = Observation(
        kind="body-temperature",
        quantities=(Quantity("body-temperature", 26251.0, "Cel", 26251.0, "Cel"),),
        measured_at=now,
        time_source=TimeSource.DEVICE_CLOCK,
        received_at=now,
        device=thermometer_id,
        record_key="flags:hot",
        flags=("site-armpit",),
    )
    assert "implausible-body-temperature" in hot.flags  # the screen's own flag, as stored
    loose = Observation(
        kind="blood-pressure",
        quantities=(
            Quantity("systolic", 131.0, "mm[Hg]", 131.0, "mm[Hg]"),
            Quantity("diastolic", 84.0, "mm[Hg]", 84.0, "mm[Hg]"),
        ),
        measured_at=now,
        time_source=TimeSource.DEVICE_CLOCK,
        received_at=now,
        device=cuff_id,
        record_key="flags:loose",
        flags=("cuff-too-loose", "irregular-pulse", "improper-measurement-position"),
    )
    return hot, loose
