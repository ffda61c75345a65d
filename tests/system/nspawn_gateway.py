"""Lastmile in a booted Debian container under a real systemd 252, as the nspawn system tests set it up:
the gateway's configuration and units as the image installs them, a stand-in reading center (a
pynetdicom storage SCP inside the container), and studies queued as the service user."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import REPO, in_private_netns, missing, require_tool, shared_file
from tests.system import assets
from tests.system.container import Container
from tests.system.rootfs import NSPAWN_PACKAGES, debian_rootfs

ITEMS = 30
SCP_PORT = 11104

CONFIG = f"""\
[gateway]
id = "nspawn-test"
[reading_center]
host = "127.0.0.1"
port = {SCP_PORT}
called_ae = "TESTPACS"
storage_commitment = false
no_commitment_policy = "keep"
timeout_s = 2.0
[outbox]
backoff_base_s = 1.0
backoff_max_s = 2.0
min_free_mb = 10
[ble]
enabled = false  # no Bluetooth in a container: lastmile-ble stays up, idle, and says so
"""

SERVICES = ("lastmile-acquire.service", "lastmile-ble.service", "lastmile-forward.service")

# Short watchdog for the test: the SIGSTOP case would otherwise take WatchdogSec=60.
FORWARD_DROPIN = "[Service]\nWatchdogSec=4\nRestartSec=1\nTimeoutAbortSec=3\n"

# lastmile-mark-good in a container: no reboot on failure (FailureAction), the slot from a file
# (the container's kernel command line is the host's), stand-ins for rauc and fw_printenv first in
# PATH, a short deadline for the unhealthy case, and RemainAfterExit so that its end state stays to be
# read (an inactive unit nothing refers to is unloaded, its result with it).
MARK_GOOD_DEADLINE_S = 20
MARK_GOOD_DROPIN = f"""\
[Unit]
ConditionKernelCommandLine=
FailureAction=none
[Service]
Environment=LASTMILE_CMDLINE=/etc/test-cmdline LASTMILE_GOOD_WITHIN_S={MARK_GOOD_DEADLINE_S}
Environment=PATH=/usr/local/lib/test-bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RemainAfterExit=yes
"""
REFUSED_CONFIG = CONFIG + "[outbox\n"  # a TOML syntax error: every service exits 78

# The reading center stand-in: a storage SCP that notes every SOP Instance UID it keeps, taking
# STORE_S over each (argv[1]): a county PACS's storing time. Given HOLD_AFTER (argv[2]) it keeps that
# many objects, then holds every further C-STORE unanswered until RELEASE_SCP exists: a forwarder
# restarted before then is restarted mid-send on any machine, however loaded (a store held for a
# sender that went away is kept on release, as its object had arrived whole: sent again, noted again).
STORE_S = 0.3
HOLD_AFTER = 3
RELEASE_SCP = "/var/lib/test-scp/release"
SCP_RECEIVED = "/var/lib/test-scp/received.txt"  # the SOP Instance UIDs it kept, one a line
SCP = """\
import os, sys, threading, time
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
out = %r
store_s = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
hold_after = int(sys.argv[2]) if len(sys.argv) > 2 else None
arrived, lock = [0], threading.Lock()
os.makedirs(os.path.dirname(out), exist_ok=True)
def hold():
    with lock:
        arrived[0] += 1
        if hold_after is None or arrived[0] <= hold_after:
            return
    while not os.path.exists(%r):
        time.sleep(0.05)
def on_store(event):
    hold()
    time.sleep(store_s)
    with open(out, "a") as f:
        f.write(str(event.request.AffectedSOPInstanceUID) + "\\n")
        f.flush(); os.fsync(f.fileno())
    return 0x0000
ae = AE(ae_title="TESTPACS")
for cx in AllStoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
ae.add_supported_context(Verification)
ae.start_server(("127.0.0.1", %d), evt_handlers=[(evt.EVT_C_STORE, on_store)])
""" % (SCP_RECEIVED, RELEASE_SCP, SCP_PORT)

# Run as the service user inside: N distinct ECG objects into the outbox (as the acquire side would).
ENQUEUE = """\
import sys
from devices.ecg.formats import decode_ecg
from lastmile.config import load_config
from lastmile.ecg.intake import enqueue_recording
from uploader.outbox import Outbox
config = load_config()
path, n, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3]
recording = decode_ecg(open(path, "rb").read(), path)
with Outbox.open(config.data_dir, min_free_bytes=0) as outbox:
    for i in range(n):
        enqueue_recording(outbox, recording, config, key=f"{prefix}:{i}")
"""

STATE = """\
import json
from lastmile.config import load_config
from uploader.outbox import Outbox
config = load_config()
with Outbox.open(config.data_dir, min_free_bytes=0) as outbox:
    items = outbox.items()
    print(json.dumps({"states": [i.state.value for i in items],
                      "uids": [(i.meta or {}).get("sop_instance_uid") for i in items]}))
"""


@contextlib.contextmanager
def booted_container(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    prepare: Callable[[Container], None],
    timings: dict[str, float],
) -> Iterator[Container]:
    """A booted container of the cached rootfs with Lastmile's wheels at hand, `prepare`d (installs
    Lastmile and what the test adds) before its boot; powered off and unmounted after."""
    if os.geteuid() != 0:
        missing("systemd-nspawn -b needs root")
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        require_tool(tool)
    began = time.monotonic()
    if not in_private_netns():
        assets.fetch()  # the network is at hand (pytest run directly): fetch now, cheap when warm
    if not assets.rootfs_cached():
        missing(
            "the nspawn rootfs was not fetched before the private network namespace: "
            "run scripts/fetch-test-assets (scripts/test.sh does)"
        )
    lower = debian_rootfs(NSPAWN_PACKAGES, assets.ARCH)
    timings["rootfs"] = time.monotonic() - began

    work = tmp_path_factory.mktemp(name)
    wheels = work / "wheels"
    t = time.monotonic()
    # Offline: the dependency wheels and our wheel's build requirements come from the caches.
    built = subprocess.run(
        [sys.executable, str(assets.WHEELHOUSE_SCRIPT), "--arch", assets.ARCH, str(wheels)],
        capture_output=True,
        text=True,
        env=assets.offline_pip_env(),
    )
    assert built.returncode == 0, (
        "the wheelhouse cannot be built from the caches (were the assets fetched? "
        f"scripts/fetch-test-assets):\n{built.stdout[-1500:]}{built.stderr[-1500:]}"
    )
    timings["wheelhouse"] = time.monotonic() - t

    c = Container(lower, work / "c")
    c.mount()
    try:
        t = time.monotonic()
        shutil.copytree(wheels, c.root / "var/tmp/lastmile-wheels")
        prepare(c)
        timings["install"] = time.monotonic() - t
        timings["boot"] = c.boot()
        yield c
    finally:
        c.poweroff()
        c.unmount()


def install_lastmile(c: Container) -> None:
    """What image/build.sh does to the root filesystem, minus the Pi-specific parts."""
    r = c.run_offline(
        "/bin/sh",
        "-c",
        "python3 -m venv /opt/lastmile && "
        "/opt/lastmile/bin/pip install -q --no-index --no-compile --find-links /var/tmp/lastmile-wheels lastmile && "
        "rm -rf /var/tmp/lastmile-wheels",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for unit in SERVICES:
        shutil.copy(REPO / "systemd" / unit, c.root / "etc/systemd/system" / unit)
        wants = c.root / "etc/systemd/system/multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / unit).symlink_to(f"/etc/systemd/system/{unit}")
    shutil.copy(REPO / "systemd/lastmile.sysusers", c.root / "usr/lib/sysusers.d/lastmile.conf")
    for rules in (REPO / "systemd/udev").glob("*.rules"):
        shutil.copy(rules, c.root / "usr/lib/udev/rules.d" / rules.name)
    c.write("/etc/lastmile/lastmile.toml", CONFIG)
    c.write("/etc/systemd/system/lastmile-forward.service.d/test.conf", FORWARD_DROPIN)
    c.write("/usr/local/lib/test-scp.py", SCP)
    c.write("/usr/local/lib/enqueue.py", ENQUEUE)
    c.write("/usr/local/lib/state.py", STATE)
    shutil.copy(shared_file("ecg", "scp", "ecgtoolkit_Example.scp"), c.root / "usr/local/lib/example.scp")
    # lastmile-mark-good as the A/B image installs it (not enabled: the tests start it), with RAUC's
    # system.conf (it reads boot-attempts-primary there); the rest is the test's (MARK_GOOD_DROPIN).
    shutil.copy(REPO / "image/rauc/lastmile-mark-good", c.root / "usr/local/sbin/lastmile-mark-good")
    shutil.copy(REPO / "image/rauc/lastmile-mark-good.service", c.root / "etc/systemd/system")
    c.write("/etc/rauc/system.conf", (REPO / "image/rauc/system.conf").read_text())
    c.write("/etc/systemd/system/lastmile-mark-good.service.d/test.conf", MARK_GOOD_DROPIN)
    c.write("/etc/test-cmdline", "console=ttyAMA0 root=PARTUUID=4c4d4731-02 rauc.slot=A ro\n")
    c.write("/usr/local/lib/test-bin/rauc", '#!/bin/sh\necho "$*" >> /var/lib/test-rauc.log\n', mode=0o755)
    c.write(
        "/usr/local/lib/test-bin/fw_printenv", '#!/bin/sh\n[ "$1" = -n ] && shift\ncat "/etc/test-env/$1"\n', mode=0o755
    )


def active_running(c: Container, unit: str) -> dict[str, str] | None:
    props = c.show(unit, "ActiveState", "SubState", "MainPID", "NRestarts", "StatusText", "User")
    return props if (props["ActiveState"], props["SubState"]) == ("active", "running") else None


def outbox_state(c: Container) -> dict:
    r = c.exec("runuser", "-u", "lastmile", "--", "/opt/lastmile/bin/python", "/usr/local/lib/state.py")
    return json.loads(r.stdout)


def enqueue(c: Container, prefix: str, n: int = ITEMS) -> None:
    """`n` distinct ECG studies into the outbox, keyed `prefix:i`, as the service user."""
    c.exec(
        "runuser",
        "-u",
        "lastmile",
        "--",
        "/opt/lastmile/bin/python",
        "/usr/local/lib/enqueue.py",
        "/usr/local/lib/example.scp",
        str(n),
        prefix,
        timeout=120,
    )
