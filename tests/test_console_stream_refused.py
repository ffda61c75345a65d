"""The Today page's live stream refused for good (console.js in a real browser).

The page itself is served by a small loopback server here, not the console: no console state
makes /events refuse while its pages answer, and that is the case this guards (a console fault,
a proxy). The script is the console's own file."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.console_browser import by, wait_for

CONSOLE_JS = Path(__file__).parents[1] / "lastmile" / "console" / "static" / "console.js"
PAGE = (
    b'<!doctype html><html><head><script src="/static/console.js" defer></script></head><body>'
    b'<div id="stream-down" hidden>down</div><div id="panel-session" data-live>'
    b'<input id="patient_id"></div></body></html>'
)


class _RefusingConsole(BaseHTTPRequestHandler):
    """A Today page whose /events answers 500 every time; counts the page's loads."""

    loads: list[float]

    def do_GET(self) -> None:
        if self.path == "/events":
            self.send_response(500)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        body, kind = (CONSOLE_JS.read_bytes(), "text/javascript") if self.path.endswith(".js") else (PAGE, "text/html")
        if self.path == "/":
            self.loads.append(time.monotonic())
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def refusing_console() -> Iterator[tuple[str, list[float]]]:
    loads: list[float] = []
    handler = type("Handler", (_RefusingConsole,), {"loads": loads})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", loads
    finally:
        server.shutdown()
        server.server_close()


def test_a_stream_refused_again_after_the_reload_says_so_and_does_not_reload_every_3_s(
    browser: object, refusing_console: tuple[str, list[float]]
) -> None:
    """REV-F: a stream the console keeps refusing reloaded the page every 3 s for ever (a doctor
    typing a patient's ID lost it each time, and the page flickered). One reload (a 401 goes to the
    login page that way); refused again: the banner says the page is not current, the next try a
    minute later."""
    url, loads = refusing_console
    browser.get(url)  # type: ignore[attr-defined]
    wait_for(browser, lambda _d: len(loads) >= 2)  # the first refusal's reload
    wait_for(browser, lambda d: d.find_element(by("id"), "stream-down").is_displayed())
    second = loads[1]
    time.sleep(max(0.0, second + 8.0 - time.monotonic()))  # the old page reloaded twice more by now
    assert len(loads) == 2, f"the page was loaded {len(loads)} times in {loads[-1] - loads[0]:.1f} s"
    assert browser.find_element(by("id"), "stream-down").is_displayed()  # type: ignore[attr-defined]
