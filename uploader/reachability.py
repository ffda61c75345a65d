"""Tell whether a connection failure is this gateway's own fault; which addresses are this machine.

When a peer cannot be reached, the person at the gateway needs to know which side to look at:
a name this gateway cannot resolve, no route out of this gateway, or nothing listening on a
port of this gateway itself are *local* faults — asking the reading center will not help.
`local_fault()` probes with one plain TCP connect and returns a sentence for those cases, or
None when the fault may be the peer's (refused or silent remote host).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import urllib.parse

# Errors the kernel gives before anything leaves this machine. (EHOSTUNREACH is left out: a
# router far away can send it too.)
_LOCAL_ERRNOS = {
    errno.ENETUNREACH: "no route from this gateway to that network",
    errno.ENETDOWN: "this gateway's network interface is down",
    errno.EADDRNOTAVAIL: "this gateway has no usable address for it",
}


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (no name resolution)."""
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def insecure_url_problem(url: str) -> str | None:
    """Why `url` must not be used for the FHIR platform, or None: https anywhere, http only to
    this machine (loopback)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
    except ValueError as exc:
        return f"{url!r} is not a URL ({exc})"
    if parts.scheme not in ("https", "http") or not host:
        return f"{url!r} is not an https:// URL"
    if parts.scheme == "http" and not is_loopback(host):
        return (
            f"{url} is plain http to another machine: the bearer token and patient data would cross "
            "the network in clear; use https:// (http is allowed only to this machine, 127.0.0.1)"
        )
    return None


def local_fault(host: str, port: int, timeout_s: float = 5.0) -> str | None:
    """A sentence when connecting to host:port fails on this side, else None."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return (
            f"this gateway cannot resolve the name {host!r} ({exc.strerror}): check the host name, "
            "and the gateway's DNS and network settings"
        )
    except (UnicodeError, ValueError) as exc:
        return f"{host!r} is not a host name this gateway can use ({exc})"
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as s:
            s.settimeout(timeout_s)
            try:
                s.connect(address)
            except ConnectionRefusedError:
                if is_loopback(str(address[0])):
                    return f"nothing listens on port {port} of this gateway itself ({address[0]})"
                continue  # the remote host answered: its side
            except TimeoutError:
                continue  # silent: cannot tell whose
            except OSError as exc:
                reason = _LOCAL_ERRNOS.get(exc.errno or 0)
                if reason:
                    return f"{reason} ({address[0]}: {exc.strerror}): check the gateway's cable, Wi-Fi or modem"
                continue
            return None  # reachable now
    return None


def address_toward(host: str, port: int) -> str:
    """The local address this machine sends from to reach host:port (a route lookup: no packet
    is sent); loopback for a reading center on loopback. Raises OSError without a route."""
    family, _type, _proto, _name, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_DGRAM, family=socket.AF_UNSPEC
    )[0]
    with contextlib.closing(socket.socket(family, socket.SOCK_DGRAM)) as probe:
        probe.connect(sockaddr)
        return str(probe.getsockname()[0])
