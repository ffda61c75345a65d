"""The console's HTTPS certificate: made at first start, kept in the data directory.

A village clinic has no domain and no CA, so the gateway makes its own self-signed certificate
(ECDSA P-256, ten years) the first time the console starts. The browser warns once; the clinic
checks the SHA-256 fingerprint it shows against the one `lastmile doctor` prints on the gateway
(and on its label) before accepting it. The key never leaves the data directory (0600).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from uploader.whole_file import replace_whole

log = logging.getLogger(__name__)

TLS_DIR = "console-tls"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
VALID_DAYS = 3650


@dataclass(frozen=True, slots=True)
class Certificate:
    cert_path: Path
    key_path: Path
    fingerprint: str  # SHA-256 of the DER certificate, "AB:CD:..."
    created: bool  # made just now


def tls_dir(data_dir: Path) -> Path:
    return Path(data_dir) / TLS_DIR


def fingerprint_of(cert_path: Path) -> str:
    """SHA-256 of the DER certificate (stdlib only: `cryptography` costs the console ~7 MB of RSS,
    and it is needed only the day the certificate is made)."""
    import hashlib
    import ssl

    der = ssl.PEM_cert_to_DER_cert(Path(cert_path).read_text(encoding="ascii"))
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def existing_certificate(data_dir: Path) -> Certificate | None:
    folder = tls_dir(data_dir)
    cert, key = folder / CERT_FILE, folder / KEY_FILE
    if cert.is_file() and key.is_file():
        return Certificate(cert, key, fingerprint_of(cert), created=False)
    return None


def ensure_certificate(data_dir: Path, listen_host: str = "", *, now: dt.datetime | None = None) -> Certificate:
    """The console's certificate, made now if there is none yet."""
    found = existing_certificate(data_dir)
    if found is not None:
        return found
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = now or dt.datetime.now(dt.timezone.utc)
    hostname = socket.gethostname() or "lastmile"
    dns = sorted({hostname, f"{hostname}.local", "localhost"})
    ips = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    try:
        host_ip = ipaddress.ip_address(listen_host)
        if not host_ip.is_unspecified:
            ips.add(host_ip)
    except ValueError:
        if listen_host:
            dns.append(listen_host)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, hostname), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Lastmile")]
    )
    san = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ip) for ip in sorted(ips, key=str)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))  # a gateway clock a little behind still accepts it
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder = tls_dir(data_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    replace_whole(folder / KEY_FILE, key_pem, mode=0o600)  # readable by its owner only
    replace_whole(folder / CERT_FILE, cert.public_bytes(serialization.Encoding.PEM), mode=0o600)
    made = Certificate(folder / CERT_FILE, folder / KEY_FILE, fingerprint_of(folder / CERT_FILE), created=True)
    log.info("console certificate made; SHA-256 fingerprint %s", made.fingerprint)
    return made
