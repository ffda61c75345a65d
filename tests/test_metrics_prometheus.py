"""A real Prometheus (Debian's package) scrapes a running gateway on loopback, every second, with
the county's alert rules loaded; the test asks Prometheus' own HTTP API what it stored.

The gateway: three ECGs queued through the real intake (one with an electrode off: a "re-record"
verdict, held for the doctor), `lastmile forward` sending to a reading center that refuses this
gateway's AE title (a pynetdicom SCP), and `lastmile metrics` serving it all. The units' cgroups
are a tree the test keeps (`--cgroup-root`, as on a container host): the processes in it are real.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lastmile.demo.loopback import free_port
from tests.conftest import REPO, require_tool
from tests.metrics_harness import config_at, parse_exposition, queue_ecgs, scrape, write_config
from tests.peers import ScriptedStoreSCP, wait_for_port
from tests.service_harness import start, stop
from tests.waiting import wait_for

RULES = REPO / "docs/prometheus/lastmile-alerts.yml"
WAIT_S = 120.0
# what a Prometheus still starting (or not yet scraped) answers: not yet, rather than a failure
SCRAPE_ERRORS = (OSError, ValueError, KeyError)


class Prometheus:
    """Prometheus on 127.0.0.1 with a temporary data directory, scraping every second."""

    def __init__(self, tmp: Path, target: str) -> None:
        self.port = free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        targets = tmp / "gateways.json"
        targets.write_text(json.dumps([{"targets": [target], "labels": {"clinic": "xiaohe-village"}}]))
        # JSON is YAML: the county's file (docs/prometheus/prometheus.yml) with second-scale intervals
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "lastmile", "metrics_path": "/metrics", "file_sd_configs": [{"files": [str(targets)]}]}
            ],
        }
        (tmp / "prometheus.yml").write_text(json.dumps(config))
        self.log = (tmp / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                require_tool("prometheus"),
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(
            lambda: self.get("/-/ready", raw=True),
            WAIT_S,
            what="Prometheus ready",
            interval=0.25,
            tolerate=SCRAPE_ERRORS,
        )

    def get(self, path: str, raw: bool = False, **params: str) -> Any:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}")
        url = f"http://127.0.0.1:{self.port}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
        return body if raw else json.loads(body)["data"]

    def query(self, expr: str) -> dict[str, float]:
        """Instant query: {"label=value,...": value} for each series of the result."""
        result = self.get("/api/v1/query", query=expr)["result"]
        return {
            ",".join(
                f"{k}={v}" for k, v in sorted(r["metric"].items()) if k not in ("__name__", "instance", "job", "clinic")
            ): float(r["value"][1])
            for r in result
        }

    def one(self, expr: str) -> float | None:
        found = self.query(expr)
        assert len(found) <= 1, found
        return next(iter(found.values()), None)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Units:
    """The units' cgroup directories: each holds the pids of its unit's real process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.slice = root / "system.slice"

    def put(self, unit: str, pid: int) -> None:
        group = self.slice / unit
        group.mkdir(parents=True, exist_ok=True)
        (group / "cgroup.procs").write_text(f"{pid}\n")


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[dict[str, Any]]:
    refusing = ScriptedStoreSCP(reject="permanent").start()  # knows no CLINIC01: a configuration fault
    metrics_port = free_port()
    config_path = write_config(tmp_path, reading_center_port=refusing.port, metrics_port=metrics_port)
    metas = queue_ecgs(config_at(config_path), good=2, lead_off=1)
    units = Units(tmp_path / "cgroup")
    procs: list[subprocess.Popen[bytes]] = []
    log = tmp_path / "gateway.log"
    try:
        forward = start(config_path, "forward", log=log)
        procs.append(forward)
        units.put("lastmile-forward.service", forward.pid)
        metrics = start(config_path, "metrics", "--cgroup-root", str(units.root), log=log)
        procs.append(metrics)
        units.put("lastmile-metrics.service", metrics.pid)
        wait_for_port(metrics_port, 60, metrics)
        yield {
            "config": config_path,
            "metas": metas,
            "port": metrics_port,
            "units": units,
            "procs": procs,
            "log": log,
            "refusing": refusing,
        }
    finally:
        for proc in reversed(procs):
            stop(proc)
        refusing.stop()


def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_prometheus_scrapes_the_gateway_and_sees_what_it_holds(gateway: dict[str, Any], tmp_path: Path) -> None:
    target = f"127.0.0.1:{gateway['port']}"
    body = scrape(f"http://{target}/metrics")
    print(f"one scrape: {len(body)} bytes, {len(parse_exposition(body.decode()))} samples")
    prom = Prometheus(tmp_path / "prometheus", target)
    try:
        wait_for(
            lambda: prom.one(f'up{{instance="{target}"}}') == 1,
            WAIT_S,
            what="the target up",
            interval=0.25,
            tolerate=SCRAPE_ERRORS,
        )
        # what the intake queued, as Prometheus stored it
        wait_for(
            lambda: (
                prom.one('lastmile_queue_items{state="queued",kind="dicom"}') == 3
                and prom.one('lastmile_queue_items{state="sending",kind="dicom"}') == 0
            ),
            WAIT_S,
            what="3 queued DICOM items",
            interval=0.25,
            tolerate=SCRAPE_ERRORS,
        )
        assert prom.one('lastmile_queue_held_items{kind="dicom",reason="re-record"}') == 1
        verdicts = [m["quality"]["verdict"] for m in gateway["metas"]]
        assert prom.query("lastmile_ecg_quality_items") == {
            f"verdict={v}": float(verdicts.count(v)) for v in ("acceptable", "warn", "re-record", "unchecked")
        }
        assert prom.one('lastmile_gateway_info{gateway="clinic-xiaohe-01"}') == 1
        # the forward service met a reading center that refuses this gateway
        wait_for(
            lambda: (
                prom.query('lastmile_link_state{destination="dicom"}')
                == {
                    "destination=dicom,state=down": 0.0,
                    "destination=dicom,state=refused": 1.0,
                    "destination=dicom,state=unknown": 0.0,
                    "destination=dicom,state=up": 0.0,
                }
            ),
            WAIT_S,
            what="the link refused",
            interval=0.25,
            tolerate=SCRAPE_ERRORS,
        )
        assert prom.one('lastmile_last_success_timestamp_seconds{destination="dicom"}') is None
        assert prom.one('lastmile_queue_items{state="queued",kind="dicom"}') == 3  # nothing lost or quarantined
        # the alert rules evaluate on the real series: every rule healthy, the refusal pending
        rules = [r for group in prom.get("/api/v1/rules")["groups"] for r in group["rules"]]
        written = RULES.read_text().count("- alert:")  # every rule the county's file has, loaded
        assert len(rules) == written == 16 and all(r["health"] == "ok" for r in rules), [
            r for r in rules if r["health"] != "ok"
        ]
        wait_for(
            lambda: [
                a
                for a in prom.get("/api/v1/alerts")["alerts"]
                if a["labels"]["alertname"] == "LastmileReadingCenterRefusesGateway" and a["state"] == "pending"
            ],
            WAIT_S,
            what="LastmileReadingCenterRefusesGateway pending",
            interval=0.25,
            tolerate=SCRAPE_ERRORS,
        )
        # the disk as statvfs sees it (other tests write meanwhile: within 1 % of the partition)
        st = os.statvfs(config_at(gateway["config"]).data_dir)
        size = st.f_blocks * st.f_frsize
        assert prom.one("lastmile_data_size_bytes") == size
        free = prom.one("lastmile_data_free_bytes")
        assert free is not None and abs(free - st.f_bavail * st.f_frsize) < size / 100
        # the services, from their cgroups and /proc
        forward = gateway["procs"][0]
        rss = wait_for(
            lambda: prom.one('lastmile_service_resident_bytes{service="forward"}'),
            WAIT_S,
            what="forward's RSS",
            interval=0.25,
            tolerate=SCRAPE_ERRORS,
        )
        assert 0.5 < rss / rss_of(forward.pid) < 2.0
        assert prom.query("lastmile_service_up") == {
            "service=acquire": 0.0,
            "service=ble": 0.0,
            "service=console": 0.0,
            "service=forward": 1.0,
            "service=metrics": 1.0,
        }
        first_start = prom.one('lastmile_service_start_time_seconds{service="forward"}')
        assert first_start is not None and abs(first_start - time.time()) < 600

        # forward restarts: no D-Bus here, the start time counts it
        stop(forward)
        again = start(gateway["config"], "forward", log=gateway["log"])
        gateway["procs"][0] = again
        gateway["units"].put("lastmile-forward.service", again.pid)
        wait_for(
            lambda: prom.one('changes(lastmile_service_start_time_seconds{service="forward"}[10m])') == 1,
            WAIT_S,
            what="the restart counted",
            interval=0.25,
            tolerate=SCRAPE_ERRORS,
        )
        assert prom.one('lastmile_service_start_time_seconds{service="forward"}') > first_start
        assert prom.one('lastmile_queue_items{state="queued",kind="dicom"}') == 3
    finally:
        prom.stop()
    assert gateway["refusing"].received_uids() == []  # the refusing peer stored nothing
