"""System test: the SD-card image booted as a whole machine (qemu-system-aarch64 -M virt).

    LASTMILE_IMAGE=/path/to/lastmile.img scripts/test.sh -m slow tests/system/test_image_boot.py
    (without LASTMILE_IMAGE the session builds one with image/build.sh first)

A clinic's card, as a county technician prepares it: the test writes a lastmile.toml (with a
watched import folder) into the boot partition of a copy-on-write overlay of the image, with a
Contec ECG file and tests/system/guest_report.py. The machine boots the image's own kernel,
initramfs and root with no network device at all. Once multi-user.target is reached, the kernel
command line starts guest_report.py, which reports on the serial console and powers off. The
test asserts: the root is the RAM overlay over the read-only SD root, provisioning installed
this very lastmile.toml, all five Lastmile services (acquire, ble, forward, console, metrics) are
active (Type=notify: READY received) and never restarted, the console answers over HTTPS in
Chinese and the metrics endpoint counts the queued study, no unit failed or is looping, and the
ECG dropped into the watched folder is in the outbox under its file-content key.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest

from lastmile.demo.loopback import free_port
from tests.conftest import require_tool, shared_file
from tests.peers import OrthancServer, gateway_modality
from tests.system.image_configs import CLINIC_CONFIG, GATEWAY_AE, NETWORKED_CONFIG, PACS_ADDRESS, PACS_PORT
from tests.system.qemu_machine import GatewayDisk, MachineError, QemuMachine, loopback_network

# A boot under software emulation takes minutes (the module's fixture boots twice).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3 * 1800)]

GUEST_REPORT = Path(__file__).with_name("guest_report.py")
SERVICES = {
    "lastmile-acquire.service": "Lastmile acquire",
    "lastmile-ble.service": "Lastmile BLE",
    "lastmile-forward.service": "Lastmile forward",
    "lastmile-console.service": "Lastmile console",
    "lastmile-metrics.service": "Lastmile metrics",
}
NETWORK_TOML = (Path(__file__).parents[2] / "image" / "files" / "network.toml.example").read_text()
DELIVERED = ("committed", "purged")
# What starts guest_report.py: a transient unit after multi-user.target, on the console. The
# kernel-command-line.service that systemd-run-generator makes only queues it (--no-block), so
# nothing in the boot waits for the report.
REPORT_CMDLINE = [
    "systemd.unit=multi-user.target",
    "systemd.wants=kernel-command-line.service",
    "systemd.run_success_action=none",
    "systemd.run_failure_action=none",
    'systemd.run="/usr/bin/systemd-run --no-block --unit=lastmile-test-report --property=Type=exec '
    "--property=After=multi-user.target --property=RequiresMountsFor=/boot/firmware "
    '--property=StandardOutput=journal+console /usr/bin/python3 /boot/firmware/lastmile-test/guest_report.py"',
    # The whole journal on the serial console: console.log says why when something fails.
    "systemd.journald.forward_to_console=1",
]
# SD cards as sold: "32 GB" and "8 GB" are decimal (qemu-img rounds nothing: both are whole sectors).
CARD_32GB = 32_000_000_000
CARD_8GB = 8_000_000_000
MIB = 2**20
REPORT_END = r"LMTEST (done|error) "
BOOT_TIMEOUT_S = 1800  # software-emulated arm64 on 2 shared cores; typically a few minutes


def reports(console: str) -> dict[str, list]:
    """`LMTEST key json` lines from the console, by key (a key may repeat)."""
    found: dict[str, list] = {}
    for key, value in re.findall(r"^.*?LMTEST (\S+) (.*?)\r?$", console, re.M):
        try:
            found.setdefault(key, []).append(json.loads(value))
        except ValueError:
            continue  # a line another console writer (kernel, systemd) cut into
    return found


def boot_and_report(
    image: Path,
    workdir: Path,
    extra_cmdline: list[str],
    card_bytes: int,
    *,
    config: str = CLINIC_CONFIG,
    network: list[str] | None = None,
    expect: dict[str, object] | None = None,
    boot_files: dict[str, bytes] | None = None,
) -> dict:
    """Boot a fresh copy-on-write card of `image` once; what guest_report.py said, and timings."""
    for tool in ("qemu-system-aarch64", "qemu-img", "qemu-io", "mcopy", "sfdisk"):
        require_tool(tool)
    ecg = shared_file("ecg", "contec", "0000037.ECG")
    disk = GatewayDisk.create(image, workdir)
    disk.resize(card_bytes)  # the clinic's card is bigger than the image: the data partition grows
    disk.put_boot_files(
        {
            "lastmile/lastmile.toml": config.encode(),
            "lastmile-test/guest_report.py": GUEST_REPORT.read_bytes(),
            f"lastmile-test/{ecg.name}": ecg.read_bytes(),
            **({"lastmile-test/expect.json": json.dumps(expect).encode()} if expect else {}),
            **(boot_files or {}),
        }
    )
    console_log = workdir / "console.log"
    machine = QemuMachine(disk, console_log, extra_cmdline=[*REPORT_CMDLINE, *extra_cmdline], network=network)
    began = time.monotonic()
    with machine:
        try:
            # systemd prints "Started" for a Type=notify service only once it sent READY=1. A
            # service that never gets there shows in the report: stop waiting once it is out.
            all_ready_s: float | None = None
            for service in SERVICES.values():
                if machine.wait_for(rf"Started .*{service}|{REPORT_END}", BOOT_TIMEOUT_S).group(0).startswith("LMTEST"):
                    break
            else:
                all_ready_s = time.monotonic() - began
            machine.wait_for(REPORT_END, BOOT_TIMEOUT_S)
            machine.wait_exit(300)  # guest_report.py powers off
        except MachineError as exc:
            # The console log may be gone with pytest's old temporary directories: keep what
            # the guest reported with the failure.
            said = "\n".join(line for line in machine.console.splitlines() if "LMTEST" in line)
            raise MachineError(f"{exc}\n--- what the gateway reported:\n{said}") from None
    duration_s = time.monotonic() - began
    ready = "never" if all_ready_s is None else f"{all_ready_s:.0f} s"
    print(f"\nboot to all READY: {ready}, whole boot: {duration_s:.0f} s (console: {console_log})")
    return {
        "reports": reports(machine.console),
        "console": machine.console,
        "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
        "ecg_sha256": hashlib.sha256(ecg.read_bytes()).hexdigest(),
        "log": console_log,
    }


@pytest.fixture(scope="module")
def booted(image: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    # The clinic's Wi-Fi and 4G as a technician writes them (the documented example).
    return boot_and_report(
        image,
        tmp_path_factory.mktemp("boot"),
        [],
        CARD_32GB,
        boot_files={"lastmile/network.toml": NETWORK_TOML.encode()},
    )


@pytest.fixture(scope="module")
def booted_without_overlayfs(image: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The overlay cannot be set up: the kernel refuses to load overlayfs (what a kernel update
    that lost the module would do). The initramfs script's real failure path runs."""
    return boot_and_report(image, tmp_path_factory.mktemp("boot-no-overlay"), ["module_blacklist=overlay"], CARD_8GB)


@pytest.fixture(scope="module")
def booted_with_a_reading_center(image: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The gateway with a link: user-mode networking that reaches only the test's Orthanc (in the
    suite's private network namespace) and lets only its commitment reports in."""
    workdir = tmp_path_factory.mktemp("boot-networked")
    report_port = free_port()
    orthanc = OrthancServer(workdir / "orthanc", modalities=gateway_modality(GATEWAY_AE, report_port)).start()
    try:
        network = loopback_network(
            relays={f"{PACS_ADDRESS}:{PACS_PORT}": orthanc.dicom_port}, host_forwards={report_port: 11113}
        )
        booted = boot_and_report(
            image,
            workdir,
            [],
            CARD_8GB,
            config=NETWORKED_CONFIG,
            network=network,
            expect={"outbox_states": list(DELIVERED)},
        )
        booted["orthanc"] = {"uids": orthanc.sop_instance_uids(), "c_stores": orthanc.c_stores()}
        return booted
    finally:
        orthanc.stop()


def one(booted: dict, key: str) -> object:
    values = booted["reports"].get(key)
    assert values, f"no LMTEST {key} on the console (see {booted['log']}); error: {booted['reports'].get('error')}"
    return values[-1]


def test_the_report_ran_to_the_end(booted: dict) -> None:
    assert "error" not in booted["reports"], booted["reports"]["error"]
    assert one(booted, "done") is True


def test_root_is_a_ram_overlay_over_the_read_only_card(booted: dict) -> None:
    root = one(booted, "root")
    assert root["fstype"] == "overlay"
    assert root["state"].startswith("overlay:")
    _source, fstype, options = root["lower"].split(maxsplit=2)
    assert fstype == "ext4" and options.split(",")[0] == "ro"
    assert root["upper"].startswith("tmpfs")
    assert root["boot"].split()[1].split(",")[0] == "ro"  # the FAT the firmware reads is never written
    assert "lastmile-overlay-root: root is a" in booted["console"]
    assert "Failure:" not in booted["console"]


def test_the_data_partition_grew_to_the_end_of_the_card(booted: dict) -> None:
    assert_data_fills_the_card(one(booted, "data"), CARD_32GB)


def assert_data_fills_the_card(data: dict, card_bytes: int) -> None:
    assert data["card_bytes"] == card_bytes
    # the partition ends at the card's last whole MiB (build.sh's alignment) ...
    assert data["partition_start"] + data["partition_bytes"] == card_bytes // MIB * MIB, data
    # ... and the filesystem fills it (x-systemd.growfs): statfs leaves out ext4's own metadata
    assert data["fs_bytes"] > 0.95 * data["partition_bytes"], data
    assert any("grown to" in line for line in data["grow"]), data["grow"]


def test_provisioning_installed_the_clinics_configuration(booted: dict) -> None:
    config = one(booted, "config")
    assert config["sha256"] == booted["config_sha256"]
    assert config["owner"] == "root:lastmile 640"


def test_every_service_is_ready_and_never_restarted(booted: dict) -> None:
    services = {s["Id"]: s for s in booted["reports"]["service"]}
    assert set(services) == set(SERVICES)
    for name, state in services.items():
        assert state["Type"] == "notify", name
        assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
        assert state["NRestarts"] == "0", state


def test_the_console_answers_in_chinese_and_metrics_count_the_queue(booted: dict) -> None:
    console = one(booted, "console")
    assert console["status"] == 200 and console["lang"] == "zh-CN", console
    metrics = one(booted, "metrics")
    assert metrics["status"] == 200, metrics
    queued = [ln for ln in metrics["queue"] if 'kind="dicom"' in ln and not ln.endswith(" 0.0")]
    assert len(queued) == 1 and queued[0].endswith(" 1.0"), metrics["queue"]
    assert len(metrics["up"]) == len(SERVICES) and all(ln.endswith(" 1.0") for ln in metrics["up"]), metrics["up"]


def test_no_unit_failed_or_loops_with_no_network(booted: dict) -> None:
    assert one(booted, "system") == "running", one(booted, "startup")
    assert one(booted, "failed") == []
    looping = [
        u
        for u in booted["reports"]["unit"]
        if u.get("NRestarts", "0") != "0" or u["SubState"] in ("auto-restart", "failed")
    ]
    assert looping == []
    active = {u["Id"] for u in booted["reports"]["unit"] if u["ActiveState"] == "active"}
    for needed in (
        "lastmile-provision.service",
        "lastmile-root-check.service",
        "lastmile-grow-data.service",
        "chrony.service",
        "systemd-logind.service",
        "NetworkManager.service",
        "ModemManager.service",
        "lastmile-network.service",
        "cups.service",
        "var-lib-lastmile.mount",
        "boot-firmware.mount",
    ):
        assert needed in active, needed
    assert one(booted, "system-final") == "running"
    # Updates come as images; apt would only fill the RAM overlay.
    assert not active & {"apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer"}
    assert "fstrim.timer" in active


def test_an_ecg_dropped_on_the_watched_folder_reaches_the_outbox(booted: dict) -> None:
    assert one(booted, "dropped")["sha256"] == booted["ecg_sha256"]
    assert one(booted, "outbox-before") == []
    after = one(booted, "outbox-after")["items"]
    assert len(after) == 1, after
    kind, key, state = after[0]
    assert kind == "dicom" and key == f"ecg-file-sha256:{booted['ecg_sha256']}"
    assert any("1 imported, 0 already known, 0 refused" in line for line in one(booted, "acquire-log"))
    # Nothing listens at the reading center: the study waits in the outbox, it is never dropped.
    assert state in ("queued", "sending"), after
    assert sum(one(booted, "queue")["counts"].values()) == 1


def test_without_overlayfs_the_gateway_runs_writable_and_says_so(booted_without_overlayfs: dict) -> None:
    booted = booted_without_overlayfs
    assert "lastmile-overlay-root: no overlayfs" in booted["console"]  # on the console, at boot
    root = one(booted, "root")
    assert root["fstype"] == "ext4" and root["state"].startswith("writable: no overlayfs")
    # Loud: the one failed unit says why; the system is degraded, never silently "running".
    failed = one(booted, "failed")
    assert len(failed) == 1 and failed[0].startswith("lastmile-root-check.service"), failed
    assert one(booted, "system") == "degraded"
    assert "root: writable: no overlayfs" in booted["console"]
    # ... and the clinic keeps recording.
    services = {s["Id"]: s for s in booted["reports"]["service"]}
    assert all(s["ActiveState"] == "active" for s in services.values()), services
    assert len(one(booted, "outbox-after")["items"]) == 1
    assert_data_fills_the_card(one(booted, "data"), CARD_8GB)  # an 8 GB card


def test_an_ecg_reaches_the_reading_center_over_the_link_and_is_committed(booted_with_a_reading_center: dict) -> None:
    booted = booted_with_a_reading_center
    assert "error" not in booted["reports"], booted["reports"]["error"]
    final = one(booted, "outbox-final")
    assert final["reached"], final
    [(kind, key, state)] = final["items"]
    # committed: the PACS confirmed it keeps the study (then purged at once: retention_days = 0)
    assert kind == "dicom" and key == f"ecg-file-sha256:{booted['ecg_sha256']}" and state in DELIVERED
    # What the reading center really holds: one instance, stored once (no duplicate on retries).
    uids = booted["orthanc"]["uids"]
    assert len(uids) == 1, booted["orthanc"]
    assert booted["orthanc"]["c_stores"] == {next(iter(uids)): 1}
    services = {s["Id"]: s for s in booted["reports"]["service"]}
    assert all(s["NRestarts"] == "0" and s["ActiveState"] == "active" for s in services.values()), services
    assert one(booted, "failed") == []


# -- printing, time, watchdog, links (issue 15; issue 18 items 6 and 7) ------------------------------


def test_cups_runs_and_prints_chinese_with_noto_cjk(booted: dict) -> None:
    assert one(booted, "lpstat") == "scheduler is running"
    family, _, path = str(one(booted, "fc-match")).partition("|")
    assert family == "Noto Sans CJK SC" and "NotoSansCJK" in path, one(booted, "fc-match")
    # CUPS's texttopdf lays a text report out in a TrueType CJK font (it cannot embed Noto's CFF):
    # the Chinese line has glyphs (the first image, without fonts-wqy-microhei, printed empty
    # boxes: a blank line in ghostscript's text extraction, "Ignored bad font" with Noto)
    assert one(booted, "fc-match-texttopdf") == "WenQuanYi Micro Hei Mono|TrueType"
    texttopdf = one(booted, "texttopdf")
    assert texttopdf["exit"] == 0 and texttopdf["bytes"] > 0 and "bad font" not in texttopdf["stderr"], texttopdf
    assert len(texttopdf["fonts"]) == 4, texttopdf  # header, rule, the Latin font, the CJK font
    assert texttopdf["text"] and texttopdf["text"][0].strip(), texttopdf["text"]  # line 1 is the Chinese one
    # the scheduler took a job and its filters finished it (a queue to /dev/null: no printer here)
    job = one(booted, "lp")
    assert job["lp"].startswith("request id is boottest-"), job
    assert len(job["completed"]) == 1 and job["pending"] == [], job
    assert any("no USB printer" in line for line in one(booted, "printer-unit")), one(booted, "printer-unit")
    # the driver lastmile-printer gives a USB printer: by `lpinfo -m`'s name, else the PPD file
    # (the boot of 2026-12-01 saw `lpinfo -m` list no pxlmono.ppd: the file is what it used)
    driver = one(booted, "pcl-driver")
    assert driver["lpinfo_pxlmono"] or driver["ppd_file"], driver
    print(f"\nPCL 6 driver in the guest: {driver}")


def test_chrony_is_the_one_time_daemon_with_gpsd_as_its_reference(booted: dict) -> None:
    chrony = one(booted, "chrony")
    assert (chrony["state"]["ActiveState"], chrony["state"]["SubState"]) == ("active", "running"), chrony
    refclocks = {line.split()[1] for line in chrony["sources"] if line.startswith("#")}  # '#': a reference clock
    assert {"GPS", "PPS"} <= refclocks, chrony["sources"]
    assert chrony["timesyncd"]["LoadState"] in ("not-found", "masked"), chrony["timesyncd"]
    assert chrony["gpsd_options"] == ['GPSD_OPTIONS="-n"']


def test_systemd_runs_the_hardware_watchdog_setting(booted: dict) -> None:
    """virt has no watchdog device in this harness: the setting is in effect in PID 1 (the
    property), whether a device took it is what the journal and /dev say (reported, not asserted)."""
    watchdog = one(booted, "watchdog")
    assert "RuntimeWatchdogUSec=15s" in watchdog["manager"].splitlines(), watchdog
    assert "RebootWatchdogUSec=2min" in watchdog["manager"].splitlines(), watchdog
    print(f"\nwatchdog in the guest: {watchdog}")


def test_the_clinics_wifi_and_4g_are_provisioned_into_networkmanager(booted: dict) -> None:
    links = one(booted, "links")
    by_name = {line.split(":")[0]: line for line in links["connections"]}
    # (NetworkManager 1.42 also lists its own in-memory "lo" connection, under /run)
    assert set(by_name) - {"lo"} == {"ethernet", "lastmile-wifi", "lastmile-4g"}, links
    assert ":802-11-wireless:" in by_name["lastmile-wifi"] and ":gsm:" in by_name["lastmile-4g"], links
    units = {u["Id"]: u for u in links["units"]}
    assert units["lastmile-network.service"]["Result"] == "success", units
    assert units["NetworkManager.service"]["ActiveState"] == "active", units
    assert units["systemd-networkd.service"]["ActiveState"] == "inactive", units  # one owner of the links
