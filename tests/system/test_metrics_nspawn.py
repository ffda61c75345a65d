"""lastmile-metrics.service under a real systemd 252 (systemd-nspawn -b), hardened as shipped:
it sees the other units' processes, asks systemd for their restarts over D-Bus, reads the outbox.

    scripts/test.sh -m slow tests/system/test_metrics_nspawn.py   (root; about 1 min with a warm cache)

What this found: ProtectProc=invisible hid the other units' processes (each PrivateUsers=yes)
from this one, and a hybrid cgroup host keeps the v2 tree under /sys/fs/cgroup/unified.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.conftest import REPO
from tests.metrics_harness import parse_exposition, value
from tests.system.container import Container
from tests.system.nspawn_gateway import active_running, booted_container, enqueue, install_lastmile

pytestmark = pytest.mark.slow

UNIT = "lastmile-metrics.service"
URL = "http://127.0.0.1:9560/metrics"


def install_with_metrics(c: Container) -> None:
    install_lastmile(c)
    shutil.copy(REPO / "systemd" / UNIT, c.root / "etc/systemd/system" / UNIT)
    (c.root / "etc/systemd/system/multi-user.target.wants" / UNIT).symlink_to(f"/etc/systemd/system/{UNIT}")


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    with booted_container(tmp_path_factory, "nspawn-metrics", install_with_metrics, {}) as c:
        yield c


def scrape(c: Container) -> list[tuple[str, dict[str, str], float]]:
    r = c.exec(
        "/opt/lastmile/bin/python",
        "-c",
        f"import urllib.request; print(urllib.request.urlopen({URL!r}, timeout=20).read().decode())",
    )
    return parse_exposition(r.stdout)


def test_the_metrics_unit_sees_the_services_the_queue_and_a_restart(container: Container) -> None:
    c = container
    for unit in ("lastmile-acquire.service", "lastmile-ble.service", "lastmile-forward.service", UNIT):
        props = c.wait_for(f"{unit} READY", lambda unit=unit: active_running(c, unit), timeout=90)
        assert props["User"] == "lastmile"
    samples = c.wait_for("a scrape", lambda: scrape(c))
    for service in ("acquire", "ble", "forward", "metrics"):  # ble: up and idle, BLE disabled here
        assert value(samples, "lastmile_service_up", service=service) == 1
        rss = value(samples, "lastmile_service_resident_bytes", service=service)
        assert rss is not None and rss > 10 * 2**20, (service, rss)  # /proc of the other units is visible
        assert value(samples, "lastmile_service_restarts_total", service=service) == 0  # systemd answered
    assert value(samples, "lastmile_service_up", service="console") == 0  # not installed here
    assert value(samples, "lastmile_source_up", source="services") == 1

    # ECGs queued while the reading center is down: counted, and the link shown down
    enqueue(c, "metrics", 3)
    c.wait_for(
        "3 ECGs waiting, the link down",
        lambda: (
            (s := scrape(c))
            and sum(value(s, "lastmile_queue_items", kind="dicom", state=st) or 0 for st in ("queued", "sending")) == 3
            and value(s, "lastmile_link_state", destination="dicom", state="down") == 1
        ),
        timeout=60,
    )

    # systemd restarts a killed forward service: its counter and the start time both show it
    before = value(scrape(c), "lastmile_service_start_time_seconds", service="forward")
    old = active_running(c, "lastmile-forward.service")
    assert old is not None
    c.exec("kill", "-KILL", old["MainPID"])
    c.wait_for(
        "forward restarted",
        lambda: (p := active_running(c, "lastmile-forward.service")) and p["MainPID"] != old["MainPID"],
        timeout=60,
    )
    after = c.wait_for(
        "the restart counted",
        lambda: (s := scrape(c)) and value(s, "lastmile_service_restarts_total", service="forward") == 1 and s,
        timeout=30,
    )
    assert value(after, "lastmile_service_start_time_seconds", service="forward") > before
    assert "Traceback" not in c.journal(UNIT)
