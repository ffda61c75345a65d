"""The Today page's live panels and the event stream agree on what the page already shows.

The stream sends every panel when it (re)connects; console.js swaps a panel in only when its
version differs from the one the page was rendered with. So a panel must carry the same version on
the page and in the stream while nothing changed, and a new one when something did. (Before this, each
page load swapped all four panels once at a random moment: elements vanished from under the doctor's
eyes and the browser tests read stale elements under load.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lastmile.console.app import LIVE_PANELS
from tests.console_harness import Client, console_config, enqueue_ecg, panel_events, running_console

pytestmark = pytest.mark.timeout(300)

PANEL_VERSION = re.compile(r'id="panel-(\w+)" data-live data-version="([0-9a-f]{16})"')


def page_versions(client: Client) -> dict[str, str]:
    reply = client.get("/today")
    assert reply.status == 200, reply.body[:300]
    return dict(PANEL_VERSION.findall(reply.body))


def test_the_stream_sends_the_versions_the_page_has_until_something_changes(tmp_path: Path) -> None:
    config = console_config(tmp_path / "data")
    config.ecg.re_record_hold_s = 0
    with running_console(config) as server:
        client = Client(server.url)
        client.login()
        on_page = page_versions(client)
        assert set(on_page) == set(LIVE_PANELS)
        events = panel_events(client)
        first_round = {e["id"].removeprefix("panel-"): e for e in (next(events) for _ in LIVE_PANELS)}
        assert {name: e["version"] for name, e in first_round.items()} == on_page  # nothing to swap

        enqueue_ecg(config, lead_off=True)  # another process records an ECG while the page is open
        changed = next(e for e in events if e["id"] == "panel-ecg")
        assert changed["version"] != on_page["ecg"]
        assert "V3" in changed["html"]  # the new panel says which electrode came off
        events.close()
