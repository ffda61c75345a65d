"""Where the console listens (`[console] listen`, `https`): read by the console's server and by
`lastmile doctor`, which must not import the server (asyncio, ssl) to say it."""

from __future__ import annotations

from lastmile.config import Config, ConfigError, Listen


def parse_listen(config: Config) -> Listen:
    """`console.listen` as host and port; ConfigError (with the file) when it cannot be used."""
    text = config.console.listen.strip()
    where = f"{config.source}: console.listen = {text!r}"
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ConfigError(f'{where}: write it as "HOST:PORT", e.g. "0.0.0.0:8443" or "127.0.0.1:8080"')
    listen = Listen(host, int(port_text))
    if not config.console.https and not listen.loopback:
        raise ConfigError(
            f"{where} with console.https = false: plain HTTP is allowed on loopback only "
            "(127.0.0.1); set https = true for the clinic LAN"
        )
    return listen
