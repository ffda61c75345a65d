"""The udev rules: linted by a real `udevadm test`, and one commented rule per supported device.

systemd 252 has no `udevadm verify`; `udevadm test` parses every rules file and prints
"FILE:LINE problem" for each bad line, always exiting 0, so the test reads its output. The rules
go into a tmpfs over /etc/udev/rules.d inside `unshare -m`, so the host's udev is never touched.
Without udevadm on the host (Debian package udev), the Debian rootfs of the nspawn system test
(cached; it has udev) is used through chroot.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.conftest import REPO, missing, require_tool

RULES_DIR = REPO / "systemd" / "udev"
RULES = sorted(RULES_DIR.glob("*.rules"))

DEVICE_RULE = re.compile(r'ATTRS\{idVendor\}=="(?P<vid>[0-9a-f]{4})", ATTRS\{idProduct\}=="(?P<pid>[0-9a-f]{4})"')


def udevadm_test_output(rules: list[Path], tmp_path: Path) -> str:
    """Run `udevadm test` with exactly these rules added; return everything it printed."""
    if os.geteuid() != 0:
        missing("udevadm test in a private mount namespace needs root")
    require_tool("unshare")
    staging = tmp_path / "rules"
    staging.mkdir()
    for r in rules:
        shutil.copy(r, staging / r.name)
    host = shutil.which("udevadm")
    if host:
        script = (
            'mount -t tmpfs tmpfs /etc/udev/rules.d && cp "$1"/* /etc/udev/rules.d/ && '
            "exec udevadm test /sys/class/tty/tty"
        )
        cmd = ["unshare", "-m", "--", "sh", "-c", script, "sh", str(staging)]
    else:
        root = cached_rootfs_with_udev()
        script = (
            'R="$2"; mount --bind /sys "$R/sys" && mount -t proc proc "$R/proc" && '
            'mount -t tmpfs tmpfs "$R/run" && mount -t tmpfs tmpfs "$R/etc/udev/rules.d" && '
            'cp "$1"/* "$R/etc/udev/rules.d/" && exec chroot "$R" udevadm test /sys/class/tty/tty'
        )
        cmd = ["unshare", "-m", "--", "sh", "-c", script, "sh", str(staging), str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return proc.stdout + proc.stderr


def cached_rootfs_with_udev() -> Path:
    """The nspawn system test's Debian tree (it has udev): cached, built on first use (~1-2 min)."""
    from tests.system.rootfs import NSPAWN_PACKAGES, debian_rootfs

    assert "udev" in NSPAWN_PACKAGES
    require_tool("debootstrap")
    return debian_rootfs()


def problems_in(output: str, names: set[str]) -> list[str]:
    return [ln for ln in output.splitlines() if any(re.search(rf"{re.escape(n)}:\d+ ", ln) for n in names)]


def test_there_are_rules() -> None:
    assert RULES, "systemd/udev/*.rules missing"


def test_udevadm_reads_our_rules_without_complaint(tmp_path: Path) -> None:
    output = udevadm_test_output(RULES, tmp_path)
    for r in RULES:
        assert f"Reading rules file: /etc/udev/rules.d/{r.name}" in output, output[-2000:]
    assert problems_in(output, {r.name for r in RULES}) == []


def test_the_lint_catches_a_broken_rule(tmp_path: Path) -> None:
    bad = tmp_path / "src" / "70-lastmile.rules"
    bad.parent.mkdir()
    bad.write_text(RULES[0].read_text().replace('MODE="0660"', 'MODE=="0660"', 1))
    output = udevadm_test_output([bad], tmp_path)
    found = problems_in(output, {bad.name})
    assert found and "Invalid operator for MODE" in found[0]


def device_rules() -> list[tuple[int, str, str]]:
    """(line number, the comment block right above it, the rule) for every device rule."""
    found = []
    for path in RULES:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if DEVICE_RULE.search(line):
                j = i
                while j > 0 and lines[j - 1].startswith("#"):
                    j -= 1
                found.append((i + 1, "\n".join(lines[j:i]), line))
    return found


def test_each_device_rule_is_commented_and_complete() -> None:
    rules = device_rules()
    assert len(rules) >= 8
    seen: set[tuple[str, str]] = set()
    for lineno, comment, rule in rules:
        m = DEVICE_RULE.search(rule)
        assert m
        vid_pid = (m["vid"], m["pid"])
        assert vid_pid not in seen, f"line {lineno}: {vid_pid} has two rules"
        seen.add(vid_pid)
        # The comment right above names the device and its VID:PID.
        assert comment.startswith("# ") and f"{m['vid']}:{m['pid']}" in comment, (lineno, comment)
        assert 'GROUP="dialout"' in rule and 'MODE="0660"' in rule, lineno
        assert re.search(r'SYMLINK\+="lastmile/[a-z0-9-]+(\$env\{ID_PATH_TAG\})?"', rule), lineno
        assert 'TAG+="systemd"' in rule, lineno
        assert 'ENV{ID_MM_DEVICE_IGNORE}="1"' in rule, lineno


def test_the_supported_devices_are_covered() -> None:
    covered = {DEVICE_RULE.search(rule).group("vid", "pid") for _, _, rule in device_rules()}  # type: ignore[union-attr]
    expected = {
        ("0403", "6001"),  # FTDI FT232R
        ("1a86", "7523"),  # CH340
        ("10c4", "ea60"),  # CP210x
        ("067b", "2303"),  # PL2303
        ("2e8a", "000a"),  # RP2040 bridge
        ("1546", "01a7"),
    }  # u-blox 7
    assert expected <= covered
