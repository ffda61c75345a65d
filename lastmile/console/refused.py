"""The console while the configuration is refused: one page, on every path, that says so.

A broken lastmile.toml (not TOML, an unknown key, a value out of range) makes every service exit
78 (EX_CONFIG, which systemd does not restart): nothing records or sends. The doctor, who has no
command line, would see only "cannot connect". Instead the console stays up on what can be
salvaged of `[console]` (`salvage_console_config`) and answers every request with a 503 page in
Chinese (English on request): the settings file has an error, nothing is recorded or sent until
it is fixed, what was recorded is safe, tell the county IT office; and the file's first error
for the technician. No login and no patient data: nothing behind the page is trusted.

It checks the file every few seconds (and on SIGHUP): once it loads, the process exits with
`EXIT_RESTART` so that systemd (Restart=on-failure) starts the real console. A changed file is read
only after it stayed unchanged for a second: an editor's half-written file that happens to load
must not become the console's configuration. The doctor's open page asks again every few seconds
and turns into the console by itself (also across the gateway's restart, when nothing answers).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lastmile import __version__
from lastmile.config import Config, ConfigError
from lastmile.logs import describe_fault
from lastmile.services.runtime import CONFIG_REFUSED, RestartRequested

if TYPE_CHECKING:
    import socket

    import uvicorn
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.types import ASGIApp

log = logging.getLogger(__name__)

CONFIG_CHECK_S = 5.0  # how soon a fixed file brings the real console back
SETTLE_S = 1.0  # a changed file is read once it stayed unchanged this long (not half written)
CHECK_AGAIN_S = 10  # the open page asks again this often (console.js), and says so in Retry-After


@dataclass
class RefusedPage:
    """What the page says; `error` changes when the file is edited and is still refused."""

    error: str
    default_language: str = "zh-CN"


def refused_app(page: RefusedPage, *, https: bool) -> ASGIApp:
    """The 503 page on every path and method; the console's static files for its look."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    from lastmile.console.app import HERE, SecurityHeaders, make_templates
    from lastmile.console.i18n import LANGUAGE_NAMES, LANGUAGES, Localizer, negotiate

    template = make_templates().get_template("refused.html")

    async def refused(request: Request) -> Response:
        asked = request.query_params.get("lang", "")
        language = (
            asked if asked in LANGUAGES else negotiate(request.headers.get("accept-language"), page.default_language)
        )
        loc = Localizer(language, dt.timezone.utc)
        html = template.render(
            _=loc.gettext,
            lang=language,
            languages=LANGUAGE_NAMES,
            error=page.error,
            login=None,  # base.html: no navigation, no alerts
            version=__version__,
            https=https,
            check_again_s=CHECK_AGAIN_S,
        )
        return HTMLResponse(html, status_code=503, headers={"Retry-After": str(CHECK_AGAIN_S)})

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]  # GET brings HEAD
    app = Starlette(
        routes=[
            Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
            Route("/{path:path}", refused, methods=methods),
        ]
    )
    return SecurityHeaders(app, https=https)


class RefusedConsole:
    """The `Service` `lastmile console` runs while its configuration is refused."""

    def __init__(
        self,
        config: Config,
        error: ConfigError,
        *,
        load_config: Callable[[], Config],
    ) -> None:
        self.config = config  # the salvaged one: where to listen, the certificate's directory
        self.page = RefusedPage(describe_fault(error), config.console.language)
        self.load_config = load_config
        self._file = Path(config.source)
        self._seen = self._read = self._signature()
        self._sock: socket.socket | None = None
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.url = ""

    @classmethod
    def start(cls, config: Config, error: ConfigError, *, load_config: Callable[[], Config]) -> RefusedConsole:
        console = cls(config, error, load_config=load_config)
        console.serve()
        return console

    def _signature(self) -> tuple[int, int, int, int] | None:
        """Changed by an edit in place and by an editor's rename over the file (another inode)."""
        try:
            st = self._file.stat()
        except OSError:
            return None
        return st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size

    def serve(self) -> None:
        from lastmile.console.service import bind, parse_listen, served_url, uvicorn_server, wait_started
        from lastmile.console.tls import ensure_certificate

        listen = parse_listen(self.config)
        self._sock = sock = bind(listen)  # OSError (the port taken): the runtime gives up, exit 78
        https = self.config.console.https
        certificate = ensure_certificate(self.config.data_dir, listen.host) if https else None
        self.url = served_url(sock, https)
        self.server = server = uvicorn_server(refused_app(self.page, https=https), certificate)

        def run() -> None:
            try:
                asyncio.run(server.serve(sockets=[sock]))
            except BaseException as exc:
                self.error = exc
                log.exception("the refused configuration's page stopped")

        self.thread = threading.Thread(target=run, name="console-refused", daemon=True)
        self.thread.start()
        wait_started(server, self.thread, "the refused configuration's page", lambda: self.error)
        log.warning("configuration refused: the console says so on %s until lastmile.toml is fixed", self.url)

    # -- Service ------------------------------------------------------------------------------
    def step(self, stop: threading.Event) -> float:
        if self.thread is None or not self.thread.is_alive():
            raise RuntimeError("the refused configuration's page stopped answering")
        seen = self._signature()
        if seen != self._seen:  # edited: fixed, or refused for another reason
            self._seen = seen
            return SETTLE_S  # read it once it stays as it is
        if seen != self._read:
            self._read = seen
            try:
                self.load_config()
            except ConfigError as exc:
                if (error := describe_fault(exc)) != self.page.error:
                    log.error("configuration still refused: %s", exc)
                    self.page.error = error
            else:
                raise RestartRequested("configuration accepted: restarting into the console")
        return CONFIG_CHECK_S

    def reload(self, config: Config) -> None:
        """SIGHUP with a file that loads (the runtime keeps us for one that does not)."""
        raise RestartRequested("configuration accepted: restarting into the console")

    def close(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=15)
        if self._sock is not None:
            self._sock.close()

    def status_line(self) -> str:
        return f"{CONFIG_REFUSED}: {self.page.error}; the console says so on {self.url}"
