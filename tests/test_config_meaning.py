"""Settings checked for what they mean, not only their type: every mistake refused by
`lastmile config check` with its file:line (issue 10, item 6)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import dcmread

from lastmile.cli import main as cli
from lastmile.config import ConfigError, parse_config, render_defaults
from tests.service_harness import EXAMPLE_PROFILE

# (file text, line of the mistake, words of the message); one case per mistake.
MISTAKES = [
    ("[reading_center]\nhost = 'pacs'\nport = 70000\n", 3, "'reading_center.port' must be a TCP port from 1 to 65535"),
    ("[reading_center]\nlisten_port = 0\n", 2, "'reading_center.listen_port' must be a TCP port"),
    ("[lan_receiver]\nae_title = 'GW'\nport = 0\n", 3, "'lan_receiver.port' must be a TCP port"),
    ("[gps]\ngpsd_port = 65536\n", 2, "'gps.gpsd_port' must be a TCP port"),
    ("[reading_center]\nassociations = 0\n", 2, "'reading_center.associations' must be a count"),
    ("[reading_center]\nbatch_size = 0\n", 2, "'reading_center.batch_size' must be a count"),
    ("[reading_center]\nmax_associations = 17\n", 2, "'reading_center.max_associations' must be a count"),
    (
        "[reading_center]\nassociations = 3\nmax_associations = 2\n",
        3,
        "'reading_center.max_associations' (2) is below reading_center.associations (3)",
    ),
    ("[fhir]\nbatch_size = 0\n", 2, "'fhir.batch_size' must be a count"),
    ("[ble]\nconnect_attempts = 0\n", 2, "'ble.connect_attempts' must be a count"),
    # 0 would re-read a connected device's battery without pause
    ("[ble]\nbattery_poll_s = 0\n", 2, "'ble.battery_poll_s' must be a number of seconds above 0"),
    ("[visits]\ntrack_max_points = 0\n", 2, "'visits.track_max_points' must be a count"),
    (
        "[reading_center]\nport = 104\ntimeout_s = inf\n",
        3,
        "'reading_center.timeout_s' must be a finite number, not inf",
    ),
    ("[fhir]\ntimeout_s = nan\n", 2, "'fhir.timeout_s' must be a finite number, not nan"),
    ("[outbox]\nbackoff_max_s = -inf\n", 2, "'outbox.backoff_max_s' must be a finite number"),
    ("[reading_center]\ntimeout_s = 0\n", 2, "'reading_center.timeout_s' must be a number of seconds above 0"),
    ("[outbox]\nbackoff_base_s = 60.0\nbackoff_max_s = 10.0\n", 3, "must not be less than outbox.backoff_base_s"),
    ("[reading_center]\ncalled_ae = 'COUNTY_READING_CENTER_01'\n", 2, "has 24 characters: an AE title has at most 16"),
    ("[reading_center]\ncalling_ae = '石桥村卫生室'\n", 2, "'reading_center.calling_ae' contains '石'"),
    ("[reading_center]\ncalling_ae = 'CLINIC\\\\01'\n", 2, "contains '\\\\'"),
    ("[reading_center]\ncalled_ae = '    '\n", 2, "must not be empty or only spaces"),
    ('[reading_center]\ncalling_ae = "CLINIC\\t1"\n', 2, "contains '\\t'"),
    ("[lan_receiver]\nae_title = 'LASTMILE-LAN-RECEIVER'\n", 2, "'lan_receiver.ae_title' has 21 characters"),
    (
        "[lan_receiver]\nenabled = true\nallowed_callers = ['CART1', '心电图机']\n",
        3,
        "'lan_receiver.allowed_callers' entry '心电图机' contains",
    ),
    ("[lan_receiver]\nenabled = true\n", 2, "lan_receiver.allowed_callers is empty"),
    (
        "[lan_receiver]\nsop_classes = ['1.2.840.10008.5.1.4.1.1.9.1.1', 'twelve-lead']\n",
        2,
        "entry 'twelve-lead' is not a DICOM UID",
    ),
    (
        "[reading_center.tls]\nenabled = true\n",
        2,
        "'reading_center.tls.enabled' is true but reading_center.tls.ca_file is empty",
    ),
    (
        "[reading_center.tls]\nca_file = '/etc/ca.pem'\ncert_file = '/etc/gw.pem'\n",
        3,
        "set both cert_file and key_file",
    ),
    (
        "[serial]\npatient_card_pattern = '(?P<id>[0-9]{18'\n",
        2,
        "'serial.patient_card_pattern' is not a valid regular expression",
    ),
    (
        "[serial]\ndoctor_badge_pattern = 'DR-(?P<id>\\d+'\n",
        2,
        "'serial.doctor_badge_pattern' is not a valid regular expression",
    ),
    (
        "[serial]\n\n[[serial.devices]]\nname = 'bp'\nmatch = '2e8a:000a'\nprofile = 'bridge'\n\n"
        "[[serial.devices]]\nname = 'vitals'\nmatch = '0403:6001'\nprofile = 'no-such-monitor'\n",
        11,
        "'serial.devices[1].profile' unknown profile 'no-such-monitor'",
    ),
    (
        "[serial]\ndevices = [\n  {name = 'a', match = '2e8a:000a', profile = 'bridge'},\n"
        "  {name = 'b', match = 'ttyUSB0', profile = 'scanner'},\n]\n",
        4,
        "'serial.devices[1].match' device match 'ttyUSB0'",
    ),
    (
        "[[serial.devices]]\nname = 'a'\nmatch = '2e8a:000a'\nprofile = 'bridge'\nspeed = 9600\n",
        5,
        "'serial.devices[0].speed' unknown key(s) speed",
    ),
    ("[gateway]\nid = '云南省石桥村卫生室网关'\n", 2, "does not fit DICOM StationName: it is 33 bytes in UTF-8"),
    ("[gateway]\nid = 'clinic-gateway-0001'\n", 2, "set gateway.station_name to a short name"),
    (
        "[gateway]\nid = 'gw'\nstation_name = '石桥村卫生室网关'\n",
        3,
        "'gateway.station_name' is 24 bytes in UTF-8; DICOM StationName holds 16",
    ),
    ("[gateway]\nid = 'gw\\\\01'\n", 2, "'gateway.id' must not contain a backslash"),
    (
        "[gateway]\ninstitution = '" + "卫生院" * 8 + "'\n",
        2,
        "'gateway.institution' is 72 bytes in UTF-8; DICOM InstitutionName holds 64",
    ),
    ("[gateway]\ndata_dir = 'data'\n", 2, "'gateway.data_dir' must be an absolute path"),
    ("[usb_import]\nfolders = ['media/usb0']\n", 2, "'usb_import.folders' entry 'media/usb0' must be an absolute path"),
    ("[gps]\nsource = 'nmea'\n", 2, "gps.nmea_port is empty"),
    (
        "[fhir]\nbase_url = 'http://county.example/fhir'\ntoken_file = '/etc/lastmile/certs/fhir.token'\n",
        2,
        "'fhir.base_url' http://county.example/fhir is plain http to another machine",
    ),
    (
        "[reading_center]\nlisten_port = 11112\n[lan_receiver]\nenabled = true\nallowed_callers = ['CART1']\n",
        2,
        "'reading_center.listen_port' (11112) is the port of both the LAN receiver and the storage-commitment",
    ),
    (
        "[lan_receiver]\nenabled = true\nallowed_callers = ['CART1']\nport = 11113\n",
        4,
        "'lan_receiver.port' (11113) is the port of both",
    ),
    # keys added after the first round of checks (report networks, bounded objects, reports, console)
    (
        "[reading_center]\nreport_networks = ['10.8.0.0/24', 'county-pacs']\n",
        2,
        "'reading_center.report_networks' entry 'county-pacs' is not a network in CIDR form",
    ),
    (
        "[reading_center]\nreport_networks = ['10.8.0.5/24']\n",
        2,
        "has host bits set: write 10.8.0.0/24 for the network, or 10.8.0.5/32 for one host",
    ),
    ("[reading_center]\nreport_networks = ['0.0.0.0/0']\n", 2, "is every address: anyone could send"),
    ("[reading_center]\nlisten_host = 'gateway.local'\n", 2, "'reading_center.listen_host' must be an IP address"),
    ("[outbox]\nmax_interrupted_sends = 0\n", 2, "'outbox.max_interrupted_sends' must be a count of interrupted"),
    ("[lan_receiver]\nmax_object_mb = 0\n", 2, "'lan_receiver.max_object_mb' must be a number of megabytes from 1"),
    ("[lan_receiver]\nhost = 'all'\n", 2, "'lan_receiver.host' must be an IP address of this gateway"),
    ("[reports]\nmove_port = 70000\n", 2, "'reports.move_port' must be a TCP port from 1 to 65535"),
    ("[reports]\nbatch_size = 0\n", 2, "'reports.batch_size' must be a count of studies"),
    ("[reports]\nstat_poll_s = 0\n", 2, "'reports.stat_poll_s' must be a number of seconds above 0"),
    ("[reports]\nwindow_days = 0\n", 2, "'reports.window_days' must be a number of days above 0"),
    ("[reports]\nmove_ae = 'LASTMILE_REPORT_RECEIVER'\n", 2, "'reports.move_ae' has 24 characters"),
    (
        "[reading_center]\nlisten_port = 11114\n[reports]\nmove_ae = 'GW_MOVE'\n",
        4,
        "'reports.move_ae' is set and reports.move_port (11114) is also the port of the storage-commitment",
    ),
    ("[reports]\ncritical_codes = ['401303003']\n", 2, "entry '401303003' is not SCHEME:CODE"),
    ("[reports]\ncritical_command = ['aplay', 'alarm.wav']\n", 2, "name the program by its absolute path"),
    ("[reports]\nbackoff_base_s = 60.0\nbackoff_max_s = 10.0\n", 3, "must not be less than reports.backoff_base_s"),
    ("[console]\nlisten = '0.0.0.0:0'\n", 2, "'console.listen' must be \"HOST:PORT\" with a port from 1 to 65535"),
    ("[console]\nlisten = 'clinic-pc:8443'\n", 2, "'console.listen' host 'clinic-pc' must be an IP address"),
    ("[console]\nlisten = '0.0.0.0:8443'\nhttps = false\n", 3, "plain HTTP is allowed on loopback only"),
    ("[console]\nmax_login_failures = 0\n", 2, "'console.max_login_failures' must be a count"),
    ("[console]\nsession_idle_s = 0\n", 2, "'console.session_idle_s' must be a number of seconds above 0"),
    ("[fhir]\npatient_id_system = 'county register'\n", 2, "'fhir.patient_id_system' must be a URI"),
    ("[gps]\ngpsd_host = ''\n", 2, "'gps.gpsd_host' must name gpsd's address"),
    ("[serial]\nprofiles_dir = 'profiles'\n", 2, "'serial.profiles_dir' must be an absolute path"),
    ("[ecg]\nstat_name_hold_s = -1\n", 2, "'ecg.stat_name_hold_s' must not be negative"),
    ("[ecg]\nstat_name_hold_s = 86400\n", 2, "stat_name_hold_s' must be a number of seconds from 0 to 3600, not 86400"),
]


@pytest.mark.parametrize("text, line, words", MISTAKES, ids=[m[2][:48] for m in MISTAKES])
def test_config_check_refuses_it_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, line: int, words: str
) -> None:
    path = tmp_path / "lastmile.toml"
    path.write_text(text, encoding="utf-8")
    assert cli(["-c", str(path), "config", "check"]) == 78
    err = capsys.readouterr().err
    matching = [ln for ln in err.splitlines() if words in ln]
    assert matching, err
    assert f"lastmile.toml:{line}: " in matching[0], err
    assert len([ln for ln in err.splitlines() if "lastmile.toml:" in ln]) == 1, err  # one mistake, one line


def test_every_problem_is_reported_at_once_in_file_order() -> None:
    text = "[reading_center]\nport = 0\ncalling_ae = 'A_VERY_LONG_AE_TITLE'\nassociations = 0\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, "x.toml")
    lines = str(err.value).splitlines()
    assert [ln.split(":")[1] for ln in lines] == ["2", "3", "4"]


def test_the_defaults_and_sane_files_pass() -> None:
    parse_config(render_defaults())
    parse_config(
        "[gateway]\nid = '云南石桥村-01'\nstation_name = '石桥村-01'\n"  # 12 bytes: fits
        "[reading_center]\nport = 11112\nlisten_port = 11113\ncalled_ae = 'ORTHANC'\n"
        "[lan_receiver]\nenabled = true\nallowed_callers = ['CART 1']\n"
        "[fhir]\nbase_url = 'http://127.0.0.1:8080/fhir'\n"
        "[[serial.devices]]\nname = 'bp'\nmatch = '2e8a:000a'\nprofile = 'bridge'\n"
    )
    parse_config(
        "[reading_center]\nreport_networks = ['10.8.0.0/24', '192.168.1.20', 'fd00::/8']\nlisten_host = '10.8.0.12'\n"
        "[outbox]\nmax_interrupted_sends = 1\n[lan_receiver]\nmax_object_mb = 1\nhost = '192.168.1.10'\n"
        "[reports]\nmove_ae = 'GW_MOVE'\nmove_host = '127.0.0.1'\ncritical_command = ['/usr/bin/aplay', 'a.wav']\n"
        "amendment_poll_h = 0\n[console]\nlisten = '127.0.0.1:8080'\nhttps = false\n"
        "[fhir]\npatient_id_system = 'urn:oid:2.16.156.10011.1.1'\npractitioner_id_system = 'https://county.example/ids'\n"
    )


def test_config_check_also_wants_the_files_it_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "lastmile.toml"
    path.write_text(f"[reading_center.tls]\nenabled = true\nca_file = '{tmp_path / 'missing-ca.pem'}'\n")
    assert cli(["-c", str(path), "config", "check"]) == 78
    err = capsys.readouterr().err
    assert "lastmile.toml:3: 'reading_center.tls.ca_file' names" in err and "not a file" in err
    (tmp_path / "missing-ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    assert cli(["-c", str(path), "config", "check"]) == 0


def test_a_long_gateway_id_is_mapped_never_cut(tmp_path: Path) -> None:
    """The full id stays whole (FHIR, the visit chain, and the DICOM converting equipment's
    serial number); DICOM StationName is the configured short name."""
    from lastmile.data_dir import open_outbox
    from lastmile.ecg.intake import enqueue_recording
    from tests.ecg_factories import make_recording

    full_id = "云南省石桥村卫生室网关"  # 33 bytes: does not fit StationName
    config = parse_config(
        f"[gateway]\nid = '{full_id}'\nstation_name = '石桥村网关'\n"
        f"data_dir = '{tmp_path / 'data'}'\n[outbox]\nmin_free_mb = 0\n"
    )
    with open_outbox(config) as outbox:
        item = enqueue_recording(outbox, make_recording(1), config, key="ecg-1").item
        data = outbox.read_payload(item)
    ds = dcmread(io.BytesIO(data))
    assert ds.StationName == "石桥村网关"
    (gateway,) = ds.ContributingEquipmentSequence
    assert gateway.StationName == "石桥村网关" and gateway.DeviceSerialNumber == full_id


@pytest.mark.parametrize(
    ("bad_line", "words"),
    [
        ("baudrate = 0", "'profile.baudrate' out of range"),  # the port speed mistyped
        ("baudrat = 9600", "'profile' unknown key(s) baudrat"),  # the key mistyped
    ],
)
def test_config_check_reads_the_serial_profiles_the_acquire_service_will_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad_line: str, words: str
) -> None:
    """A technician adds a monitor with its own profile and runs `lastmile config check`: OK.
    Then `lastmile acquire` refuses the devices naming the profile (its mistake) and reads none of them.
    The check must find what the service finds, with the profile's file, line and key."""
    from lastmile.config import load_config, load_profiles_apart

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    good = EXAMPLE_PROFILE.read_text().replace('name = "example-vitals-monitor"', 'name = "ward-monitor"', 1)
    lines = good.replace("baudrate = 9600", bad_line, 1).splitlines()
    line = next(i + 1 for i, text in enumerate(lines) if text.startswith(bad_line))
    (profiles / "ward-monitor.toml").write_text("\n".join(lines) + "\n")
    path = tmp_path / "lastmile.toml"
    path.write_text(
        f"[serial]\nprofiles_dir = '{profiles}'\n\n"
        "[[serial.devices]]\nname = 'ward'\nmatch = '0403:6001'\nprofile = 'ward-monitor'\n"
    )
    _, bad = load_profiles_apart(load_config(path))  # what the acquire service does at start
    assert f"ward-monitor.toml:{line}: {words}" in bad["ward-monitor"], bad

    assert cli(["-c", str(path), "config", "check"]) == 78
    err = capsys.readouterr().err
    assert f"ward-monitor.toml:{line}: {words}" in err, err
    assert "lastmile.toml:7: 'serial.devices[0].profile'" in err, err  # which device uses it

    (profiles / "ward-monitor.toml").write_text(good)
    assert cli(["-c", str(path), "config", "check"]) == 0
