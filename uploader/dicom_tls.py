"""TLS for DICOM associations (PS3.15 Annex B, BCP 195): contexts for the sender and the
commitment listener, and enough tracing to tell a trust failure (configuration) from an outage.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from uploader.errors import ConfigurationFault


@dataclass(frozen=True)
class TlsFiles:
    ca_file: str  # CA that signed the peer's certificate
    cert_file: str = ""  # our certificate (client cert; server cert for the listener)
    key_file: str = ""  # its private key


class TracingSSLSocket(ssl.SSLSocket):
    """pynetdicom only logs why a connection failed; keep TLS errors so a trust failure
    (ConfigurationFault) can be told from an outage (TransientError)."""

    def _note(self, exc: OSError) -> None:
        failures = getattr(self.context, "failures", None)
        if failures is not None:
            failures.append(exc)

    def connect(self, addr: object) -> None:
        try:
            super().connect(addr)  # type: ignore[arg-type]
        except OSError as exc:
            self._note(exc)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        # TLS 1.3: the server judges our certificate after our handshake "succeeded"; its
        # verdict arrives as an alert on the first read.
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:
            self._note(exc)
            raise


class TracingContext(ssl.SSLContext):
    sslsocket_class = TracingSSLSocket
    failures: list[OSError]


def tls_problem(tls: TlsFiles, exc: Exception) -> ConfigurationFault:
    return ConfigurationFault(
        f"TLS files unusable (ca {tls.ca_file!r}, cert {tls.cert_file!r}, key {tls.key_file!r}): {exc}"
    )


def client_tls_context(tls: TlsFiles) -> ssl.SSLContext:
    """Verify the peer against our CA (and its name), present our certificate if we have one."""
    ctx = TracingContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.failures = []
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195
    try:
        ctx.load_verify_locations(cafile=tls.ca_file)
        if tls.cert_file:
            ctx.load_cert_chain(tls.cert_file, tls.key_file or None)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise tls_problem(tls, exc) from None
    return ctx


def server_tls_context(tls: TlsFiles) -> ssl.SSLContext:
    """Our certificate for peers that call us; their certificates must chain to our CA."""
    if not tls.cert_file:
        raise ConfigurationFault("a TLS listener needs cert_file and key_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file or None)
        ctx.load_verify_locations(cafile=tls.ca_file)
    except (OSError, ValueError) as exc:
        raise tls_problem(tls, exc) from None
    return ctx


def is_trust_failure(exc: OSError) -> bool:
    # A closed connection is an outage; any other TLS error during set-up is a certificate,
    # CA, protocol-version or cipher mismatch: configuration, not weather.
    return isinstance(exc, ssl.SSLError) and not isinstance(
        exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
    )


def describe_tls(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"peer certificate not trusted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"TLS handshake failed: {exc.reason.replace('_', ' ').lower()}"
    return f"TLS handshake failed: {exc}"
