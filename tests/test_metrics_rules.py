"""The county's Prometheus files in docs/prometheus: promtool checks them and runs the rules' unit
tests, a changed threshold makes those tests fail, and every series the rules and their tests
name is one the exporter really emits."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from lastmile.services import metrics_sources as sources
from lastmile.services.metrics import SERVICES, GatewayCollector
from tests.conftest import REPO, require_tool
from tests.metrics_harness import config_at, make_report_store, queue_ecgs, write_config

DOCS = REPO / "docs/prometheus"
RULES = DOCS / "lastmile-alerts.yml"
RULE_TESTS = DOCS / "lastmile-alerts.test.yml"


def promtool(*args: str, cwd: Path = DOCS) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def alert_names(text: str) -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)", text, re.M)


def test_rules_and_the_example_configuration_pass_promtool_check() -> None:
    rules = promtool("check", "rules", RULES.name)
    assert rules.returncode == 0 and "SUCCESS: 15 rules found" in rules.stdout, rules.stdout + rules.stderr
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_the_rules_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_every_alert_is_tested_firing() -> None:
    tested = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels", RULE_TESTS.read_text()))
    assert set(alert_names(RULES.read_text())) == tested


def test_a_changed_threshold_fails_the_rules_tests(tmp_path: Path) -> None:
    """The unit tests are not vacuous: a queue 'stuck' after ten days instead of one is caught."""
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    text = RULES.read_text()
    assert "lastmile_queue_oldest_stuck_seconds > 86400" in text
    (tmp_path / RULES.name).write_text(text.replace("stuck_seconds > 86400", "stuck_seconds > 864000"))
    result = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0 and "alertname: LastmileQueueStuck" in result.stdout + result.stderr


def every_family_name(tmp_path: Path) -> set[str]:
    """The sample names of a scrape of a gateway where every source has something to say: an
    outbox, the report store (issue 14's schema), a GPS anchor, chrony, systemd, the updater."""
    from devices.gps.fix import Fix, FixMode
    from lastmile.services.update import STATE_FILE, UPDATES_DIR, UpdateState
    from lastmile.visits.book import VisitBook

    config = config_at(write_config(tmp_path))
    config.update.enabled = True
    (config.data_dir / UPDATES_DIR).mkdir(parents=True)
    UpdateState(last_poll=1.0, last_result={"outcome": "refused", "at": 1.0}, installed={"version": "0.3.0"}).save(
        config.data_dir / UPDATES_DIR / STATE_FILE
    )
    queue_ecgs(config, good=1)
    make_report_store(config.data_dir).close()
    with VisitBook.open(config.data_dir, gateway_id="gw") as book:
        book.observe_fix(Fix(FixMode.FIX_3D, dt.datetime.now(dt.timezone.utc), latitude=30.0, longitude=120.0))
    chrony = "47505300,GPS,1,1796110871.5,0.000250000,0.0,0.0,0.0,0.0,0.0,0.0,0.0001,16.0,Normal"
    show = "".join(f"Id={unit}\nActiveState=active\nNRestarts=1\nMainPID=1\n\n" for unit in SERVICES)

    def tools(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
        out = {"chronyc": chrony, "systemctl": show}[cmd[0]]
        return subprocess.CompletedProcess(list(cmd), 0, out, "")

    probe = sources.ServiceProbe(SERVICES, run=tools, cgroup_root=tmp_path / "no-cgroups")
    collector = GatewayCollector(config, run=tools, services=probe)
    return {sample.name for family in collector.collect() for sample in family.samples}


def test_the_rules_and_their_tests_name_only_series_the_exporter_emits(tmp_path: Path) -> None:
    emitted = every_family_name(tmp_path)
    named = set(re.findall(r"\blastmile_[a-z_]+", RULES.read_text() + RULE_TESTS.read_text()))
    assert named, "the rules name no lastmile series?"
    assert named <= emitted, sorted(named - emitted)
