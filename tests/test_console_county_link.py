"""The System page's row for the county health platform (FHIR: home visits, readings), said from what
the FHIR forwarder recorded of its last rounds against a real FHIR test server - no network call
from the page. The console ran the doctor offline, so the row was missing: the village doctor saw
how the reading center's link was, never the county platform's."""

from __future__ import annotations

import html
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lastmile.config import Config
from lastmile.data_dir import open_outbox
from lastmile.demo.loopback import free_port
from tests.console_browser import by, log_in, save_screenshot, set_viewport
from tests.console_harness import DOCTOR, Client, console_config, running_console
from tests.fhir_samples import queue_visits
from tests.fhir_server import FhirTestServer, RefusesVisits
from tests.metrics_harness import busy_after_taking_two
from uploader.fhir_forwarder import forward_fhir_once
from uploader.fhir_sender import FhirSender, FhirSenderSettings

ROWS = {
    "zh-CN": re.compile(r"<dt>与县健康平台的连接</dt><dd[^>]*>(.*?)</dd>", re.S),
    "en": re.compile(r"<dt>Link to the county health platform</dt><dd[^>]*>(.*?)</dd>", re.S),
}
PHONE_390 = (390, 844)


@contextmanager
def sender_to(server: FhirTestServer, config: Config) -> Iterator[FhirSender]:
    config.fhir.base_url = server.base_url
    with FhirSender(FhirSenderSettings(base_url=server.base_url)) as sender:
        yield sender


def all_sent(config: Config) -> None:
    with FhirTestServer() as server, sender_to(server, config) as sender, open_outbox(config) as outbox:
        queue_visits(outbox, range(2))
        assert forward_fhir_once(outbox, sender, time.time()).sent == 2


def busy(config: Config) -> None:
    """It took two visit records, then answered the third 429 (busy, Retry-After)."""
    with FhirTestServer() as server, sender_to(server, config) as sender, open_outbox(config) as outbox:
        queue_visits(outbox, range(2))
        assert forward_fhir_once(outbox, sender, time.time() - 1).sent == 2
        queue_visits(outbox, range(2, 3))
        server.faults.append("429")
        assert forward_fhir_once(outbox, sender, time.time()).transient == 1


def refused_one(config: Config) -> None:
    """It stores the others and answers one visit's entries "500", tried again alone an hour on."""
    with open_outbox(config) as outbox:
        ids = queue_visits(outbox, range(3), patient_of=lambda n: f"P-{n}")
    with RefusesVisits(ids[1]) as server, sender_to(server, config) as sender, open_outbox(config) as outbox:
        assert forward_fhir_once(outbox, sender, time.time() - 3600).sent == 2
        assert forward_fhir_once(outbox, sender, time.time()).transient == 1


def not_answering(config: Config) -> None:
    """It took a visit record, then nothing listens at its address."""
    all_sent(config)
    config.fhir.base_url = f"http://127.0.0.1:{free_port()}/fhir"
    settings = FhirSenderSettings(base_url=config.fhir.base_url, connect_timeout_s=2.0)
    with FhirSender(settings) as sender, open_outbox(config) as outbox:
        queue_visits(outbox, range(2, 3))
        assert forward_fhir_once(outbox, sender, time.time()).transient == 1


def busy_for_long(config: Config) -> None:
    """It took two visit records 41 minutes ago, then answered 429 (busy) at every try since."""
    busy_after_taking_two(config, time.time() - 2460, busy_after_s=(60, 1260, 2460))  # each after the backoff
    config.fhir.base_url = "https://fhir.county.example/r4"


def refuses_all(config: Config) -> None:
    """It took two visit records, then answered 500 to every bundle, alone or merged."""
    all_sent(config)
    with FhirTestServer() as server, sender_to(server, config) as sender, open_outbox(config) as outbox:
        queue_visits(outbox, range(2, 6), patient_of=lambda n: f"P-{n}")
        server.faults.extend(["500"] * 10)
        assert forward_fhir_once(outbox, sender, time.time()).refused_everything


def county_row(config: Config, language: str = "zh-CN") -> str | None:
    """The row's text on the System page, as the console serves it; None: no row."""
    with running_console(config) as server:
        client = Client(server.url, language=language)
        client.login(DOCTOR)
        page = client.get("/system").body
    found = ROWS[language].search(page)
    return None if found is None else html.unescape(re.sub(r"<[^>]+>", "", found.group(1)))


@pytest.mark.parametrize(
    ("rounds", "said"),
    [
        (all_sent, "正常，最近发送于"),
        (busy, "平台繁忙，会自动重试"),
        (refused_one, "拒收了一条记录，其他记录照常发送"),
        (not_answering, "无应答"),
    ],
    ids=["sent", "busy", "refused-one", "not-answering"],
)
def test_the_system_page_says_how_the_county_platform_answered(
    tmp_path: Path, rounds: Callable[[Config], None], said: str
) -> None:
    config = console_config(tmp_path / "data")
    rounds(config)
    row = county_row(config)
    assert row is not None, "no row for the county health platform on the System page"
    assert said in row, row
    if rounds is not_answering:
        assert row.startswith("自 ") and row.endswith("起无应答"), row  # since when


def test_the_row_reads_english_too(tmp_path: Path) -> None:
    config = console_config(tmp_path / "data")
    busy(config)
    assert county_row(config, "en") == "busy, will retry by itself"


@pytest.mark.parametrize(
    ("language", "advice"), [("zh-CN", "请告知县信息科"), ("en", "tell the county IT")], ids=["zh-CN", "en"]
)
def test_one_record_refused_says_to_tell_the_county_it(tmp_path: Path, language: str, advice: str) -> None:
    """The row sent the village doctor to "lastmile queue", a command line she does not use."""
    config = console_config(tmp_path / "data")
    refused_one(config)
    row = county_row(config, language)
    assert row is not None and advice in row and "lastmile" not in row, row


@pytest.mark.parametrize(
    ("rounds", "said"),
    [(busy_for_long, "平台繁忙，自 "), (refuses_all, "拒收所有记录，自 ")],
    ids=["busy-41-minutes", "refuses-all"],
)
def test_a_platform_that_takes_nothing_says_since_when_and_to_tell_the_county_it(
    tmp_path: Path, rounds: Callable[[Config], None], said: str
) -> None:
    """Busy 41 minutes the row said "busy, will retry by itself" while the county's metric said
    down; refusing every record it said "will retry by itself" and no more: the doctor waited."""
    config = console_config(tmp_path / "data")
    rounds(config)
    row = county_row(config)
    assert row is not None and row.startswith(said), row
    assert "起未接收任何记录" in row and row.endswith("请告知县信息科") and "自动重试" not in row, row


def test_a_long_busy_platform_reads_english_too(tmp_path: Path) -> None:
    config = console_config(tmp_path / "data")
    busy_for_long(config)
    row = county_row(config, "en")
    assert row is not None and row.startswith("busy, nothing taken since ") and row.endswith("tell the county IT"), row


def test_no_row_when_no_county_platform_is_configured(tmp_path: Path) -> None:
    config = console_config(tmp_path / "data")
    all_sent(config)
    config.fhir.base_url = ""
    assert county_row(config) is None


def test_nothing_sent_yet_before_the_first_round(tmp_path: Path) -> None:
    config = console_config(tmp_path / "data")
    config.fhir.base_url = "https://fhir.county.example/r4"
    assert county_row(config) == "还没有发送过"


def test_the_row_on_a_390_px_phone_in_chinese(browser: object, tmp_path: Path) -> None:
    """Looked at: tmp/console-screenshots/system-county-link-390.png."""
    config = console_config(tmp_path / "data")
    refused_one(config)
    with running_console(config) as server:
        set_viewport(browser, PHONE_390)
        log_in(browser, server)
        browser.get(server.url + "/system")  # type: ignore[attr-defined]
        dd = browser.find_element(by("xpath"), "//dt[.='与县健康平台的连接']/following-sibling::dd[1]")  # type: ignore[attr-defined]
        box = browser.execute_script(  # type: ignore[attr-defined]
            "const r = arguments[0].getBoundingClientRect();"
            " return {left: r.left, right: r.right, width: document.documentElement.clientWidth};",
            dd,
        )
        save_screenshot(browser, "system-county-link-390")
    assert "拒收了一条记录" in dd.text, dd.text
    assert box["left"] >= 0 and box["right"] <= box["width"], f"off the screen: {box}"


def test_every_judgement_of_the_forwarder_has_words_on_the_page() -> None:
    """The row branched on Said's raw strings: a judgement renamed or added read "nothing sent yet"."""
    from lastmile.console.sources import COUNTY_ROW
    from uploader.fhir_link import Said

    assert set(COUNTY_ROW) == {None, *(said.name for said in Said)}


def test_a_refused_gateway_says_to_call_the_county_it(tmp_path: Path) -> None:
    """The platform refuses the gateway's token (401): the row says so, not "working"."""
    config = console_config(tmp_path / "data")
    with FhirTestServer(token="county-token") as server, sender_to(server, config) as sender:
        with open_outbox(config) as outbox:
            queue_visits(outbox, range(1))
            assert forward_fhir_once(outbox, sender, time.time()).fault
    assert county_row(config) == "被拒绝：请联系县里的信息科", county_row(config)
