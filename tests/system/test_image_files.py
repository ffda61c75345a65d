"""The image's own units and boot scripts (image/files), checked without building the image.

The whole-machine boot (test_image_boot.py, slow) is what proves them; this catches a typo in
seconds: `systemd-analyze verify` silent on the image's units, the shell scripts parse under
dash (the initramfs runs klibc's sh, a dash descendant: no bashisms), and the overlay script
calls no command beyond those build.sh checks the initramfs for.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, require_tool

FILES = REPO / "image" / "files"
IMAGE_UNITS = ("lastmile-provision.service", "lastmile-root-check.service")
SCRIPTS = ("overlay-root", "lastmile-provision", "lastmile-root-check")
# What the initramfs has besides shell builtins (klibc-utils, kmod); build.sh asks the built
# initramfs's own shell for each of these.
INITRAMFS_COMMANDS = {"mount", "umount", "mkdir", "modprobe"}
# dash builtins and keywords the overlay script may use, and initramfs-tools' /scripts/functions.
SHELL_WORDS = {"case", "esac", "in", "for", "do", "done", "if", "then", "else", "fi", "while", "read", "echo",
               "exit", "prereqs", "[", "]", ".", "||", "&&", "!", "return", "local"}
FUNCTIONS = {"log_failure_msg", "log_success_msg", "log_warning_msg", "loud", "boot_writable"}


def test_image_units_verify_with_nothing_on_stderr(tmp_path: Path) -> None:
    require_tool("systemd-analyze")
    host_units = Path("/usr/lib/systemd/system")
    if not host_units.is_dir():
        pytest.skip("no systemd unit tree on this host")
    (tmp_path / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree(host_units, tmp_path / "usr/lib/systemd/system", symlinks=True)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    (tmp_path / "usr/local/sbin").mkdir(parents=True)
    for name in IMAGE_UNITS:
        shutil.copy(FILES / name, tmp_path / "etc/systemd/system" / name)
    for name in ("lastmile-provision", "lastmile-root-check"):
        shutil.copy(FILES / name, tmp_path / "usr/local/sbin" / name)
        (tmp_path / "usr/local/sbin" / name).chmod(0o755)  # as build.sh installs them
    proc = subprocess.run(["systemd-analyze", "verify", f"--root={tmp_path}", *IMAGE_UNITS],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == "", proc.stderr + proc.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_parse_under_dash(name: str) -> None:
    dash = require_tool("dash")
    proc = subprocess.run([dash, "-n", str(FILES / name)], capture_output=True, text=True)
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
    assert INITRAMFS_COMMANDS <= used | {"umount"}


def test_the_command_check_would_catch_grep() -> None:
    """The check above is not vacuous: the grep that broke the first image is caught."""
    broken = (FILES / "overlay-root").read_text() + "\ngrep -qw overlay /proc/filesystems || exit 0\n"
    assert "grep" in commands_of(broken) - INITRAMFS_COMMANDS - SHELL_WORDS - FUNCTIONS
