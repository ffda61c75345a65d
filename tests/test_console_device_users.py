"""A multi-user BP cuff's users from the console: "this cuff's user N is <patient>" where its held
reading is (Today), seen and forgotten on Devices - the same code as `lastmile patient map-user`."""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.util
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from devices.ble.uuids import BLOOD_PRESSURE, DEVICE_INFORMATION
from devices.observation import Observation
from lastmile.clinic.db import open_clinic_db
from lastmile.clinic.device_users import PRESSURE_UNIT
from lastmile.config import Config
from lastmile.console.service import ConsoleServer
from tests.conftest import missing
from tests.console_browser import by, log_in, save_screenshot, set_viewport, text_in, wait_for
from tests.console_harness import (
    DOCTOR,
    VALID_ID,
    Client,
    bp_reading,
    console_config,
    hold_readings,
    record_readings,
    running_console,
)

CUFF = "AA:BB:CC:DD:EE:01"  # bp_reading's device
WRONG_CHECK_DIGIT = "110105194912310021"  # VALID_ID's check character is X
OTHER_ID = "320122198001010038"  # 李四: another valid resident ID
PHONE = (390, 844)


def user_reading(user: int, key: str, at: dt.datetime | None = None) -> Observation:
    """A reading of the cuff's user `user` (its user button), measured at `at` (default: now)."""
    return replace(bp_reading(at or dt.datetime.now(dt.timezone.utc), key), device_user=user)


def mappings(config: Config) -> list[tuple[str, int, str | None, str]]:
    db = open_clinic_db(config.data_dir)
    try:
        rows = db.conn.execute("SELECT address, user_id, patient_id, patient_name FROM device_users").fetchall()
        return [tuple(r) for r in rows]
    finally:
        db.conn.close()


def audited(config: Config, action: str) -> list[tuple[str, str, str]]:
    db = open_clinic_db(config.data_dir)
    try:
        rows = db.conn.execute("SELECT user_name, target, detail FROM audit WHERE action = ?", (action,)).fetchall()
        return [tuple(r) for r in rows]
    finally:
        db.conn.close()


def device_map_form(client: Client, patient_id: str, user: str, whose: str = "patient") -> dict[str, str]:
    """The Devices page's "user N is (patient ID)" form of the paired cuff, filled in."""
    page = client.get("/devices").body
    found = re.search(rf'<form [^>]*action="/devices/map-user"[^>]*data-address="{CUFF}".*?</form>', page, re.S)
    assert found, page[:4000]
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', found.group(0)))
    return {**fields, "device_user": user, "patient_id": patient_id, "whose": whose}


def map_form(client: Client, user: int, patient_id: str, whose: str = "patient") -> dict[str, str]:
    """The held reading's "this device's user N is" form as Today shows it, filled in."""
    page = client.get("/today").body
    found = re.search(rf'<form [^>]*action="/today/map-user"[^>]*data-map-user="{user}".*?</form>', page, re.S)
    assert found, page[:3000]
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', found.group(0)))
    return {**fields, "patient_id": patient_id, "whose": whose}


def form_on_a_phone(
    browser: object, server: ConsoleServer, page: str, form: str, says: str, screenshot: str
) -> tuple[dict, Any]:
    """The doctor logged in at 390 px on `page`, its form `form` (saying `says`) scrolled into view:
    where its parts are, and the form. The page is saved as `screenshot`."""
    log_in(browser, server)
    set_viewport(browser, PHONE)
    browser.get(server.url + page)  # type: ignore[attr-defined]
    text_in(browser, form, says)
    box = browser.execute_script(  # type: ignore[attr-defined]
        """const f = document.querySelector(arguments[0]);
        f.scrollIntoView({block: "center"});
        const r = e => e.getBoundingClientRect();
        return {width: document.documentElement.clientWidth,
                parts: [...f.querySelectorAll("label, input:not([type=hidden]), button, p")].map(r)};""",
        form,
    )
    save_screenshot(browser, screenshot)
    return box, browser.find_element(by("css"), form)  # type: ignore[attr-defined]


def fits_the_screen(box: dict) -> None:
    assert box["width"] <= PHONE[0], box
    for part in box["parts"]:
        assert part["left"] >= 0 and part["right"] <= box["width"], box


@pytest.fixture
def clinic(tmp_path: Path) -> Iterator[tuple[Config, ConsoleServer]]:
    config = console_config(tmp_path / "data")
    with running_console(config) as server:
        yield config, server


@pytest.fixture
def doctor(clinic: tuple[Config, ConsoleServer]) -> Client:
    client = Client(clinic[1].url)
    client.login(DOCTOR)
    return client


def test_a_held_users_reading_maps_that_user_to_a_patient_from_today(
    clinic: tuple[Config, ConsoleServer], doctor: Client
) -> None:
    """User 2's reading is held with "设备用户 2". The doctor says on Today that user 2 is 张三
    (checked in): the next reading of user 2 goes to 张三 by itself; the held one stays held
    (measured before); Devices shows the mapping with the name, and "Forget" undoes it."""
    config, _server = clinic
    [held_id] = hold_readings(config, user_reading(2, "cuff:u2:1"))
    assert doctor.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"}).status == 303

    reply = doctor.post("/today/map-user", map_form(doctor, 2, VALID_ID))
    assert reply.status == 303 and "done=mapped" in reply.location, (reply.status, reply.body[:500])
    [(address, user, patient_id, name)] = mappings(config)
    assert (address, user, patient_id) == (CUFF, 2, VALID_ID) and "张^三" in name, mappings(config)  # check-in's name
    today = doctor.get(reply.location).body
    assert "已保存" in today, today[:2000]
    assert f'value="{held_id}"' in today and 'data-device-user="2"' in today  # measured before: still held

    [later] = record_readings(config, user_reading(2, "cuff:u2:2"))
    assert (later.outcome, later.patient_id) == ("stored", VALID_ID)

    devices = doctor.get("/devices").body
    assert 'id="h-device-users"' in devices, devices[:4000]
    listed = devices.split('id="h-device-users"', 1)[1].split("</section>", 1)[0]
    assert "用户 2" in listed and VALID_ID in listed and "张三" in listed, listed
    forget = dict(re.findall(r'name="(address|device_user|csrf)" value="([^"]*)"', listed))
    reply = doctor.post("/devices/unmap-user", forget)
    assert reply.status == 303 and "done=unmapped" in reply.location, (reply.status, reply.body[:500])
    assert mappings(config) == []
    [after] = record_readings(config, user_reading(2, "cuff:u2:3"))
    assert after.outcome == "held"


def test_a_user_mapped_to_whoever_is_checked_in_follows_the_check_in(
    clinic: tuple[Config, ConsoleServer], doctor: Client
) -> None:
    """`--current` from the page: user 3 is whoever is checked in (the clinic measures as user 3)."""
    config, _server = clinic
    hold_readings(config, user_reading(3, "cuff:u3:1"))
    reply = doctor.post("/today/map-user", map_form(doctor, 3, "", whose="checked-in"))
    assert reply.status == 303, (reply.status, reply.body[:500])
    assert mappings(config) == [(CUFF, 3, None, "")]
    assert doctor.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"}).status == 303
    [later] = record_readings(config, user_reading(3, "cuff:u3:2"))
    assert (later.outcome, later.patient_id) == ("stored", VALID_ID)


def test_a_resident_id_with_a_wrong_check_digit_maps_nobody(
    clinic: tuple[Config, ConsoleServer], doctor: Client
) -> None:
    """The one patient-ID rule: a misread resident ID is refused, in Chinese, and nothing is mapped."""
    config, _server = clinic
    hold_readings(config, user_reading(2, "cuff:u2:1"))
    reply = doctor.post("/today/map-user", map_form(doctor, 2, WRONG_CHECK_DIGIT))
    assert reply.status == 400, (reply.status, reply.location)
    assert "身份证" in reply.body.split('id="form-error"', 1)[1][:300], reply.body[:2000]
    assert mappings(config) == []


def test_a_form_without_its_csrf_token_maps_nobody(clinic: tuple[Config, ConsoleServer], doctor: Client) -> None:
    config, _server = clinic
    hold_readings(config, user_reading(2, "cuff:u2:1"))
    form = map_form(doctor, 2, VALID_ID)
    form.pop("csrf")
    assert doctor.post("/today/map-user", form, csrf=False).status == 403
    assert mappings(config) == []


def test_mapping_a_cuff_user_on_a_phone(browser: object, tmp_path: Path) -> None:
    """The doctor at 390 px: the map box of user 2's held reading fits the screen; typing the
    patient's ID and Save maps user 2 (zh-CN screenshot: today-map-device-user-phone)."""
    config = console_config(tmp_path / "data")
    hold_readings(config, user_reading(2, "cuff:u2:1"))
    with running_console(config) as server:
        box, form = form_on_a_phone(
            browser, server, "/today", "#panel-held form.map-user", "这台设备的用户 2 是", "today-map-device-user-phone"
        )
        form.find_element(by("css"), "input[name=patient_id]").send_keys(VALID_ID)
        form.find_element(by("css"), "button[value=patient]").click()
        text_in(browser, "p.done", "已保存")
        wait_for(browser, lambda _d: mappings(config) == [(CUFF, 2, VALID_ID, "")])
    fits_the_screen(box)


def test_a_paired_cuffs_user_is_mapped_on_devices_before_the_patient_measures(
    clinic: tuple[Config, ConsoleServer], doctor: Client
) -> None:
    """The doctor pairs the family's cuff and says on Devices "user 2 is 110...": no reading of
    user 2 was ever held, and user 2's first reading goes to that patient by itself (audited as
    the Today form's). User 3 is whoever is checked in, said the same way."""
    config, _server = clinic
    assert doctor.post("/devices/pair", {"address": CUFF.lower(), "name": "血压计"}).status == 303
    reply = doctor.post("/devices/map-user", device_map_form(doctor, VALID_ID, "2"))
    assert reply.status == 303 and "done=mapped" in reply.location, (reply.status, reply.body[:500])
    assert mappings(config) == [(CUFF, 2, VALID_ID, "")]
    assert [(t, d) for _u, t, d in audited(config, "map-device-user")] == [
        (CUFF, '{"patient": "%s", "user": 2}' % VALID_ID)
    ]
    devices = doctor.get(reply.location).body
    assert "已保存" in devices, devices[:2000]
    listed = devices.split('id="h-device-users"', 1)[1].split("</section>", 1)[0]
    assert "用户 2" in listed and VALID_ID in listed, listed

    [first] = record_readings(config, user_reading(2, "cuff:u2:1"))
    assert (first.outcome, first.patient_id) == ("stored", VALID_ID)

    reply = doctor.post("/devices/map-user", device_map_form(doctor, "", "3", whose="checked-in"))  # --current
    assert reply.status == 303, (reply.status, reply.body[:500])
    assert mappings(config) == [(CUFF, 2, VALID_ID, ""), (CUFF, 3, None, "")]


@pytest.mark.parametrize(
    ("user", "patient_id", "says"),
    [("2", WRONG_CHECK_DIGIT, "身份证"), ("255", VALID_ID, "0 到 254"), ("", VALID_ID, "0 到 254")],
)
def test_a_devices_map_form_with_a_bad_user_or_id_maps_nobody(
    clinic: tuple[Config, ConsoleServer], doctor: Client, user: str, patient_id: str, says: str
) -> None:
    """Refused in Chinese on Devices, what was typed kept, nothing mapped or audited."""
    config, _server = clinic
    assert doctor.post("/devices/pair", {"address": CUFF, "name": "血压计"}).status == 303
    reply = doctor.post("/devices/map-user", device_map_form(doctor, patient_id, user))
    assert reply.status == 400, (reply.status, reply.location)
    assert says in reply.body.split('id="form-error"', 1)[1][:300], reply.body[:2000]
    assert mappings(config) == [] and audited(config, "map-device-user") == []


def test_a_devices_map_form_without_its_csrf_token_maps_nobody(
    clinic: tuple[Config, ConsoleServer], doctor: Client
) -> None:
    config, _server = clinic
    assert doctor.post("/devices/pair", {"address": CUFF, "name": "血压计"}).status == 303
    form = device_map_form(doctor, VALID_ID, "2")
    form.pop("csrf")
    assert doctor.post("/devices/map-user", form, csrf=False).status == 403
    assert mappings(config) == []


def test_an_older_held_reading_of_a_mapped_user_says_whose_the_user_is_now(
    clinic: tuple[Config, ConsoleServer], doctor: Client
) -> None:
    """User 2's reading was held before the doctor said user 2 is 张三: Today no longer offers
    "this device's user 2 is" (saving again would overwrite the mapping) but says "用户 2 现在归
    <ID 张三>"; the reading itself is still there to assign (measured before)."""
    config, _server = clinic
    [held_id] = hold_readings(config, user_reading(2, "cuff:u2:1"))
    assert doctor.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"}).status == 303
    assert doctor.post("/today/map-user", map_form(doctor, 2, VALID_ID)).status == 303

    today = doctor.get("/today").body
    assert 'action="/today/map-user"' not in today, today[:4000]
    mapped = re.search(r'<p [^>]*data-mapped-user="2"[^>]*>(.*?)</p>', today, re.S)
    assert mapped, today[:4000]
    assert "用户 2 现在归" in mapped.group(1) and VALID_ID in mapped.group(1) and "张三" in mapped.group(1), mapped
    assert f'name="held_id" value="{held_id}"' in today  # still there to assign


def test_an_older_held_reading_of_a_user_mapped_to_whoever_is_checked_in(
    clinic: tuple[Config, ConsoleServer], doctor: Client
) -> None:
    config, _server = clinic
    hold_readings(config, user_reading(3, "cuff:u3:1"), user_reading(2, "cuff:u2:1"))
    assert doctor.post("/today/map-user", map_form(doctor, 3, "", whose="checked-in")).status == 303
    today = doctor.get("/today").body
    mapped = re.search(r'<p [^>]*data-mapped-user="3"[^>]*>(.*?)</p>', today, re.S)
    assert mapped and "每次测量时登记的患者" in mapped.group(1), today[:4000]
    assert 'data-map-user="3"' not in today and 'data-map-user="2"' in today  # user 2: nobody said yet


def test_mapping_a_cuff_user_on_devices_on_a_phone(browser: object, tmp_path: Path) -> None:
    """The doctor at 390 px on Devices: the paired cuff's "user N is" form fits the screen; typing
    user 2 and the patient's ID and Save maps user 2 (zh-CN screenshot: devices-map-device-user-phone)."""
    config = console_config(tmp_path / "data")
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        assert client.post("/devices/pair", {"address": CUFF, "name": "血压计 1 号"}).status == 303
        box, form = form_on_a_phone(
            browser, server, "/devices", "form.map-user", "用户", "devices-map-device-user-phone"
        )
        form.find_element(by("css"), "input[name=device_user]").send_keys("2")
        form.find_element(by("css"), "input[name=patient_id]").send_keys(VALID_ID)
        form.find_element(by("css"), "button[value=patient]").click()
        text_in(browser, "p.done", "已保存")
        wait_for(browser, lambda _d: mappings(config) == [(CUFF, 2, VALID_ID, "")])
    fits_the_screen(box)


def test_the_devices_page_offers_users_only_on_a_bp_cuff(clinic: tuple[Config, ConsoleServer], doctor: Client) -> None:
    """Devices offered "user N is (patient ID)" on every paired Bluetooth device: a thermometer and
    a pulse oximeter (which have no users) too. Pairing records an address and a name: the form
    is on a device called a BP cuff (血压计), or one whose first reading was a blood pressure
    (paired as "3 号设备"), never on the thermometer or the oximeter, whose rows say nothing of users."""
    from lastmile.clinic.devices import DeviceRegistry
    from lastmile.clinic.observations import ObservationStore
    from lastmile.data_dir import open_outbox
    from lastmile.services.ble_devices import ClinicBlePort

    config, _server = clinic
    thermometer, oximeter, unnamed_cuff = "AA:BB:CC:DD:EE:02", "AA:BB:CC:DD:EE:03", "AA:BB:CC:DD:EE:04"
    for address, name in (
        (CUFF, "血压计"),
        (thermometer, "体温计"),
        (oximeter, "指夹血氧仪"),
        (unnamed_cuff, "3 号设备"),
    ):
        assert doctor.post("/devices/pair", {"address": address, "name": name}).status == 303
    # the unnamed cuff's first reading, through the BLE service's own port (the device row's last reading)
    reading = bp_reading(dt.datetime.now(dt.timezone.utc), "cuff4:1")
    reading = replace(reading, device=replace(reading.device, address=unnamed_cuff, model=""))
    with open_outbox(config) as outbox:
        store = ObservationStore.open(config.data_dir, outbox=outbox, idle_timeout_s=900)
        registry = DeviceRegistry.open(config.data_dir)
        try:
            assert ClinicBlePort(store, registry).store(reading)
        finally:
            registry.close()
            store.close()

    page = doctor.get("/devices").body
    offered = set(re.findall(r'action="/devices/map-user"[^>]*data-address="([^"]+)"', page))
    assert offered == {CUFF, unnamed_cuff}, offered
    rows = {a: row for row in page.split('<li class="card"')[1:] for a in re.findall(r'^ data-address="([^"]+)"', row)}
    for address in (thermometer, oximeter):
        assert "用户" not in rows[address], rows[address]


def test_a_cuff_named_by_its_model_number_gets_the_users_form_once_the_link_has_seen_it(
    clinic: tuple[Config, ConsoleServer], doctor: Client
) -> None:
    """Common cuffs go by a model number: Omron's advertise "BLEsmart_0000...", A&D's "UA-651BLE".
    Paired under those names they lost the "user N is (patient ID)" form until their first reading,
    though the link had seen them advertise the Blood Pressure service (0x1810): the real bleak API
    over bumble-emulated devices, none of which has sent a reading. The cuffs get the form from
    what the link saw; the thermometer and the oximeter (their own services) still do not."""
    if importlib.util.find_spec("bumble") is None:
        missing("bumble (the emulation extra) is not installed")
    from firmware_bridge.ble.emulated_peripherals import BloodPressureCuff, PulseOximeter, Thermometer
    from tests.ble_gateway import Gateway

    config, _server = clinic
    omron, a_and_d, thermometer, oximeter = (
        "AA:BB:CC:DD:EE:11",
        "AA:BB:CC:DD:EE:12",
        "AA:BB:CC:DD:EE:13",
        "AA:BB:CC:DD:EE:14",
    )
    for address, name in ((omron, ""), (a_and_d, "UA-651BLE"), (thermometer, "UT-201BLE"), (oximeter, "PC-60F")):
        assert doctor.post("/devices/pair", {"address": address, "name": name}).status == 303
    gateway = Gateway(config.data_dir)
    try:

        async def link_sees_them() -> None:
            radio = gateway.new_radio()
            devices = [
                BloodPressureCuff(radio, omron, "BLEsmart_00000116", manufacturer="OMRON", model="HEM-7600T"),
                BloodPressureCuff(radio, a_and_d, "UA-651BLE", manufacturer="A&D", model="UA-651BLE"),
                Thermometer(radio, thermometer, "UT-201BLE", manufacturer="A&D", model="UT-201BLE"),
                PulseOximeter(radio, oximeter, "PC-60F", manufacturer="Creative", model="PC-60F"),
            ]
            addresses = (omron, a_and_d, thermometer, oximeter)
            # every device connected and its Device Information read: the link knows all it will
            await gateway.run(devices, until=lambda: all(gateway.registry.get(a).serial for a in addresses))

        asyncio.run(link_sees_them())
        assert all(PRESSURE_UNIT not in gateway.registry.get(a).last_reading for a in (omron, a_and_d))
        # the rows keep what was advertised (1810) and what the connection found (180A, not advertised)
        for address in (omron, a_and_d):
            assert {BLOOD_PRESSURE, DEVICE_INFORMATION} <= set(gateway.registry.get(address).services)
        for address in (thermometer, oximeter):
            assert BLOOD_PRESSURE not in gateway.registry.get(address).services
    finally:
        gateway.close()

    page = doctor.get("/devices").body
    offered = set(re.findall(r'action="/devices/map-user"[^>]*data-address="([^"]+)"', page))
    assert offered == {omron, a_and_d}, offered


def test_a_scale_whose_users_weigh_is_offered_the_users_form_in_a_scales_words(
    clinic: tuple[Config, ConsoleServer], doctor: Client
) -> None:
    """A family's weight scale with user buttons (Weight Scale service 0x181D, a User ID in each
    weighing) sent user 2's weight: held, "device user 2 is mapped to no patient" - and Devices
    offered no "user N is (patient ID)" form for it (only what could be a BP cuff got one), so
    the doctor could never say whose user 2 is. The real bleak API over a bumble-emulated scale.
    The scale gets the form, as does one whose link saw no service but whose weighing named its
    user; their rows say nothing of a cuff (血压计, 袖带), in Chinese or English."""
    if importlib.util.find_spec("bumble") is None:
        missing("bumble (the emulation extra) is not installed")
    from firmware_bridge.ble.emulated_peripherals import WeightRecord, WeightScale
    from tests.ble_gateway import Gateway

    config, _server = clinic
    # the second scale's link saw no service (its own protocol): its weighing named a user
    scale, unseen_scale = "AA:BB:CC:DD:EE:21", "AA:BB:CC:DD:EE:22"
    for address, name in ((scale, "BF 600"), (unseen_scale, "2 号设备")):
        assert doctor.post("/devices/pair", {"address": address, "name": name}).status == 303
    gateway = Gateway(config.data_dir)
    try:

        async def user_2_weighs() -> None:
            radio = gateway.new_radio()
            device = WeightScale(
                radio, scale, "BF600", manufacturer="Beurer", model="BF 600", memory=[WeightRecord(61.5, None, 2)]
            )
            await gateway.run([device], until=lambda: gateway.port.outcomes["held"] >= 1)

        asyncio.run(user_2_weighs())
        (held,) = gateway.store.held()
        assert (held.observation.device_user, held.observation.kind) == (2, "body-weight"), held
        weighing = held.observation
        weighing = replace(
            weighing, device=replace(weighing.device, address=unseen_scale), device_user=3, record_key="scale2:1"
        )
        assert gateway.port.store(weighing)  # the BLE service's own port: held, user 3 mapped to nobody
        assert not gateway.registry.get(unseen_scale).services
    finally:
        gateway.close()

    for language in ("zh-CN", "en"):
        doctor.language = language
        page = doctor.get("/devices").body
        offered = set(re.findall(r'action="/devices/map-user"[^>]*data-address="([^"]+)"', page))
        assert offered == {scale, unseen_scale}, (language, offered)
        for address in offered:
            row = next(
                row for row in page.split('<li class="card" ')[1:] if row.startswith(f'data-address="{address}"')
            )
            row = row.split("</li>")[0]
            assert ("用户（设备上的用户键）" if language == "zh-CN" else "User (its button on the device)") in row
            assert "61.5 kg" in row and not re.search(r"血压|袖带|cuff", row, re.IGNORECASE), row


def test_a_mapped_users_reading_for_another_patient_says_on_today_whose_it_became(
    browser: object, tmp_path: Path
) -> None:
    """张三 checked in, then 李四: the doctor says user 2 is 张三's ID (no name typed). The line
    under user 2's older held reading names 张三 (the gateway knows the name from today's
    check-in), and a new reading of user 2, stored for 张三 by that mapping, is not lost from
    sight: Today's readings panel says "刚才 <cuff> 用户 2 的读数已记给 张三 (ID)" - the last few
    only (zh-CN screenshot: today-mapped-reading-elsewhere)."""
    config = console_config(tmp_path / "data")
    hold_readings(config, user_reading(2, "cuff:u2:1"))
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        assert client.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"}).status == 303
        assert client.post("/today/check-in", {"patient_id": OTHER_ID, "name": "李四"}).status == 303
        assert client.post("/today/map-user", map_form(client, 2, VALID_ID)).status == 303
        stored = record_readings(config, *(user_reading(2, f"cuff:u2:{n}") for n in range(2, 7)))
        assert {(r.outcome, r.patient_id) for r in stored} == {("stored", VALID_ID)}

        log_in(browser, server)
        browser.get(server.url + "/today")  # type: ignore[attr-defined]
        text_in(browser, "#panel-held [data-mapped-user='2']", "张三")
        text_in(browser, "#panel-readings", "用户 2 的读数已记给 张三")
        elsewhere = browser.find_elements(by("css"), "#panel-readings [data-stored-elsewhere]")  # type: ignore[attr-defined]
        assert len(elsewhere) == 3, [e.text for e in elsewhere]  # the last few, not every one
        assert VALID_ID in elsewhere[0].text and "李四" not in elsewhere[0].text, elsewhere[0].text
        save_screenshot(browser, "today-mapped-reading-elsewhere")


def test_devices_name_a_mapped_user_as_its_next_reading_goes_after_the_name_is_corrected(
    clinic: tuple[Config, ConsoleServer], doctor: Client
) -> None:
    """User 2 is mapped on Devices while 110... is checked in as 张三 (a typo); the doctor checks
    him in again as 张三丰, then 李四. Devices still said "user 2 is 110... (张三)" while user 2's
    readings go out as 张三丰: the page names the mapping as its readings are named."""
    from lastmile.clinic.patients import PatientContext

    config, _server = clinic
    context = PatientContext.open(config.data_dir, idle_timeout_s=900)
    try:
        context.set_patient(VALID_ID, "Zhang^San=张^三", now=dt.datetime.now(dt.timezone.utc))
        assert doctor.post("/devices/pair", {"address": CUFF, "name": "血压计"}).status == 303
        assert doctor.post("/devices/map-user", device_map_form(doctor, VALID_ID, "2")).status == 303
        context.set_patient(VALID_ID, "Zhang^Sanfeng=张^三丰", now=dt.datetime.now(dt.timezone.utc))
        context.set_patient(OTHER_ID, "Li^Si=李^四", now=dt.datetime.now(dt.timezone.utc))
    finally:
        context.close()
    listed = doctor.get("/devices").body.split('id="h-device-users"', 1)[1].split("</section>", 1)[0]
    assert f"{VALID_ID} (张三丰)" in listed, listed
    [stored] = record_readings(config, user_reading(2, "cuff:u2:1"))
    assert stored.patient_id == VALID_ID
