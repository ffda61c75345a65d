"""The image's links (issue 18 item 7), checked without hardware and without building the image.

image/files/lastmile-network turns the boot partition's lastmile/network.toml into NetworkManager
keyfiles at each boot; the gateway's NetworkManager (1.42, Debian 12) is the one that must read
them. So NetworkManager's own parser judges them here: `nmcli --offline` reads a keyfile on stdin,
verifies the connection as the daemon would (a missing SSID, an SSID over 32 bytes, an APN with a
space: refused) and writes it back normalized. The tests compare that with the keyfile nmcli
itself makes from the same values, so an escaping mistake (a ';' in a Wi-Fi name, a Chinese
name, a backslash in a passphrase) is caught, not only a malformed file. The image's
NetworkManager.conf is read by `NetworkManager --print-config`. The booted image
(test_image_boot.py) shows NetworkManager loading the provisioned connections.
"""

from __future__ import annotations

import configparser
import importlib.machinery
import importlib.util
import os
import shutil
import stat
import subprocess
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO, require_tool

FILES = REPO / "image" / "files"
EXAMPLE = FILES / "network.toml.example"


@cache
def network_module() -> ModuleType:
    """image/files/lastmile-network (no .py: the image installs it as a command)."""
    loader = importlib.machinery.SourceFileLoader("lastmile_network", str(FILES / "lastmile-network"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def nmcli_reads(keyfile: str) -> subprocess.CompletedProcess[str]:
    """NetworkManager's verdict on a keyfile: it read and verified, and its normalized form."""
    nmcli = require_tool("nmcli")
    return subprocess.run(
        [nmcli, "--offline", "connection", "modify", "connection.zone", ""],
        input=keyfile,
        capture_output=True,
        text=True,
        timeout=60,
    )


def nmcli_makes(*settings: str) -> str:
    """The keyfile nmcli itself makes from these settings."""
    nmcli = require_tool("nmcli")
    done = subprocess.run(
        [nmcli, "--offline", "connection", "add", *settings], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def sections(keyfile: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(delimiters=("=",), comment_prefixes=("#",), strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keyfile keys are case-sensitive
    parser.read_string(keyfile)
    return parser


def normalized(keyfile: str) -> configparser.RawConfigParser:
    read = nmcli_reads(keyfile)
    assert read.returncode == 0, f"NetworkManager refused:\n{read.stderr}\n{keyfile}"
    return sections(read.stdout)


def provision(tmp_path: Path, network_toml: str | None) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run the script for real against a scratch tree (LASTMILE_PROVISION_ROOT)."""
    root = tmp_path / "root"
    (root / "boot/firmware/lastmile").mkdir(parents=True, exist_ok=True)
    if network_toml is not None:
        (root / "boot/firmware/lastmile/network.toml").write_text(network_toml)
    proc = subprocess.run(
        ["python3", str(FILES / "lastmile-network")],
        env={**os.environ, "LASTMILE_PROVISION_ROOT": str(root)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc, root / "etc/NetworkManager/system-connections"


def test_the_documented_example_makes_connections_networkmanager_accepts(tmp_path: Path) -> None:
    proc, connections = provision(tmp_path, EXAMPLE.read_text())
    assert proc.returncode == 0, proc.stderr
    made = {p.name: p for p in connections.iterdir()}
    assert set(made) == {"lastmile-wifi.nmconnection", "lastmile-4g.nmconnection"}
    for path in made.values():
        # secrets inside: root only, as NetworkManager requires of a keyfile (it ignores others)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    wifi = normalized(made["lastmile-wifi.nmconnection"].read_text())
    assert wifi["connection"]["type"] == "wifi" and wifi["connection"]["autoconnect-retries"] == "0"
    assert wifi["wifi"]["ssid"] == "ClinicWiFi" and wifi["wifi"]["mode"] == "infrastructure"
    assert wifi["wifi-security"]["key-mgmt"] == "wpa-psk" and wifi["wifi-security"]["psk"] == "change-me-8+"
    cellular = normalized(made["lastmile-4g.nmconnection"].read_text())
    assert cellular["connection"]["type"] == "gsm" and cellular["gsm"]["apn"] == "cmnet"
    assert "pin" not in cellular["gsm"]


def test_the_images_ethernet_connection_is_accepted_for_any_wired_port() -> None:
    ethernet = normalized((FILES / "ethernet.nmconnection").read_text())
    assert ethernet["connection"]["type"] == "ethernet"
    assert "interface-name" not in ethernet["connection"]  # the Pi's port, or a USB adapter: any name
    assert ethernet["ipv4"]["method"] == "auto"


@pytest.mark.parametrize(
    ("ssid", "password"),
    [
        ("ClinicWiFi", "plain-pass"),
        ("Clinic; 2.4G", "pa;ss word"),  # ';' is NetworkManager's list separator
        ("卫生室-WiFi", "back\\slash#1"),  # a Chinese name (bytes), a backslash
        (" edge ", " lead and trail "),  # spaces at the ends survive
        ("12345678", "12345678"),  # all digits: not read as a number list
    ],
)
def test_wifi_names_and_passphrases_reach_networkmanager_unchanged(ssid: str, password: str) -> None:
    """Ours, as NetworkManager reads it == the keyfile nmcli makes itself from the same values."""
    ours = network_module().wifi_keyfile({"ssid": ssid, "password": password})
    theirs = nmcli_makes("type", "wifi", "con-name", "x", "ssid", ssid, "wifi-sec.key-mgmt", "wpa-psk")
    theirs_psk = nmcli_makes("type", "wifi", "con-name", "x", "ssid", "x", "wifi-sec.key-mgmt", "wpa-psk",
                             "wifi-sec.psk", password)  # fmt: skip
    assert normalized(ours)["wifi"]["ssid"] == sections(theirs)["wifi"]["ssid"]
    assert normalized(ours)["wifi-security"]["psk"] == sections(theirs_psk)["wifi-security"]["psk"]


def test_an_open_and_a_hidden_network(tmp_path: Path) -> None:
    ours = normalized(network_module().wifi_keyfile({"ssid": "Open", "hidden": True}))
    assert ours["wifi"]["hidden"] == "true" and not ours.has_section("wifi-security")


@pytest.mark.parametrize("apn", ["cmnet", "3gnet", "ctnet", "cmiot.v4", "my_apn-2", "cm net", "cmnet@x", "中国移动"])
def test_the_apn_rule_is_networkmanagers(apn: str) -> None:
    """An APN the script accepts is one NetworkManager accepts, and the other way round."""
    keyfile = f"[connection]\nid=x\ntype=gsm\n\n[gsm]\napn={apn}\n"
    nm_accepts = nmcli_reads(keyfile).returncode == 0
    try:
        network_module().cellular_keyfile({"apn": apn})
        we_accept = True
    except network_module().Refused:
        we_accept = False
    assert we_accept == nm_accepts, (apn, nmcli_reads(keyfile).stderr)


def test_a_sim_pin_and_credentials() -> None:
    made = normalized(
        network_module().cellular_keyfile({"apn": "3gnet", "pin": "1234", "username": "u", "password": "p w"})
    )
    assert (made["gsm"]["apn"], made["gsm"]["pin"], made["gsm"]["username"], made["gsm"]["password"]) == (
        "3gnet",
        "1234",
        "u",
        "p w",
    )


def test_networkmanager_refuses_what_the_script_must_never_write() -> None:
    """The check above is not vacuous: NetworkManager does refuse a broken connection."""
    assert nmcli_reads("[connection]\nid=x\ntype=wifi\n\n[wifi]\nssid=" + "x" * 33 + "\n").returncode != 0
    assert nmcli_reads("[connection]\nid=x\ntype=wifi\n\n[wifi]\nmode=infrastructure\n").returncode != 0
    assert nmcli_reads("[connection]\nid=x\ntype=gsm\n\n[gsm]\napn=cm net\n").returncode != 0


@pytest.mark.parametrize(
    ("network_toml", "reason"),
    [
        ('[wifi]\nssid = "C"\npassword = "short"\n', "8 to 63"),
        ('[wifi]\npassword = "long-enough"\n', "needs ssid"),
        ('[wifi]\nssid = "' + "x" * 33 + '"\n', "1 to 32 bytes"),
        ('[wifi]\nssid = "C"\npasword = "typo-in-key"\n', "unknown keys"),
        ('[cellular]\npin = "1234"\n', "needs apn"),
        ('[cellular]\napn = "cmnet"\npin = "12"\n', "4 to 8 digits"),
        ('[lte]\napn = "cmnet"\n', "unknown sections"),
        ("[wifi\n", "not valid TOML"),
    ],
)
def test_a_wrong_file_is_refused_with_the_reason_and_makes_nothing(
    tmp_path: Path, network_toml: str, reason: str
) -> None:
    proc, connections = provision(tmp_path, network_toml)
    assert proc.returncode == 1 and reason in proc.stderr, proc.stderr
    assert list(connections.iterdir()) == []


def test_a_link_taken_out_of_the_file_is_gone_at_the_next_boot(tmp_path: Path) -> None:
    proc, connections = provision(tmp_path, EXAMPLE.read_text())
    assert proc.returncode == 0 and len(list(connections.iterdir())) == 2
    (connections / "ethernet.nmconnection").write_text("kept")  # the image's own: never touched
    proc, _ = provision(tmp_path, '[cellular]\napn = "ctnet"\n')
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in connections.iterdir()) == ["ethernet.nmconnection", "lastmile-4g.nmconnection"]
    (tmp_path / "root/boot/firmware/lastmile/network.toml").unlink()
    proc, _ = provision(tmp_path, None)
    assert proc.returncode == 0 and "Ethernet only" in proc.stdout
    assert [p.name for p in connections.iterdir()] == ["ethernet.nmconnection"]


def test_networkmanager_reads_the_images_configuration(tmp_path: Path) -> None:
    """`NetworkManager --print-config`: the daemon's own reading of files/NetworkManager.conf."""
    daemon = shutil.which("NetworkManager") or "/usr/sbin/NetworkManager"
    if not Path(daemon).exists():
        require_tool("NetworkManager")
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run(
        [
            daemon,
            "--print-config",
            f"--config={FILES / 'NetworkManager.conf'}",
            f"--config-dir={empty}",
            f"--system-config-dir={empty}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    effective = sections(done.stdout)
    assert effective["main"]["plugins"] == "keyfile" and effective["main"]["no-auto-default"] == "*"
    assert effective["connectivity"]["enabled"] == "false"  # no probe over a metered 4G link
    assert effective["logging"]["level"] == "WARN"
