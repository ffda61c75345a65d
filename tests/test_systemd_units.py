"""The systemd units: `systemd-analyze verify` silent, security exposure within budget, contract keys.

`systemd-analyze verify` reports unknown keys as warnings with exit 0, so any stderr is a failure.
It also checks that ExecStart exists, so it runs against a scratch root holding the host's unit
tree and a stand-in /opt/lastmile/bin/lastmile (where the image installs the venv).
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lastmile.services.runtime import EXIT_CONFIG
from tests.conftest import REPO, require_tool

UNITS = (
    "lastmile-acquire.service",
    "lastmile-ble.service",
    "lastmile-forward.service",
    "lastmile-console.service",
    "lastmile-metrics.service",
)
# ExecStart's command after the binary, where it is not the unit's name
COMMANDS = {"lastmile-ble.service": ["ble", "run"]}
SYSTEMD = REPO / "systemd"
EXPOSURE_LIMIT = 2.0  # the bound; the goal is 1.5
# A/B cards only (installed with the A/B layout, like lastmile-mark-good.service): the update round
UPDATE_UNITS_DIR = REPO / "image" / "rauc"
UPDATE_UNITS = ("lastmile-update.service", "lastmile-update.timer")
SANDBOXED = {**{name: SYSTEMD / name for name in UNITS}, UPDATE_UNITS[0]: UPDATE_UNITS_DIR / UPDATE_UNITS[0]}


def unit(name: str) -> dict[str, list[str]]:
    """Key -> every value (systemd keys may repeat), over all sections."""
    found: dict[str, list[str]] = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.fixture(scope="module")
def scratch_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("systemd-analyze")
    root = tmp_path_factory.mktemp("root")
    host_units = Path("/usr/lib/systemd/system")
    if not host_units.is_dir():
        from tests.conftest import missing

        missing("no systemd unit tree on this host")
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name in UNITS:
        shutil.copy(SYSTEMD / name, root / "etc/systemd/system" / name)
    for exe in ("opt/lastmile/bin/lastmile", "bin/kill"):
        p = root / exe
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("#!/bin/sh\n")
        p.chmod(0o755)
    return root


def test_units_verify_with_nothing_on_stderr(scratch_root: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "verify", f"--root={scratch_root}", *UNITS], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == "", proc.stderr + proc.stdout


def test_verify_would_catch_a_bad_key(scratch_root: Path, tmp_path: Path) -> None:
    """The check above is not vacuous: an unknown key does reach stderr."""
    bad = scratch_root / "etc/systemd/system/lastmile-bad.service"
    bad.write_text((SYSTEMD / UNITS[1]).read_text().replace("UMask=", "UMaks="))
    try:
        proc = subprocess.run(
            ["systemd-analyze", "verify", f"--root={scratch_root}", bad.name],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        bad.unlink()
    assert "Unknown key 'UMaks'" in proc.stderr


@pytest.mark.parametrize("name", SANDBOXED)
def test_security_exposure_is_within_budget(name: str) -> None:
    require_tool("systemd-analyze")
    proc = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            f"--threshold={int(EXPOSURE_LIMIT * 10)}",
            str(SANDBOXED[name]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    exposure = float(m.group(1))
    print(f"{name}: exposure {exposure}")
    assert proc.returncode == 0 and exposure <= EXPOSURE_LIMIT, proc.stdout


@pytest.mark.parametrize("name", UNITS)
def test_service_contract(name: str) -> None:
    u = unit(name)
    assert u["Type"] == ["notify"] and u["NotifyAccess"] == ["main"]
    assert u["Restart"] == ["on-failure"]
    assert u["RestartPreventExitStatus"] == [str(EXIT_CONFIG)]  # a refused config is not retried
    assert u["User"] == ["lastmile"] and u["StateDirectory"] == ["lastmile"]
    assert u["ConfigurationDirectory"] == ["lastmile"]
    assert int(u["WatchdogSec"][0]) >= 10
    assert u["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # SIGHUP reloads the configuration
    assert u["StartLimitIntervalSec"] == ["0"]  # never give up restarting
    command = u["ExecStart"][0].split()
    assert command[0] == "/opt/lastmile/bin/lastmile"
    assert command[1:] == service_command(name)
    assert "PYTHONUNBUFFERED=1" in u["Environment"][0]  # journald sees lines as they happen


def service_command(name: str) -> list[str]:
    return COMMANDS.get(name, [name.removeprefix("lastmile-").removesuffix(".service")])


def test_the_acquire_unit_keeps_serial_ports_and_nothing_else() -> None:
    u = unit("lastmile-acquire.service")
    assert u["DevicePolicy"] == ["closed"]
    assert sorted(u["DeviceAllow"]) == ["char-ttyACM rw", "char-ttyUSB rw"]
    assert u["SupplementaryGroups"] == ["dialout"]  # BlueZ is lastmile-ble's
    assert u["InaccessiblePaths"] == ["-/run/dbus"]  # nor can it reach BlueZ through the account's groups
    # Acquire never talks to the WAN.
    assert u["IPAddressDeny"] == ["any"]
    forward = unit("lastmile-forward.service")
    assert forward["PrivateDevices"] == ["yes"] and "AF_NETLINK" not in forward["RestrictAddressFamilies"][0]


def test_the_ble_unit_reaches_bluez_over_the_system_bus_and_nothing_else() -> None:
    """Least privilege of the BLE split: the bluetooth group and D-Bus (AF_UNIX), no device node
    (so no serial port, whatever the account's groups), no IP address family at all."""
    u = unit("lastmile-ble.service")
    assert u["SupplementaryGroups"] == ["bluetooth"]
    assert u["PrivateDevices"] == ["yes"] and "DeviceAllow" not in u
    assert u["RestrictAddressFamilies"] == ["AF_UNIX"] and u["IPAddressDeny"] == ["any"]
    assert "bluetooth.target" in u["Wants"][0] and "bluetooth.target" in u["After"][0]
    assert "MALLOC_ARENA_MAX=2" in u["Environment"][0]
    acquire = unit("lastmile-acquire.service")
    assert u["WatchdogSec"] == acquire["WatchdogSec"]  # parts.STALE_S (20 s) < WatchdogSec: the same part
    assert "bluetooth.target" not in acquire["After"][0] and "Wants" not in acquire


def test_the_console_unit_reaches_the_lan_and_nothing_else() -> None:
    u = unit("lastmile-console.service")
    assert u["PrivateDevices"] == ["yes"] and u["IPAddressDeny"] == ["any"]
    allowed = u["IPAddressAllow"][0].split()
    assert "localhost" in allowed and "192.168.0.0/16" in allowed and "any" not in allowed
    assert u["CapabilityBoundingSet"] == [""]  # port 8443: no capability to bind it


@pytest.mark.parametrize("name", UNITS)
def test_each_service_command_exists_in_the_cli(name: str) -> None:
    from lastmile.cli import build_parser

    command = service_command(name)
    parser = build_parser()
    args = parser.parse_args(command)
    assert callable(getattr(args, "func", None)), f"`lastmile {' '.join(command)}` is not a command"
    assert getattr(args, "ble_command", "run") == "run"  # `lastmile ble` alone prints the help


def test_sysusers_creates_the_service_account(tmp_path: Path) -> None:
    require_tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSTEMD / "lastmile.sysusers")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    passwd = (tmp_path / "etc/passwd").read_text()
    groups = {ln.split(":")[0]: ln.split(":")[3].split(",") for ln in (tmp_path / "etc/group").read_text().splitlines()}
    assert re.search(r"^lastmile:x:\d+:\d+:.*:/var/lib/lastmile:/usr/sbin/nologin$", passwd, re.M)
    assert "lastmile" in groups["dialout"] and "lastmile" in groups["bluetooth"]


def test_units_parse_as_ini() -> None:
    """Guards against a stray continuation or section typo that systemd would skip silently."""
    for name in UNITS:
        cp = configparser.ConfigParser(strict=False, interpolation=None)
        cp.optionxform = str  # type: ignore[assignment]
        cp.read_string((SYSTEMD / name).read_text())
        assert cp.sections() == ["Unit", "Service", "Install"]
        assert cp["Install"]["WantedBy"] == "multi-user.target"


# -- the units (image/rauc/: installed with the A/B layout, like lastmile-mark-good) --------------------


def test_the_update_units_verify(scratch_root: Path) -> None:
    for name in UPDATE_UNITS:
        shutil.copy(UPDATE_UNITS_DIR / name, scratch_root / "etc/systemd/system" / name)
    proc = subprocess.run(
        ["systemd-analyze", "verify", f"--root={scratch_root}", *UPDATE_UNITS],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == "", proc.stderr + proc.stdout
    text = (UPDATE_UNITS_DIR / UPDATE_UNITS[0]).read_text()
    assert [line for line in text.splitlines() if line.startswith("ExecStart=")] == [
        "ExecStart=/opt/lastmile/bin/lastmile update poll"
    ]
    from lastmile.cli import build_parser

    assert build_parser().parse_args(["update", "poll"]).func
