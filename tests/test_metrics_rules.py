"""The county's Prometheus files in docs/prometheus: promtool checks them and runs the rules' unit
tests, a changed threshold makes those tests fail, and every series the rules and their tests
name is one the exporter really emits."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lastmile.config import Config
from lastmile.services import metrics_sources as sources
from lastmile.services.metrics import SERVICES, GatewayCollector, render_once
from tests.conftest import REPO, require_tool
from tests.metrics_harness import (
    busy_after_taking_two,
    config_at,
    make_report_store,
    not_answering_after_taking_one,
    parse_exposition,
    queue_ecgs,
    write_config,
)

DOCS = REPO / "docs/prometheus"
RULES = DOCS / "lastmile-alerts.yml"
RULE_TESTS = DOCS / "lastmile-alerts.test.yml"


def promtool(*args: str, cwd: Path = DOCS) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def alert_names(text: str) -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)", text, re.M)


def test_rules_and_the_example_configuration_pass_promtool_check() -> None:
    rules = promtool("check", "rules", RULES.name)
    assert rules.returncode == 0 and "SUCCESS: 16 rules found" in rules.stdout, rules.stdout + rules.stderr
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


# -- the county platform's link: the rule on what the exporter really says ------------------------

PLATFORM_DOWN = "LastmileHealthPlatformDown"


def fhir_link_series(tmp_path: Path, instance: str, rounds: Callable[[Config], None]) -> list[dict[str, str]]:
    """lastmile_link_state{destination="fhir"} as a gateway's exporter says it after the FHIR
    forwarder's real `rounds`, as promtool input series: each sample held for 40 one-minute scrapes."""
    config = config_at(write_config(tmp_path))
    rounds(config)
    return [
        {
            "series": f'{name}{{instance="{instance}",destination="fhir",state="{labels["state"]}"}}',
            "values": f"{v:g}x40",
        }
        for name, labels, v in parse_exposition(render_once(config))
        if name == "lastmile_link_state" and labels.get("destination") == "fhir"
    ]


def firing_after(tmp_path: Path, series: list[dict[str, str]], minutes: int) -> list[dict[str, str]]:
    """The county platform alerts firing `minutes` into those series, by promtool's own evaluation:
    its test of an expected empty ALERTS fails and prints what it got instead."""
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": f'ALERTS{{alertname="{PLATFORM_DOWN}",alertstate="firing"}}',
                        "eval_time": f"{minutes}m",
                        "exp_samples": [],
                    }
                ],
            }
        ],
    }
    (tmp_path / "platform.test.yml").write_text(json.dumps(test))  # JSON is YAML
    result = promtool("test", "rules", "platform.test.yml", cwd=tmp_path)
    out = result.stdout + result.stderr
    if result.returncode == 0:
        return []
    got = out.partition("got:")[2]
    assert got, out
    return [dict(re.findall(r'(\w+)="([^"]*)"', labels)) for labels in re.findall(r"\{[^}]*\}", got)]


def test_a_county_platform_that_does_not_answer_alerts_the_county(tmp_path: Path) -> None:
    """The exporter said the platform down (nothing listens at its address) and no rule watched it:
    the county learned of it only when a home visit had waited a day (LastmileQueueStuck)."""
    series = fhir_link_series(tmp_path, "gw-down", lambda c: not_answering_after_taking_one(c, time.time() - 60))
    assert not firing_after(tmp_path, series, 5)  # not before its `for:`
    [alert] = firing_after(tmp_path, series, 20)
    assert alert["instance"] == "gw-down" and alert["severity"] == "critical", alert


def test_a_county_platform_busy_five_minutes_does_not_alert(tmp_path: Path) -> None:
    """It took two visit records, then answered 429 (busy) for 5 minutes: it answers, no alert."""
    series = fhir_link_series(
        tmp_path, "gw-busy", lambda c: busy_after_taking_two(c, time.time() - 300, busy_after_s=(60, 120, 240))
    )
    assert series, "the exporter said nothing of the county platform"
    assert not firing_after(tmp_path, series, 30)
