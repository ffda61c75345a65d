"""The image's own units and scripts (image/files, image/build.sh), checked without building the image.

The whole-machine boot (test_image_boot.py, slow) is what proves them; this catches a mistake in
seconds, in the normal suite: `systemd-analyze verify` silent on the image's units next to
systemd/'s, every Lastmile unit enabled into multi-user.target with provisioning ordered before
it, the shell scripts parse (the initramfs runs klibc's sh, a dash descendant: no bashisms), the
overlay script calls no command beyond those build.sh checks the initramfs for, and
lastmile-provision run for real (real `install`, real owners and modes) against a scratch tree,
and the boot test's clinic lastmile.toml passes `lastmile config check` (a boot costs minutes).
"""

from __future__ import annotations

import configparser
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO, missing, require_tool
from tests.system.image_configs import CLINIC_CONFIG, NETWORKED_CONFIG

FILES = REPO / "image" / "files"
SYSTEMD = REPO / "systemd"
IMAGE_UNITS = (
    "lastmile-provision.service",
    "lastmile-root-check.service",
    "lastmile-grow-data.service",
    "lastmile-network.service",
    "lastmile-printer.service",
    "lastmile-emergency-reboot.service",
)
# build.sh installs and enables every unit in systemd/ (acquire, ble, forward, console, metrics).
LASTMILE_UNITS = tuple(sorted(p.name for p in SYSTEMD.glob("*.service")))
# build.sh's drop-ins: installed name -> file in image/files
DROP_INS = {"image-start.conf": "lastmile-start.conf", "image-order.conf": "lastmile-after-recording.conf"}
ORDERED_AFTER_RECORDING = ("lastmile-console.service", "lastmile-metrics.service")
# sh; lastmile-grow-data and lastmile-network are python3
SCRIPTS = ("overlay-root", "lastmile-provision", "lastmile-root-check", "lastmile-printer")
# What the initramfs has besides shell builtins (klibc-utils, kmod); build.sh asks the built
# initramfs's own shell for each of these.
INITRAMFS_COMMANDS = {"mount", "umount", "mkdir", "modprobe"}
# dash builtins and keywords the overlay script may use, and initramfs-tools' /scripts/functions.
SHELL_WORDS = {
    "case",
    "esac",
    "in",
    "for",
    "do",
    "done",
    "if",
    "then",
    "else",
    "fi",
    "while",
    "read",
    "echo",
    "exit",
    "prereqs",
    "[",
    "]",
    ".",
    "||",
    "&&",
    "!",
    "return",
    "local",
}
FUNCTIONS = {"log_failure_msg", "log_success_msg", "log_warning_msg", "loud", "boot_writable"}
# The service account inside the provisioning test's mount namespace (not on the host).
LM_UID = 4242
CERT = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ2xpbmljQ0E=\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n"


def unit_values(path: Path, key: str) -> list[str]:
    """Every value of `key` in a unit file (space-separated lists split), over all sections."""
    found: list[str] = []
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key:
            found.extend(value.split())
    return found


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The host's unit tree plus the image's units and scripts where build.sh puts them."""
    require_tool("systemd-analyze")
    host_units = Path("/usr/lib/systemd/system")
    if not host_units.is_dir():
        missing("no systemd unit tree on this host")
    root = tmp_path_factory.mktemp("image-root")
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in (*(FILES / n for n in IMAGE_UNITS), *(SYSTEMD / n for n in LASTMILE_UNITS)):
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    for name, dropin in DROP_INS.items():
        for unit in LASTMILE_UNITS if name == "image-start.conf" else ORDERED_AFTER_RECORDING:
            (root / f"etc/systemd/system/{unit}.d").mkdir(exist_ok=True)
            shutil.copy(FILES / dropin, root / f"etc/systemd/system/{unit}.d" / name)
    (root / "usr/local/sbin").mkdir(parents=True)
    for name in (
        "lastmile-provision",
        "lastmile-root-check",
        "lastmile-grow-data",
        "lastmile-network",
        "lastmile-printer",
    ):
        shutil.copy(FILES / name, root / "usr/local/sbin" / name)
        (root / "usr/local/sbin" / name).chmod(0o755)  # as build.sh installs them
    for exe in ("opt/lastmile/bin/lastmile", "bin/kill", "bin/sh"):  # ExecStart= targets of the units
        (root / exe).parent.mkdir(parents=True, exist_ok=True)
        (root / exe).write_text("#!/bin/sh\n")
        (root / exe).chmod(0o755)
    return root


def test_image_units_verify_with_nothing_on_stderr(image_root: Path) -> None:
    """The image's own units, and systemd/'s with the image's drop-ins."""
    proc = subprocess.run(
        ["systemd-analyze", "verify", f"--root={image_root}", *IMAGE_UNITS, *LASTMILE_UNITS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == "", proc.stderr + proc.stdout


def test_every_lastmile_unit_is_enabled_as_build_sh_does(image_root: Path) -> None:
    """`systemctl enable` as build.sh runs it (offline, --root): a unit without an [Install] section,
    or one wanted by a target the image never reaches, would be installed but never started."""
    require_tool("systemctl")
    assert {"lastmile-acquire.service", "lastmile-forward.service"} <= set(LASTMILE_UNITS)
    assert "$LASTMILE_UNITS" in (REPO / "image" / "build.sh").read_text()  # build.sh enables the same set
    proc = subprocess.run(
        ["systemctl", f"--root={image_root}", "enable", *LASTMILE_UNITS, *IMAGE_UNITS],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    wants = image_root / "etc/systemd/system"
    for name in (*LASTMILE_UNITS, "lastmile-provision.service", "lastmile-network.service", "lastmile-printer.service"):
        assert (wants / "multi-user.target.wants" / name).is_symlink(), name
    assert (wants / "sysinit.target.wants/lastmile-root-check.service").is_symlink()
    assert (wants / "local-fs.target.wants/lastmile-grow-data.service").is_symlink()
    for target in ("emergency.target", "rescue.target"):  # a headless gateway never stays there
        assert (wants / f"{target}.wants/lastmile-emergency-reboot.service").is_symlink(), target


def test_the_card_partitions_get_a_long_device_timeout() -> None:
    """A slow card (a loaded emulator: 90 s was not enough) must not send the boot to emergency mode."""
    lines = [line.split() for line in (FILES / "fstab").read_text().splitlines() if line.startswith("LABEL=")]
    assert {f[0] for f in lines} == {"LABEL=LM-BOOT", "LABEL=LM-DATA"}
    for fields in lines:
        assert "x-systemd.device-timeout=10min" in fields[3].split(","), fields


def test_build_sh_installs_the_drop_ins_the_tests_verify() -> None:
    build = (REPO / "image" / "build.sh").read_text()
    for name, dropin in DROP_INS.items():
        assert re.search(rf'files/{re.escape(dropin)}" "\$ROOT/etc/systemd/system/\$unit\.d/{name}"', build), name
    assert "for unit in lastmile-console.service lastmile-metrics.service; do" in build
    assert unit_values(FILES / "lastmile-start.conf", "TimeoutStartSec") == ["300"]


def test_provisioning_runs_before_every_lastmile_service() -> None:
    """Each service reads /etc/lastmile at start: one started before provisioning runs on defaults."""
    before = set(unit_values(FILES / "lastmile-provision.service", "Before"))
    assert set(LASTMILE_UNITS) <= before, f"lastmile-provision.service is not Before= {set(LASTMILE_UNITS) - before}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_parse_under_dash(name: str) -> None:
    dash = require_tool("dash")
    proc = subprocess.run([dash, "-n", str(FILES / name)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_build_script_parses() -> None:
    proc = subprocess.run(["bash", "-n", str(REPO / "image" / "build.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def commands_of(script: str) -> set[str]:
    """The first word of every simple command (rough, but enough for these scripts' style)."""
    script = "\n".join(re.sub(r"(^|\s)#.*", "", line) for line in script.splitlines())  # comments
    script = script.replace("\\\n", " ")  # continuation lines
    script = re.sub(r'"(?:[^"\\]|\\.)*"' + r"|'[^']*'", "Q", script)  # quoted strings
    found = set()
    for line in script.splitlines():
        for part in re.split(r";|\|\||&&|\||\bthen\b|\bdo\b|\belse\b|[{}()`]|\$\(", line):
            words = part.split()
            while words and re.match(r"[A-Za-z_]\w*=", words[0]):
                words = words[1:]  # VAR=value prefixes
            if words and re.fullmatch(r"[A-Za-z_][\w.-]*|\[|\.", words[0]):
                found.add(words[0])
    return found


def test_overlay_script_uses_only_what_the_initramfs_has() -> None:
    used = commands_of((FILES / "overlay-root").read_text())
    unknown = used - INITRAMFS_COMMANDS - SHELL_WORDS - FUNCTIONS
    assert unknown == set(), f"overlay-root calls {unknown}: not in the initramfs (no busybox there)"
    assert used | {"umount"} >= INITRAMFS_COMMANDS


def test_the_command_check_would_catch_grep() -> None:
    """The check above is not vacuous: the grep that broke the first image is caught."""
    broken = (FILES / "overlay-root").read_text() + "\ngrep -qw overlay /proc/filesystems || exit 0\n"
    assert "grep" in commands_of(broken) - INITRAMFS_COMMANDS - SHELL_WORDS - FUNCTIONS


def provision(tree: Path, tmp_path: Path, check_exit: int = 0) -> subprocess.CompletedProcess[str]:
    """Run image/files/lastmile-provision against `tree` (LASTMILE_PROVISION_ROOT) as root, in a
    private mount namespace whose /etc/passwd and /etc/group have the image's `lastmile` account,
    so `install -o lastmile` resolves and chowns for real. The stand-in `lastmile` records its
    arguments and what certs/ held when it ran, and exits with `check_exit`."""
    if os.geteuid() != 0:
        missing("provisioning installs files as root:lastmile: run as root (scripts/test.sh does)")
    require_tool("unshare")
    passwd, group = tmp_path / "passwd", tmp_path / "group"
    passwd.write_text(Path("/etc/passwd").read_text() + f"lastmile:x:{LM_UID}:{LM_UID}::/nonexistent:/bin/false\n")
    group.write_text(Path("/etc/group").read_text() + f"lastmile:x:{LM_UID}:\n")
    stand_in = tree / "opt/lastmile/bin/lastmile"
    stand_in.parent.mkdir(parents=True, exist_ok=True)
    stand_in.write_text(
        f'#!/bin/sh\necho "$*" > "{tmp_path}/lastmile.args"\nls "$(dirname "$2")/certs" > "{tmp_path}/certs.seen"\n'
        f"exit {check_exit}\n"
    )
    stand_in.chmod(0o755)
    script = (
        f"mount --bind {passwd} /etc/passwd && mount --bind {group} /etc/group && "
        f'LASTMILE_PROVISION_ROOT="{tree}" exec {FILES / "lastmile-provision"}'
    )
    return subprocess.run(["unshare", "-m", "--", "sh", "-c", script], capture_output=True, text=True, timeout=60)


def mode_owner(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid


def test_provisioning_installs_the_clinic_files_with_their_owners_and_modes(tmp_path: Path) -> None:
    tree = tmp_path / "root"
    source = tree / "boot/firmware/lastmile"
    (source / "certs/notes").mkdir(parents=True)  # a folder among the certificates: skipped
    (source / "lastmile.toml").write_text('[gateway]\nid = "clinic-7"\n')
    certs = {
        "pacs-ca.pem": CERT,  # a certificate and nothing else: public
        "chain.crt": CERT + CERT,
        "gateway.pem": CERT + KEY,  # a key bundled with its certificate, named like a certificate
        "client.key": KEY,
        "fhir-token": "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0.sig\n",
        "odd.pem": CERT + "Proc-Type: 4,ENCRYPTED\n",  # not purely a certificate: kept private
    }
    for name, text in certs.items():
        (source / "certs" / name).write_text(text)
        (source / "certs" / name).chmod(0o755)  # FAT shows everything 0755: modes come from the script
    proc = provision(tree, tmp_path)
    assert proc.returncode == 0, proc.stderr
    etc = tree / "etc/lastmile"
    assert mode_owner(etc) == ("0o755", 0, 0)  # the units' ConfigurationDirectory= mode
    assert mode_owner(etc / "certs") == ("0o750", 0, LM_UID)
    assert mode_owner(etc / "lastmile.toml") == ("0o640", 0, LM_UID)
    assert (etc / "lastmile.toml").read_text() == (source / "lastmile.toml").read_text()
    public = {"pacs-ca.pem", "chain.crt"}
    assert {p.name for p in (etc / "certs").iterdir()} == set(certs)
    for name, text in certs.items():
        assert (etc / "certs" / name).read_text() == text
        expected = ("0o644", 0, 0) if name in public else ("0o600", LM_UID, LM_UID)
        assert mode_owner(etc / "certs" / name) == expected, name
    # The configuration was checked, after the certificates it names were in place.
    assert (tmp_path / "lastmile.args").read_text().split() == ["-c", str(etc / "lastmile.toml"), "config", "check"]
    assert set((tmp_path / "certs.seen").read_text().split()) == set(certs)
    assert f"provisioned {etc}" in proc.stdout


def test_a_refused_configuration_is_installed_and_said(tmp_path: Path) -> None:
    """The services then refuse to start with the reason; provisioning itself does not fail the boot."""
    tree = tmp_path / "root"
    (tree / "boot/firmware/lastmile").mkdir(parents=True)
    (tree / "boot/firmware/lastmile/lastmile.toml").write_text("[gateway\n")
    proc = provision(tree, tmp_path, check_exit=78)
    assert proc.returncode == 0, proc.stderr
    assert "lastmile.toml refused" in proc.stderr
    assert (tree / "etc/lastmile/lastmile.toml").read_text() == "[gateway\n"


def test_no_configuration_on_the_card_leaves_the_defaults(tmp_path: Path) -> None:
    tree = tmp_path / "root"
    (tree / "boot/firmware/lastmile").mkdir(parents=True)
    proc = provision(tree, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (tree / "etc/lastmile/lastmile.toml").exists()
    assert not (tmp_path / "lastmile.args").exists()  # nothing to check
    assert mode_owner(tree / "etc/lastmile/certs") == ("0o750", 0, LM_UID)


def test_the_boot_tests_clinic_configurations_are_accepted(tmp_path: Path) -> None:
    """A refused file stops every service at boot: learn it here, not after minutes of emulation."""
    lastmile = Path(sys.executable).with_name("lastmile")
    config = tmp_path / "lastmile.toml"
    for text in (CLINIC_CONFIG, NETWORKED_CONFIG):
        config.write_text(text)
        proc = subprocess.run([str(lastmile), "-c", str(config), "config", "check"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    refused = config.with_name("refused.toml")
    refused.write_text(CLINIC_CONFIG.replace('id = "boot-test-gw"', 'id = "boot-test-gateway"'))  # 17 bytes
    proc = subprocess.run([str(lastmile), "-c", str(refused), "config", "check"], capture_output=True, text=True)
    assert proc.returncode == 78 and "StationName" in proc.stderr, proc.stderr


def grow_module() -> ModuleType:
    """image/files/lastmile-grow-data (a script without .py: the image installs it as a command)."""
    loader = importlib.machinery.SourceFileLoader("lastmile_grow_data", str(FILES / "lastmile-grow-data"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


DATA_START_MIB = 25  # after p1 boot (8 MiB here), p2 slot A and p3 slot B (8 MiB each)


def card_image(path: Path, card_bytes: int, data_mb: int = 8) -> None:
    """build.sh's partition table (FAT boot, root slots A and B, data last; 1 MiB aligned) on a small
    image file, then the file made as big as the card (sparse)."""
    mib = 2048
    path.write_bytes(b"")
    os.truncate(path, (1 + 8 + 8 + 8 + data_mb + 1) * 2**20)
    table = (
        "label: dos\n"
        "label-id: 0x4c4d4731\n"
        f"start={mib}, size={8 * mib}, type=c, bootable\n"
        f"start={9 * mib}, size={8 * mib}, type=83\n"
        f"start={17 * mib}, size={8 * mib}, type=83\n"
        f"start={DATA_START_MIB * mib}, size={data_mb * mib}, type=83\n"
    )
    subprocess.run(["sfdisk", "--quiet", str(path)], input=table, text=True, check=True)
    os.truncate(path, card_bytes)


def sfdisk_partitions(path: Path) -> list[dict[str, object]]:
    out = subprocess.run(["sfdisk", "--json", str(path)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["partitiontable"]["partitions"]


@pytest.mark.parametrize("card_gb", [8, 16, 32])
def test_the_data_partition_grows_to_the_end_of_a_card(tmp_path: Path, card_gb: int) -> None:
    """The new table, read back by sfdisk (not by our code): the data partition ends at the card's
    last whole MiB, the boot partition and both root slots are untouched, and a second run changes
    nothing."""
    require_tool("sfdisk")
    grow = grow_module()
    card = tmp_path / "card.img"
    card_bytes = card_gb * 10**9  # cards are sold in decimal GB
    card_image(card, card_bytes)
    before = sfdisk_partitions(card)
    with card.open("r+b") as f:
        grown = grow.grown_mbr(f.read(512), 4, card_bytes // 512)
        assert grown is not None
        f.seek(0)
        f.write(grown)
    after = sfdisk_partitions(card)
    assert after[:3] == before[:3]
    assert after[3]["start"] == before[3]["start"] and after[3]["type"] == "83"
    assert after[3]["start"] + after[3]["size"] == card_bytes // 2**20 * 2048
    assert grow.grown_mbr(grown, 4, card_bytes // 512) is None  # idempotent: every boot runs it


def test_growing_refuses_what_build_sh_did_not_make(tmp_path: Path) -> None:
    require_tool("sfdisk")
    grow = grow_module()
    card = tmp_path / "card.img"
    card_image(card, 8 * 10**9)
    with card.open("rb") as f:
        sector0 = f.read(512)
    for slot in (2, 3):  # root slots A and B: the data partition follows them
        with pytest.raises(grow.NotGrowable, match="not the last"):
            grow.grown_mbr(sector0, slot, 8 * 10**9 // 512)
    with pytest.raises(grow.NotGrowable, match="not an MBR"):
        grow.grown_mbr(sector0[:510] + b"\0\0", 4, 8 * 10**9 // 512)
    three_partitions = bytearray(sector0)
    three_partitions[446 + 48 : 446 + 64] = bytes(16)
    with pytest.raises(grow.NotGrowable, match="not a data partition"):
        grow.grown_mbr(bytes(three_partitions), 4, 8 * 10**9 // 512)  # empty entry
    # a card the size of the image (the boot test's disk): nothing worth a table write
    assert grow.grown_mbr(sector0, 4, (DATA_START_MIB + 8 + 1) * 2**20 // 512) is None


def test_an_mbr_entry_stops_at_2_tib(tmp_path: Path) -> None:
    require_tool("sfdisk")
    grow = grow_module()
    card = tmp_path / "card.img"
    card_image(card, 64 * 2**20)
    with card.open("rb") as f:
        grown = grow.grown_mbr(f.read(512), 4, 3 * 2**41 // 512)  # a 6 TiB "card"
    assert grown is not None
    size = int.from_bytes(grown[446 + 48 + 12 : 446 + 48 + 16], "little")
    assert size <= 0xFFFFFFFF and (DATA_START_MIB * 2048 + size) % 2048 == 0


# -- time, watchdog, printing (issue 18 item 6, issue 15) --------------------------------------------


def test_chrony_reads_the_gpsd_reference_clocks(tmp_path: Path) -> None:
    """`chronyd -p` (chrony's own parser: print the configuration and exit) over Debian's
    chrony.conf with the image's conf.d file in its confdir: every directive parses, and gpsd's
    shared-memory clocks are there with the options the comment explains."""
    chronyd = shutil.which("chronyd") or "/usr/sbin/chronyd"
    if not Path(chronyd).exists():
        require_tool("chronyd")
    debian_conf = Path("/etc/chrony/chrony.conf")
    if not debian_conf.exists():
        missing("no /etc/chrony/chrony.conf (Debian's chrony package)")
    confdir = tmp_path / "conf.d"
    confdir.mkdir()
    shutil.copy(FILES / "chrony-gps.conf", confdir / "lastmile-gps.conf")
    main = re.sub(r"(?m)^confdir .*$", f"confdir {confdir}", debian_conf.read_text())
    assert f"confdir {confdir}" in main  # Debian's file includes conf.d: the image relies on it
    (tmp_path / "chrony.conf").write_text(main)
    done = subprocess.run(
        [chronyd, "-p", "-f", str(tmp_path / "chrony.conf")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "Fatal" not in done.stderr, done.stderr
    refclocks = [line.split() for line in done.stdout.splitlines() if line.startswith("refclock ")]
    gps = next(r for r in refclocks if r[1:3] == ["SHM", "0"])
    assert gps[gps.index("refid") + 1] == "GPS" and "trust" in gps  # alone with no network: believed
    assert "noselect" not in gps
    pps = next(r for r in refclocks if r[1:3] == ["SHM", "1"])
    assert pps[pps.index("lock") + 1] == "GPS"
    assert any(line.startswith("makestep ") for line in done.stdout.splitlines())  # a Pi boots far off: steps
    # chronyd refuses what it does not know: the check is not vacuous
    (confdir / "lastmile-gps.conf").write_text("refclock SHM 0 refid GPS trusted\n")
    done = subprocess.run(
        [chronyd, "-p", "-f", str(tmp_path / "chrony.conf")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "Invalid refclock option" in done.stderr


def test_one_time_daemon_on_the_image_and_gpsd_feeds_it_without_a_client() -> None:
    """chrony is the time daemon: systemd-timesyncd is not debootstrapped (and build.sh masks it
    should a dependency pull it in); gpsd reads its receiver with no client (-n)."""
    build = (REPO / "image" / "build.sh").read_text()
    base = re.search(r"^PACKAGES=(\S+)", build, re.M)
    assert base is not None
    assert "systemd" in base.group(1).split(",")
    assert "systemd-timesyncd" not in base.group(1).split(","), base.group(1)
    extra = re.search(r'^EXTRA_PACKAGES="([^"]+)"', build, re.M)
    assert extra is not None
    for package in (
        "chrony",
        "cups-daemon",
        "cups-client",
        "cups-filters",
        "fonts-noto-cjk",
        "network-manager",
        "modemmanager",
    ):
        assert package in extra.group(1).split(), package
    assert "in_root systemctl mask systemd-timesyncd.service" in build
    assert re.search(r"systemctl enable [^\n]*\\\n[^\n]*\n[^\n]*chrony\.service", build)
    assert "systemd-timesyncd.service >/dev/null" not in build.split("mask systemd-timesyncd")[0]
    assert 'GPSD_OPTIONS="-n"' in build
    assert "systemctl disable systemd-networkd.service" in build  # NetworkManager owns the links


def test_the_hardware_watchdog_drop_in() -> None:
    """systemd feeds /dev/watchdog0 every RuntimeWatchdogSec/2; the BCM2835's timer counts at most
    about 15.9 s, so a longer value would be clamped or refused by the driver."""
    manager = configparser.RawConfigParser()
    manager.optionxform = str  # type: ignore[assignment,method-assign]
    manager.read_string((FILES / "watchdog.conf").read_text())
    assert manager.sections() == ["Manager"]
    assert manager["Manager"]["RuntimeWatchdogSec"] == "15s"
    assert manager["Manager"]["RebootWatchdogSec"] == "2min"
    assert '"$ROOT/etc/systemd/system.conf.d/lastmile-watchdog.conf"' in (REPO / "image" / "build.sh").read_text()


@pytest.mark.parametrize(
    ("pattern", "family"),
    [
        ("sans-serif:lang=zh-cn", "Noto Sans CJK SC"),
        ("serif:lang=zh-cn", "Noto Serif CJK SC"),
        ("monospace:lang=zh-cn", "Noto Sans Mono CJK SC"),
        # what CUPS's texttopdf asks for its CJK range: a TrueType font, it refuses Noto's CFF .ttc
        ("ARPLUmingCN", "WenQuanYi Micro Hei Mono|TrueType"),
    ],
)
def test_fontconfig_picks_noto_cjk_sc_for_chinese(tmp_path: Path, pattern: str, family: str) -> None:
    """fc-match with the host's fonts (fonts-noto-cjk, as on the image) and the image's rule."""
    fc_match = require_tool("fc-match")
    for font in ("NotoSansCJK-Regular.ttc", "wqy-microhei.ttc"):  # as on the image
        if not list(Path("/usr/share/fonts").rglob(font)):
            missing(f"no {font}: fonts-noto-cjk, fonts-wqy-microhei (scripts/setup.sh --test installs them)")
    conf = tmp_path / "fonts.conf"
    conf.write_text(
        '<?xml version="1.0"?>\n<!DOCTYPE fontconfig SYSTEM "urn:fontconfig:fonts.dtd">\n<fontconfig>\n'
        f"  <include>{FILES / 'fonts-zh-cn.conf'}</include>\n  <include>/etc/fonts/fonts.conf</include>\n"
        f"  <cachedir>{tmp_path / 'cache'}</cachedir>\n</fontconfig>\n"
    )
    done = subprocess.run(
        [fc_match, "-f", "%{family[0]}|%{fontformat}" if "|" in family else "%{family[0]}", pattern],
        env={**os.environ, "FONTCONFIG_FILE": str(conf)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Fontconfig error" not in done.stderr, done.stderr  # the image's file parses
    assert done.stdout == family
