"""Tamper evidence for visits: a per-gateway hash chain, signed with the gateway's Ed25519 key.

Each closed visit becomes one canonical JSON record (sorted keys, no spaces, UTF-8) that names
its place in the chain (`seq`, `prev_hash`); its SHA-256 is the link the next record names, and
the gateway signs that hash. Editing a record changes its hash; removing one breaks the next
record's `prev_hash`; re-signing needs the private key, which never leaves the data directory
(file mode 0600). The FHIR Provenance of each visit carries its hash, signature and public key,
so the county holds the chain head as it grows.

Export format (JSON Lines): a header line {"format": "lastmile-visit-chain", "version": 1,
"gateway_id", "public_key"}, then one line per visit {"seq", "record", "hash", "signature"}.
`verify_export()` needs nothing but that file (and, to pin it, the expected public key).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from uploader.whole_file import fsync_dir

log = logging.getLogger(__name__)

KEY_FILE = "gateway_ed25519.pem"
KEY_TMP_PREFIX = f".{KEY_FILE}."  # a key being written, linked to KEY_FILE once whole
GENESIS = "0" * 64
FORMAT = "lastmile-visit-chain"


def canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def record_hash(record: dict) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


class SigningKeyError(ValueError):
    """The gateway's key file cannot be used: the gateway's fault, not any visit's (they wait,
    closed and unsigned, until it is repaired)."""


def load_or_create_key(data_dir: Path) -> Ed25519PrivateKey:
    """The gateway's signing key; created once, 0600, never overwritten."""
    path = Path(data_dir) / KEY_FILE
    try:
        missing = path.stat().st_size == 0
    except FileNotFoundError:
        missing = True
    if missing:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Looked at again under a lock: two processes that both saw an older version's empty
        # file must not both replace it (the second would delete the key the first signed with).
        with _creating_key(path.parent):
            try:
                empty = path.stat().st_size == 0
            except FileNotFoundError:
                _create_key(path)
            else:
                if empty:  # an older version's creation cut short: nothing was ever signed with it
                    log.warning("%s is empty (its creation was interrupted): making the key again", path)
                    path.unlink(missing_ok=True)
                    _create_key(path)
    loaded = load_key(data_dir)
    if loaded is None:
        raise SigningKeyError(f"{path} is empty")
    return loaded


@contextlib.contextmanager
def _creating_key(directory: Path) -> Iterator[None]:
    """An exclusive lock on the data directory itself (no lock file to leave behind) while the
    key is made: released by the kernel if the process dies."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def load_key(data_dir: Path) -> Ed25519PrivateKey | None:
    """The gateway's signing key as its file holds it, creating nothing (`lastmile doctor`): None
    while there is none (absent, or an older version's empty file: made at the next signing)."""
    path = Path(data_dir) / KEY_FILE
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        return None
    if not pem:
        return None
    try:
        loaded = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # damaged (SD card), replaced by hand
        raise SigningKeyError(f"{path} cannot be read as the gateway's signing key: {exc}") from exc
    if not isinstance(loaded, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is not an Ed25519 private key")
    return loaded


def _create_key(path: Path) -> None:
    """Write a new key whole under a temporary name, fsync it, then link it to `path`: the key
    file appears complete or not at all (a power cut or SIGKILL in between leaves only a
    temporary file, removed by the next creation), and another process's key, linked first,
    is kept. The directory is fsynced so a key that signed a visit survives a power cut."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f"{KEY_TMP_PREFIX}{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(pem)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process made it first: use theirs
    except FileNotFoundError:  # our temporary file was swept by a creator that finished first
        if not path.exists():
            raise
    finally:
        tmp.unlink(missing_ok=True)
    for leftover in path.parent.glob(f"{KEY_TMP_PREFIX}*"):
        leftover.unlink(missing_ok=True)  # of creations cut short (a concurrent one retries above)
    fsync_dir(path.parent)


def public_key_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class ChainLink:
    seq: int
    prev_hash: str
    hash: str
    signature: str  # base64


def link(record_body: dict, seq: int, prev_hash: str, key: Ed25519PrivateKey) -> tuple[dict, ChainLink]:
    """Put a record in the chain: returns the record as hashed and its signed link."""
    record = dict(record_body, seq=seq, prev_hash=prev_hash)
    digest = record_hash(record)
    signature = base64.b64encode(key.sign(bytes.fromhex(digest))).decode("ascii")
    return record, ChainLink(seq, prev_hash, digest, signature)


@dataclass
class VerifyReport:
    ok: bool
    records: int = 0
    gateway_id: str = ""
    public_key: str = ""
    head: str = GENESIS
    problems: list[str] = field(default_factory=list)


def export_lines(gateway_id: str, public_key: str, entries: Iterable[tuple[dict, ChainLink]]) -> Iterable[str]:
    yield json.dumps(
        {"format": FORMAT, "version": 1, "gateway_id": gateway_id, "public_key": public_key}, sort_keys=True
    )
    for record, chain_link in entries:
        yield json.dumps(
            {"seq": chain_link.seq, "record": record, "hash": chain_link.hash, "signature": chain_link.signature},
            sort_keys=True,
            ensure_ascii=False,
        )


def verify_lines(lines: Iterable[str], expected_public_key: str | None = None) -> VerifyReport:
    report = VerifyReport(ok=False)
    it = iter(lines)
    try:
        header = json.loads(next(it))
    except (StopIteration, ValueError):
        report.problems.append("no header line")
        return report
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != 1:
        report.problems.append("not a lastmile visit chain (version 1)")
        return report
    report.gateway_id, report.public_key = str(header.get("gateway_id")), str(header.get("public_key"))
    if expected_public_key and expected_public_key != report.public_key:
        report.problems.append("the chain is signed with another key than the one expected")
        return report
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(report.public_key, validate=True))
    except ValueError:
        report.problems.append("header public key is not an Ed25519 key")
        return report
    expected_prev, expected_seq = GENESIS, 1
    for number, line in enumerate(it, start=2):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            record, seq, digest = entry["record"], int(entry["seq"]), str(entry["hash"])
            signature = base64.b64decode(entry["signature"], validate=True)
            if not isinstance(record, dict):
                raise TypeError("the record is not an object")
            # NaN, a lone surrogate (valid JSON, no canonical form): damaged, as an unparsable line
            content_hash = record_hash(record)
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            report.problems.append(f"line {number}: unreadable ({exc})")
            return report
        who = f"record {seq} (visit {record.get('visit_id', '?')})"
        if seq != expected_seq or record.get("seq") != seq:
            report.problems.append(
                f"line {number}: expected record {expected_seq}, found {seq}: records were removed or reordered"
            )
        if record.get("prev_hash") != expected_prev:
            report.problems.append(f"{who}: does not follow the previous record (chain broken)")
        if content_hash != digest:
            report.problems.append(f"{who}: content does not match its hash (edited after capture)")
        try:
            public.verify(signature, bytes.fromhex(digest))
        except (InvalidSignature, ValueError):
            report.problems.append(f"{who}: signature does not verify")
        expected_prev, expected_seq = digest, seq + 1
        report.records += 1
    report.head = expected_prev
    report.ok = not report.problems
    return report


def verify_export(path: str | os.PathLike[str], expected_public_key: str | None = None) -> VerifyReport:
    # bytes that are not UTF-8 reach the line they damage (reported there), not a traceback
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return verify_lines(f, expected_public_key)
