"""`lastmile doctor`'s fhir check says what the FHIR forwarder recorded of the county platform (the
source the metrics exporter and the System page read), after real forwarder rounds against a real
FHIR test server: the county's LastmileHealthPlatformDown alert tells them the doctor says which of
"no answer, every record refused, busy 30 minutes" it is, and the doctor asked /metadata only - a
platform answering /metadata and refusing every bundle was OK to it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lastmile.config import Config
from lastmile.doctor import Doctor, Level, render_text
from lastmile.services.link_status import FHIR_STATUS, fhir_platform
from tests.conftest import REPO
from tests.fhir_samples import queue_visits
from tests.fhir_server import FhirTestServer, RefusesVisits
from tests.metrics_harness import busy_after_taking_two, forwarding, not_answering_after_taking_one
from tests.service_harness import doctor
from uploader.fhir_forwarder import forward_fhir_once
from uploader.fhir_link import Said
from uploader.outbox import Outbox

DAY = 86400.0
RULES = REPO / "docs/prometheus/lastmile-alerts.yml"
# what the alert's description says the doctor says, one phrase each
NO_ANSWER = "does not answer"
REFUSES_ALL = "refuses every visit record"
BUSY_LONG = "has been busy (429) for 30 minutes"


def refuses_every_record(config: Config) -> None:
    """It took two visit records, then answered 500 to every bundle, alone or merged."""
    with FhirTestServer() as server, forwarding(config, server.base_url) as (outbox, sender):
        queue_visits(outbox, range(2))
        assert forward_fhir_once(outbox, sender, time.time() - 120).sent == 2
        queue_visits(outbox, range(2, 6), patient_of=lambda n: f"P-{n}")
        server.faults.extend(["500"] * 10)
        assert forward_fhir_once(outbox, sender, time.time()).refused_everything


def busy_for_long(config: Config) -> None:
    """It took two visit records 41 minutes ago, then answered 429 (busy) at every try since."""
    busy_after_taking_two(config, time.time() - 2460, busy_after_s=(60, 1260, 2460))


def busy_a_while(config: Config) -> None:
    """It took two visit records 5 minutes ago, then answered 429 (busy) at every try since."""
    busy_after_taking_two(config, time.time() - 300, busy_after_s=(60, 120, 240))


def not_answering(config: Config) -> None:
    not_answering_after_taking_one(config, time.time() - 600)


@contextmanager
def platform_doctor(tmp_path: Path) -> Iterator[Doctor]:
    """The doctor of a gateway whose county platform answers /metadata 200 (token, TLS, base URL
    all fine) whatever it does with the bundles."""
    with FhirTestServer() as metadata:
        yield doctor(tmp_path, f'[fhir]\nbase_url = "{metadata.base_url}"\ntimeout_s = 5.0\n')


@pytest.mark.parametrize(
    ("rounds", "level", "said"),
    [
        (refuses_every_record, Level.FAIL, REFUSES_ALL),
        (busy_for_long, Level.FAIL, BUSY_LONG),
        (not_answering, Level.FAIL, NO_ANSWER),
        (busy_a_while, Level.WARN, "busy (429)"),
    ],
    ids=["refuses-all", "busy-41-min", "not-answering", "busy-5-min"],
)
def test_the_doctor_says_what_the_forwarder_found_of_the_county_platform(
    tmp_path: Path, rounds: Callable[[Config], None], level: Level, said: str
) -> None:
    with platform_doctor(tmp_path) as d:
        rounds(d.config)
        findings = d.check_fhir()
    text = render_text(findings)
    assert [f.level for f in findings if not f.topic] == [Level.OK], text  # /metadata answers
    said_of_link = [f for f in findings if f.topic == "link"]
    assert len(said_of_link) == 1, text  # what the forwarder found, said
    [finding] = said_of_link
    assert (
        finding.label == "fhir/link"
        and finding.level is level
        and said in finding.message
        and "since" in finding.message
    ), text
    if level is Level.FAIL:
        assert "county IT" in finding.hint or "route" in finding.hint, text


def test_a_county_platform_taking_records_adds_nothing(tmp_path: Path) -> None:
    with platform_doctor(tmp_path) as d:
        with FhirTestServer() as server, forwarding(d.config, server.base_url) as (outbox, sender):
            queue_visits(outbox, range(2))
            assert forward_fhir_once(outbox, sender, time.time()).sent == 2
        findings = d.check_fhir()
    assert [(f.level, f.topic) for f in findings] == [(Level.OK, "")], render_text(findings)


@pytest.mark.parametrize("days", [2, 8], ids=["two-days", "over-a-week"])
def test_a_visit_record_refused_alone_is_said_so_when_the_last_round_tried_it_alone(tmp_path: Path, days: int) -> None:
    """The platform stores every visit record but one, which it answers "500" at every try. Once a
    round tried only that one again, the doctor's queue check (the System page shows it too) said
    "is the link down?" - while the metrics said the link up and the System page's county row
    "refused one record, the others go on": the meter's rule read the round's counts (nothing
    sent, one failed: failing), the others what the forwarder judged (`Said.REFUSED_ONE`).
    Refused so for over a week, it said the FAIL "nothing has gone out for a week" - the others had.
    With anything set aside (quarantined) besides, it said only "items are quarantined": the refused
    record's advice was gone."""
    t0 = time.time() - days * DAY
    d = doctor(tmp_path, now=lambda: t0 + days * DAY)
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        refused, *_, damaged = queue_visits(outbox, range(4), patient_of=lambda n: f"P-{n}", at=t0)
        set_aside = outbox.find(f"fhir:visit:{damaged}")
        assert set_aside is not None
        outbox.quarantine(set_aside.id, "a damaged record", t0 + 10)
    with RefusesVisits(refused) as server, forwarding(d.config, server.base_url) as (outbox, sender):
        assert forward_fhir_once(outbox, sender, t0 + 60).sent == 2
        assert forward_fhir_once(outbox, sender, t0 + 3600).transient == 1  # tried again, alone
        platform = fhir_platform(outbox.status(FHIR_STATUS))
    assert platform.said is Said.REFUSED_ONE and not platform.down(t0 + days * DAY)  # metrics, System page
    [queue] = [f for f in d.check_queue() if f.topic == "link"]
    text = render_text([queue])
    assert queue.advice_key == "refused-alone" and "refuses this one visit record" in queue.hint, text
    assert queue.level is Level.WARN, text  # the link works: not the FAIL of a link down for a week
    [aside] = [f for f in d.check_queue() if f.topic == "set-aside"]  # said too, on its own row
    assert aside.level is Level.WARN and "quarantined" in aside.hint, render_text([aside])


def test_the_alert_says_what_the_doctor_says() -> None:
    """LastmileHealthPlatformDown names the three ways, in the doctor's words (tested above)."""
    rules = " ".join(RULES.read_text().split())
    for phrase in (NO_ANSWER, REFUSES_ALL, BUSY_LONG, "`lastmile doctor` on the gateway says which", "fhir/link"):
        assert phrase in rules, phrase


def test_a_failed_send_no_round_recorded_reads_unknown_to_the_metrics_as_to_the_doctor(tmp_path: Path) -> None:
    """A new gateway: a visit record's send failed once (the power went before the forwarder
    recorded its round), nothing judged the platform yet. The doctor said nothing of the link and
    the System page "nothing sent yet", while lastmile_link_state{destination="fhir"} said "down"
    from the queued record's failure - and the county's LastmileHealthPlatformDown alert sent its
    IT to the doctor, which had nothing to say. Nothing is known yet: "unknown", all three."""
    from lastmile.services.metrics import render_once
    from tests.metrics_harness import parse_exposition, value
    from uploader.outbox import Kind

    now = time.time()
    with platform_doctor(tmp_path) as d:
        with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
            queue_visits(outbox, range(1), at=now - 120)
            [claimed] = outbox.claim(Kind.FHIR_BUNDLE, 1, now - 60)
            outbox.mark_transient_failure(claimed.id, "read timed out", now - 50)
            assert outbox.status(FHIR_STATUS) is None  # no round recorded what the platform said
        findings = d.check_fhir()
    samples = parse_exposition(render_once(d.config))
    states = {s: value(samples, "lastmile_link_state", destination="fhir", state=s) for s in ("up", "down", "unknown")}
    assert [f for f in findings if f.topic == "link"] == [], render_text(findings)  # the doctor: nothing known
    assert states == {"up": 0, "down": 0, "unknown": 1}, states
