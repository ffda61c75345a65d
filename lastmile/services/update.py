"""Updates of the gateway's root filesystem: county-signed RAUC bundles onto the other A/B slot.

One round (`lastmile update poll`, run by lastmile-update.timer) does, in order:

1. a new slot already installed: reboot into it when nothing is in flight (no send on the wire,
   no measurement or patient for `idle_before_reboot_s`) and, if set, inside `reboot_window`;
2. a bundle on a USB stick (`lastmile-update-*.raucb` at the top of a `usb_import.folders` mount);
3. every `poll_interval_h`: the county's index (`update.url`, JSON: version, bundle, sha256, size),
   asked with If-None-Match / If-Modified-Since, so an unchanged index costs one small request and
   a bundle already installed or refused is never downloaded again over a metered village link.

A bundle is copied or downloaded to `<data_dir>/updates/` first (a link that drops resumes with an
HTTP Range request; the data partition's outbox reserve is never eaten into: NotEnoughSpace),
checked against the index's sha256, verified by `rauc info` against the county keyring (signature,
purpose, compatible), then written by `rauc install`. Every failure is typed (UpdateError's family)
and recorded in `<data_dir>/updates/state.json`, which `lastmile update status`, `lastmile doctor`
and the metrics read. A refused bundle is remembered by its sha256 and never tried again; the next,
different one is tried as if nothing had happened.
"""

from __future__ import annotations

import configparser
import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lastmile.clock import local_zone, read_boot_id
from lastmile.logs import describe_fault
from uploader.whole_file import replace_whole

if TYPE_CHECKING:
    import requests

    from lastmile.config import Config

log = logging.getLogger(__name__)

UPDATES_DIR = "updates"
STATE_FILE = "state.json"
LOCK_FILE = "lock"  # one round at a time: the timer's and a technician's `update install`
# image/rauc/lastmile-mark-good's: a line per boot it failed ("<boot id> <slot> unhealthy|refused");
# cleared at each install, so what it holds for the new slot is that slot's trial
BOOT_VERDICTS_FILE = "boot-verdicts"
USB_BUNDLE_GLOB = "lastmile-update-*.raucb"
CHUNK_BYTES = 256 * 1024
MAX_INDEX_BYTES = 64 * 1024  # the index is a few hundred bytes; anything bigger is not one
MAX_REMEMBERED = 32  # refused bundles remembered (by sha256)
# A round that ends as the last one did rewrites the state file (on the SD card) only when the
# recorded round time is this old: 4 writes a day instead of 144, the doctor's "last round … ago"
# still tells a stopped timer.
SAME_ROUND_RECORD_S = 6 * 3600
RAUC_INFO_TIMEOUT_S = 300.0  # rauc info reads the signature at the end: seconds even on a Pi
RAUC_INSTALL_TIMEOUT_S = 3 * 3600.0  # writing 2 GiB to an SD card
STALE_SEND_S = 3600.0
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Outcome(StrEnum):
    """What one round ended with (metrics label `result`, doctor, `update status`)."""

    INSTALLED = "installed"  # a new slot is written: reboot pending
    UP_TO_DATE = "up-to-date"  # nothing new (or the index unchanged: 304)
    SOURCE_FAILED = "source-failed"  # the index could not be fetched (network, TLS, HTTP error)
    INDEX_INVALID = "index-invalid"  # the index is not what the county publishes
    NO_SPACE = "no-space"  # the bundle would eat into the outbox's reserve
    DOWNLOAD_FAILED = "download-failed"  # cut short: resumed next round
    REFUSED = "refused"  # wrong sha256, signature, purpose, compatible: never tried again
    INSTALL_FAILED = "install-failed"  # rauc install failed (I/O, RAUC itself): tried again next round
    DEFERRED = "deferred"  # the download waits for update.metered's window or tomorrow's budget
    AVAILABLE = "available"  # `update check`: a new bundle is on offer (nothing fetched)
    ALREADY_RUNNING = "already-running"  # another round holds the lock (the timer's, a technician's)


# What a round can leave in the state (and the metrics show): not a look, not a lock held elsewhere.
RECORDED_OUTCOMES = tuple(o for o in Outcome if o not in (Outcome.AVAILABLE, Outcome.ALREADY_RUNNING))

# What the doctor reads in the console / CLI (Chinese first, then English).
OUTCOME_ZH: dict[Outcome, str] = {
    Outcome.INSTALLED: "更新已安装，将在空闲时重启",
    Outcome.UP_TO_DATE: "已是最新版本",
    Outcome.SOURCE_FAILED: "无法连接县里的更新服务器，稍后重试",
    Outcome.INDEX_INVALID: "更新服务器给出的更新说明无效，请联系县信息科",
    Outcome.NO_SPACE: "存储空间不足，无法下载更新（测量数据不受影响）",
    Outcome.DOWNLOAD_FAILED: "更新下载中断，稍后自动续传",
    Outcome.REFUSED: "更新包未通过验证，已拒绝（不会安装）",
    Outcome.INSTALL_FAILED: "更新安装失败，稍后重试",
    Outcome.DEFERRED: "更新将在允许的时段继续下载",
    Outcome.AVAILABLE: "有新版本可以安装",
    Outcome.ALREADY_RUNNING: "另一个更新正在进行，请稍后再试",
}

# What the county technician does about it (`lastmile doctor`).
UPDATE_HINTS: dict[Outcome, str] = {
    Outcome.SOURCE_FAILED: "check the link and update.url / update.ca_file; the next round retries",
    Outcome.DOWNLOAD_FAILED: "the link dropped: the next round resumes where it stopped",
    Outcome.INDEX_INVALID: "the county's index at update.url is malformed: tell the county's release team",
    Outcome.NO_SPACE: "free space on the data partition (the outbox's reserve is never used for updates)",
    Outcome.REFUSED: "the county published a bundle this gateway refuses (`lastmile update status` says why): "
    "tell the county's release team; the next bundle they publish is tried as usual",
    Outcome.INSTALL_FAILED: "journalctl -u rauc -u lastmile-update; `lastmile update install` tries again",
}


class UpdateError(Exception):
    """An update round could not go on; `outcome` says how, the message what to do."""

    outcome: ClassVar[Outcome]


class SourceFailed(UpdateError):
    outcome = Outcome.SOURCE_FAILED


class IndexInvalid(UpdateError):
    outcome = Outcome.INDEX_INVALID


class NotEnoughSpace(UpdateError):
    outcome = Outcome.NO_SPACE


class DownloadFailed(UpdateError):
    outcome = Outcome.DOWNLOAD_FAILED


class Deferred(UpdateError):
    """Not a failure: the metered link's window or daily budget says later."""

    outcome = Outcome.DEFERRED


class BundleRefused(UpdateError):
    """This bundle is never installed: remembered by sha256, so it is not fetched again."""

    outcome = Outcome.REFUSED


class InstallFailed(UpdateError):
    outcome = Outcome.INSTALL_FAILED


@dataclass(frozen=True, slots=True)
class Offer:
    """A bundle that could be installed: from the county's index or a USB stick."""

    origin: str  # "https" or "usb"
    location: str  # the bundle's URL, or its path on the stick
    sha256: str
    size: int
    version: str = ""  # from the index; a stick's bundle says its version when rauc reads it


@dataclass
class UpdateState:
    """What the updater remembers between rounds (`<data_dir>/updates/state.json`)."""

    index_url: str = ""
    etag: str = ""
    last_modified: str = ""
    index: dict[str, Any] = field(default_factory=dict)  # the last valid index
    last_poll: float = 0.0  # when the index was last asked (epoch s)
    last_result: dict[str, Any] = field(default_factory=dict)  # outcome, message, version, at
    refused: dict[str, str] = field(default_factory=dict)  # sha256 -> why
    installed: dict[str, Any] = field(default_factory=dict)  # version, sha256, at, boot_id, slot
    # written (durably) before `rauc install` and cleared after it: still there in a later boot, the
    # power went during the install (`Updater.note_cut_install`)
    installing: dict[str, Any] = field(default_factory=dict)  # version, sha256, at, boot_id, slot
    usb_seen: dict[str, list[Any]] = field(default_factory=dict)  # path -> [size, mtime_ns, sha256]
    meter: dict[str, Any] = field(default_factory=dict)  # bytes downloaded today (uploader.metering's record)

    # uploader.metering.StatusStore: the download's meter keeps its day's count here
    def status(self, name: str) -> dict[str, Any] | None:
        return self.meter.get(name)

    def record_status(self, name: str, value: dict[str, Any], now: float) -> None:
        self.meter[name] = value

    @classmethod
    def load(cls, path: Path) -> UpdateState:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            # a torn state file costs one index request and nothing else
            log.warning("update state %s unreadable (%s): starting afresh", path, exc)
            return cls()
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known}) if isinstance(data, dict) else cls()

    def save(self, path: Path) -> None:
        replace_whole(path, json.dumps(asdict(self), indent=1, sort_keys=True).encode(), mode=0o644)

    def remember_refused(self, sha256: str, reason: str) -> None:
        self.refused[sha256] = reason
        while len(self.refused) > MAX_REMEMBERED:
            del self.refused[next(iter(self.refused))]


@dataclass(frozen=True, slots=True)
class RoundResult:
    outcome: Outcome
    message: str
    version: str = ""
    rebooting: bool = False

    def lines(self) -> list[str]:
        """Chinese for the doctor, then the technician's English detail."""
        return [OUTCOME_ZH[self.outcome], f"{self.outcome.value}: {self.message}"]


def _recorded(last: dict[str, Any], result: RoundResult, now: float) -> dict[str, Any]:
    """The round's record; the last one kept as it is when the round ended the same way recently
    (so the state file is not rewritten for nothing)."""
    record = {**asdict(result), "outcome": result.outcome.value, "at": now}
    at = last.get("at")
    same = {k: v for k, v in last.items() if k != "at"} == {k: v for k, v in record.items() if k != "at"}
    if same and isinstance(at, int | float) and 0 <= now - at < SAME_ROUND_RECORD_S:
        return last
    return record


def reboot_pending(state: UpdateState) -> bool:
    """A slot was installed during this boot and is not booted yet."""
    return bool(state.installed.get("boot_id")) and state.installed.get("boot_id") == read_boot_id()


def rolled_back(state: UpdateState) -> dict[str, Any] | None:
    """The installed version's rollback as the round recorded it: when, and what runs instead."""
    record = state.installed.get("rolled_back")
    return record if isinstance(record, dict) else None


def retry_due(state: UpdateState) -> bool:
    """The rollback is the power's, not the release's, and its bundle was not tried again yet: no
    boot of the new slot was judged unhealthy by lastmile-mark-good (each ended before it was
    judged: power cuts, or a crash early in boot), so it is installed once more."""
    record = rolled_back(state)
    return record is not None and record.get("failed_boots") == 0 and not state.installed.get("retried")


def describe_rollback(state: UpdateState) -> str:
    """The recorded rollback in the technician's words (doctor, journal)."""
    record = rolled_back(state) or {}
    failed = record.get("failed_boots")
    if retry_due(state):
        why = "every boot of it ended before it was judged (power cuts, or a crash early in boot)"
        then = "it is installed once more"
    else:
        why = "did not come up healthy" + (f" ({failed} boot(s) judged unhealthy)" if failed else "")
        then = "it is not installed again"
    return (
        f"version {state.installed.get('version')} was installed into slot {state.installed.get('slot') or '?'} "
        f"but {why}: U-Boot went back to slot {record.get('booted_slot') or '?'} (version "
        f"{record.get('booted_version') or 'unknown'}); {then}"
    )


def read_state(data_dir: Path) -> UpdateState | None:
    """The updater's state for readers (metrics, doctor); None when no round ever ran."""
    path = data_dir / UPDATES_DIR / STATE_FILE
    return UpdateState.load(path) if path.exists() else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def parse_index(data: bytes, index_url: str) -> Offer:
    """The county's index -> an Offer (the bundle's URL resolved against the index's)."""
    try:
        index = json.loads(data)
    except ValueError as exc:
        raise IndexInvalid(f"the index at {index_url} is not JSON ({exc})") from None
    if not isinstance(index, dict):
        raise IndexInvalid(f"the index at {index_url} is not a JSON object")
    version, bundle, sha, size = (index.get(k) for k in ("version", "bundle", "sha256", "size"))
    problems = []
    if not isinstance(version, str) or not version.strip():
        problems.append("'version' must be a non-empty string")
    if not isinstance(bundle, str) or not bundle:
        problems.append("'bundle' must be the bundle's URL")
    if not isinstance(sha, str) or not _SHA256.match(sha.lower()):
        problems.append("'sha256' must be 64 hex digits")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        problems.append("'size' must be the bundle's size in bytes")
    if problems:
        raise IndexInvalid(f"the index at {index_url}: " + "; ".join(problems))
    assert isinstance(bundle, str) and isinstance(sha, str) and isinstance(size, int) and isinstance(version, str)
    url = urllib.parse.urljoin(index_url, bundle)
    if urllib.parse.urlsplit(url).scheme != "https":
        raise IndexInvalid(f"the index at {index_url} names a bundle not on https: {url}")
    return Offer("https", url, sha.lower(), size, version.strip())


@dataclass(frozen=True, slots=True)
class BundleInfo:
    compatible: str
    version: str


class Rauc:
    """The real `rauc` with the gateway's system.conf (and keyring, when not the conf's own)."""

    def __init__(self, conf: str, keyring: str = "", executable: str = "rauc") -> None:
        self.conf = conf
        self.keyring = keyring
        self.executable = executable

    def _argv(self, *args: str) -> list[str]:
        argv = [self.executable, "--conf", self.conf]
        if self.keyring:
            argv += ["--keyring", self.keyring]
        return [*argv, *args]

    def _run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except FileNotFoundError:
            raise InstallFailed(f"{self.executable} is not installed on this gateway (apt-get install rauc)") from None
        except subprocess.TimeoutExpired:
            raise InstallFailed(f"{' '.join(argv[:4])} did not finish within {timeout:g} s") from None

    def compatible(self) -> str:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read_string(Path(self.conf).read_text(encoding="utf-8"))
            return parser.get("system", "compatible")
        except (OSError, configparser.Error) as exc:
            raise InstallFailed(f"RAUC's configuration {self.conf} cannot be read: {exc}") from None

    def info(self, bundle: Path) -> BundleInfo:
        """The bundle's manifest, once its signature checked out against the keyring."""
        proc = self._run(self._argv("info", "--output-format=json", str(bundle)), RAUC_INFO_TIMEOUT_S)
        if proc.returncode != 0:
            raise BundleRefused(f"rauc refuses the bundle: {_rauc_error(proc.stderr)}")
        try:
            manifest = json.loads(proc.stdout)
            info = BundleInfo(str(manifest["compatible"]), str(manifest["version"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise InstallFailed(f"rauc info gave no manifest ({exc})") from None
        expected = self.compatible()
        if info.compatible != expected:
            raise BundleRefused(f"the bundle is for {info.compatible!r}, this gateway is {expected!r}")
        return info

    def install(self, bundle: Path) -> None:
        proc = self._run(self._argv("install", str(bundle)), RAUC_INSTALL_TIMEOUT_S)
        if proc.returncode != 0:
            error = _rauc_error(proc.stderr)
            if re.search(r"signature|compatible|certificate|verif|payload is corrupted", error, re.I):
                raise BundleRefused(f"rauc install refused the bundle: {error}")
            raise InstallFailed(f"rauc install failed: {error}")

    def status(self) -> dict[str, Any] | None:
        """`rauc status --detailed` as JSON; None off an A/B gateway (no rauc, no service)."""
        try:
            proc = subprocess.run(
                self._argv("status", "--detailed", "--output-format=json"),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            status = json.loads(proc.stdout) if proc.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, ValueError):
            return None
        return status if isinstance(status, dict) else None

    def booted_version(self) -> str | None:
        """The bundle version RAUC recorded for the booted slot; None off an A/B gateway, or for a
        slot RAUC never wrote (a new card's A)."""
        return _booted_version(self.status())

    def other_slot(self) -> str | None:
        """The bootname of the root slot not booted: where `rauc install` writes."""
        status = self.status()
        booted = status.get("booted") if status else None
        others = [str(d["bootname"]) for d in _root_slots(status) if d.get("bootname") and d["bootname"] != booted]
        return others[0] if booted and len(others) == 1 else None


def _root_slots(status: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The rootfs slots' details in a `rauc status` (a list of {name: details})."""
    found = []
    for slot in (status or {}).get("slots") or []:
        for name, details in slot.items() if isinstance(slot, dict) else ():
            if isinstance(details, dict) and (details.get("class") == "rootfs" or str(name).startswith("rootfs.")):
                found.append(details)
    return found


def _booted_version(status: dict[str, Any] | None) -> str | None:
    for details in _root_slots(status):
        if details.get("state") == "booted":
            bundle = (details.get("slot_status") or {}).get("bundle") or {}
            return str(bundle["version"]) if bundle.get("version") else None
    return None


def _rauc_error(stderr: str) -> str:
    """RAUC's last meaningful line (it prints progress messages before the error)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and "rauc-Message" not in line]
    return lines[-1] if lines else "(no message)"


def busy_reason(config: Config, now: float) -> str | None:
    """Why rebooting now would cut into the clinic's work, or None: an item on the wire, a
    measurement or a patient in the last `idle_before_reboot_s`, outside `reboot_window`."""
    from lastmile.data_dir import CLINIC_DB, OUTBOX_DB, read_only

    u = config.update
    if u.reboot_window:
        from uploader.metering import SendWindow

        window = SendWindow.parse(u.reboot_window)
        local = dt.datetime.fromtimestamp(now, local_zone())
        if not window.contains(local.hour * 60 + local.minute + local.second / 60):
            return f"outside the reboot window {window}"
    quiet = u.idle_before_reboot_s
    outbox = config.data_dir / OUTBOX_DB
    if outbox.is_file():
        with read_only(outbox) as conn:
            # a claim untouched for an hour is a dead sender's (recovered at its restart), not a send
            sending, newest = conn.execute(
                "SELECT SUM(state = 'sending' AND updated_at > ?), MAX(created_at) FROM items WHERE state != 'purged'",
                (now - STALE_SEND_S,),
            ).fetchone()
        if sending:
            return f"{sending} item(s) being sent"
        if newest is not None and now - float(newest) < quiet:
            return f"a measurement came in {now - float(newest):.0f} s ago"
    clinic = config.data_dir / CLINIC_DB
    if clinic.is_file():
        from lastmile.clinic.db import from_iso

        with read_only(clinic) as conn:
            try:
                row = conn.execute("SELECT patient_id, last_activity FROM session WHERE id = 1").fetchone()
            except sqlite3.OperationalError:
                row = None
        last = from_iso(row[1]) if row and row[1] else None
        if last is not None and now - last.timestamp() < max(quiet, config.patient.idle_timeout_s if row[0] else 0):
            return "a patient is with the doctor" if row[0] else "the clinic was busy moments ago"
    return None


class Updater:
    """One gateway's updates: the state directory, the county's index, sticks, RAUC."""

    def __init__(
        self,
        config: Config,
        *,
        rauc: Rauc | None = None,
        reboot: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.settings = config.update
        self.directory = config.data_dir / UPDATES_DIR
        self.state_path = self.directory / STATE_FILE
        self.rauc = rauc or Rauc(self.settings.rauc_conf, self.settings.keyring)
        self.reboot = reboot or _systemctl_reboot
        self.clock = clock
        self.reserve_bytes = config.outbox.min_free_mb * 2**20
        self._session: requests.Session | None = None

    # -- state -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def state(self) -> Iterator[UpdateState]:
        """The state, saved when the block ends if it changed (also when it raises: failures are
        recorded)."""
        # readable by the metrics and console services (no patient data here); written by root
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)  # whatever the unit's UMask
        state = UpdateState.load(self.state_path)
        loaded = asdict(state)
        try:
            yield state
        finally:
            if asdict(state) != loaded or not self.state_path.exists():
                state.save(self.state_path)

    # -- sources -----------------------------------------------------------------------------
    @property
    def session(self) -> requests.Session:
        if self._session is None:
            import requests

            self._session = requests.Session()
            self._session.headers["User-Agent"] = f"lastmile-update ({self.config.gateway.id})"
        return self._session

    @property
    def _request_options(self) -> dict[str, Any]:
        # verify on each request: a session's own is overridden by $REQUESTS_CA_BUNDLE
        return {"timeout": self.settings.timeout_s, "stream": True, "verify": self.settings.ca_file or True}

    def check_index(self, state: UpdateState, url: str) -> Offer:
        """The county's index, asked conditionally: a 304 gives back the one remembered."""
        import requests

        if urllib.parse.urlsplit(url).scheme != "https":
            raise SourceFailed(f"{url} is not an https:// URL: the update index must come over TLS")
        headers = {}
        if state.index_url == url and state.index:
            if state.etag:
                headers["If-None-Match"] = state.etag
            if state.last_modified:
                headers["If-Modified-Since"] = state.last_modified
        try:
            with self.session.get(url, headers=headers, **self._request_options) as resp:
                if resp.status_code == 304 and state.index:
                    return parse_index(json.dumps(state.index).encode(), url)
                if resp.status_code != 200:
                    raise SourceFailed(f"the update server answered HTTP {resp.status_code} for {url}")
                body = resp.raw.read(MAX_INDEX_BYTES + 1, decode_content=True)
                if len(body) > MAX_INDEX_BYTES:
                    raise IndexInvalid(f"the index at {url} is larger than {MAX_INDEX_BYTES} bytes")
                offer = parse_index(body, url)
                state.index_url, state.index = url, json.loads(body)
                state.etag = resp.headers.get("ETag", "")
                state.last_modified = resp.headers.get("Last-Modified", "")
                return offer
        except requests.exceptions.SSLError as exc:
            raise SourceFailed(f"TLS to {url} failed (is update.ca_file the county's CA?): {exc}") from None
        except requests.exceptions.RequestException as exc:
            raise SourceFailed(f"cannot reach {url}: {exc}") from None

    def usb_bundles(self) -> list[Path]:
        """Bundles at the top of the mounted sticks (never searched deeper: a stick is read-only here)."""
        if not self.settings.usb_bundles:
            return []
        found: list[Path] = []
        for folder in self.config.usb_import.folders:
            with contextlib.suppress(OSError):
                found += sorted(p for p in Path(folder).glob(USB_BUNDLE_GLOB) if p.is_file())
        return found

    def usb_offer(self, state: UpdateState, path: Path) -> Offer:
        """A stick's bundle as an offer; its sha256 computed once per (size, mtime)."""
        st = path.stat()
        seen = state.usb_seen.get(str(path))
        if seen and seen[:2] == [st.st_size, st.st_mtime_ns]:
            sha = str(seen[2])
        else:
            sha = sha256_of(path)
            state.usb_seen[str(path)] = [st.st_size, st.st_mtime_ns, sha]
        return Offer("usb", str(path), sha, st.st_size)

    def is_new(self, state: UpdateState, offer: Offer) -> str | None:
        """Why `offer` is not to be fetched (None: it is new)."""
        if offer.sha256 in state.refused:
            return f"bundle {offer.sha256[:12]} was refused before ({state.refused[offer.sha256]})"
        if state.installed.get("sha256") == offer.sha256 and not retry_due(state):
            return f"bundle {offer.sha256[:12]} (version {state.installed.get('version')}) is already installed"
        booted = self.rauc.booted_version()
        if offer.version and booted == offer.version:
            return f"version {offer.version} is the one running"
        return None

    # -- fetching ----------------------------------------------------------------------------
    def bundle_path(self, offer: Offer) -> Path:
        return self._bundle_file(offer.sha256)

    def _bundle_file(self, sha256: str) -> Path:
        return self.directory / f"{sha256[:16]}.raucb"

    def _make_room(self, offer: Offer, keep: Path) -> int:
        """Delete other bundles and partial downloads (an older offer's never blocks this one);
        NotEnoughSpace when the rest would eat into the outbox's reserve. Returns bytes present."""
        part = keep.with_suffix(".part")
        for stale in self.directory.glob("*.raucb*"):
            if stale not in (keep, part):
                log.info("removing %s: not the bundle on offer now", stale.name)
                stale.unlink(missing_ok=True)
        have = part.stat().st_size if part.exists() else 0
        if have > offer.size:
            part.unlink()
            have = 0
        free = shutil.disk_usage(self.directory).free
        need = offer.size - have
        if free - need < self.reserve_bytes:
            raise NotEnoughSpace(
                f"the bundle needs {need / 2**20:.1f} MB more; the data partition has {free / 2**20:.1f} MB free "
                f"and keeps {self.reserve_bytes / 2**20:.0f} MB for the outbox (outbox.min_free_mb): "
                "free space or use a larger card"
            )
        return have

    def fetch(self, state: UpdateState, offer: Offer) -> Path:
        """The bundle in the updates directory, complete and matching `offer.sha256`."""
        done = self.bundle_path(offer)
        if done.exists() and sha256_of(done) == offer.sha256:
            return done
        done.unlink(missing_ok=True)
        have = self._make_room(offer, done)
        part = done.with_suffix(".part")
        if offer.origin == "usb":
            self._copy(Path(offer.location), part)
        else:
            self._metered_download(state, offer, part, have)
        got = sha256_of(part)
        if got != offer.sha256:
            part.unlink()
            if offer.origin == "usb":  # the stick's file changed under us: look at it again next round
                state.usb_seen.pop(offer.location, None)
                raise DownloadFailed(f"{offer.location} changed while it was copied")
            raise BundleRefused(f"the download's sha256 {got[:12]} is not the index's {offer.sha256[:12]}")
        os.replace(part, done)
        return done

    def _metered_download(self, state: UpdateState, offer: Offer, part: Path, have: int) -> None:
        """The download within update.metered: only in its windows, at most its daily budget (the
        rest is asked for with a Range request the next day: a bundle may take several)."""
        from lastmile.services.metered import meter_policy
        from uploader.metering import Meter

        policy = meter_policy(self.settings.metered)
        if policy is None:
            self._download(offer, part, have)
            return
        meter, now = Meter.charging("update", policy, state), self.clock()
        blocked = meter.blocked(now)
        if blocked is not None:
            until = dt.datetime.fromtimestamp(blocked.until, local_zone()).strftime("%Y-%m-%d %H:%M")
            raise Deferred(f"update.metered: {blocked.detail}; the download goes on from {until}")
        allowance = policy.daily_budget_bytes - meter.spent_today(now) if policy.daily_budget_bytes else None
        try:
            self._download(offer, part, have, limit=allowance)
        finally:
            meter.spend((part.stat().st_size if part.exists() else 0) - have, now)
        if part.stat().st_size < offer.size:
            got = part.stat().st_size
            raise Deferred(f"update.metered: today's budget used at {got} of {offer.size} bytes; resumes tomorrow")

    def _copy(self, source: Path, part: Path) -> None:
        try:
            with source.open("rb") as src, part.open("wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK_BYTES)
                dst.flush()
                os.fsync(dst.fileno())
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise DownloadFailed(f"cannot copy {source} from the stick ({exc.strerror or exc})") from None

    def _download(self, offer: Offer, part: Path, have: int, limit: int | None = None) -> None:
        """Bytes `have`.. of the bundle onto `part` (`limit`: at most that many this time)."""
        import requests
        import urllib3

        end = have + limit - 1 if limit is not None and have + limit < offer.size else None
        stop_at = offer.size
        headers = {"Range": f"bytes={have}-{'' if end is None else end}"} if have or end is not None else {}
        try:
            with self.session.get(offer.location, headers=headers, **self._request_options) as resp:
                if resp.status_code == 416 and have == offer.size:
                    return  # the previous round got every byte
                if resp.status_code == 206 and _range_start(resp.headers.get("Content-Range", "")) == have:
                    mode = "ab"
                elif resp.status_code == 200:
                    mode, have = "wb", 0  # the server does not resume: start over
                else:
                    raise DownloadFailed(f"the update server answered HTTP {resp.status_code} for {offer.location}")
                if have:
                    log.info("resuming the download of %s at byte %d of %d", offer.version, have, offer.size)
                # where this request stops: the bundle's end, or the budget's (also when a server
                # ignores the Range and sends everything)
                stop_at = offer.size if limit is None else min(offer.size, have + limit)
                with part.open(mode) as f:
                    try:
                        # read1: whatever arrived before the link dropped is kept (iter_content
                        # would drop a partly received chunk and the resume would fetch it again)
                        while chunk := resp.raw.read1(CHUNK_BYTES):
                            if have + len(chunk) > offer.size:
                                raise BundleRefused(f"the bundle is larger than the index's {offer.size} bytes")
                            chunk = chunk[: stop_at - have]
                            f.write(chunk)
                            have += len(chunk)
                            if have >= stop_at:
                                break
                    finally:
                        f.flush()
                        os.fsync(f.fileno())
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise DownloadFailed(
                f"the download stopped at {have} of {offer.size} bytes ({type(exc).__name__}); it resumes next round"
            ) from None
        if have < stop_at:
            raise DownloadFailed(f"the download stopped at {have} of {offer.size} bytes; it resumes next round")

    # -- installing --------------------------------------------------------------------------
    def install(self, state: UpdateState, offer: Offer, bundle: Path) -> RoundResult:
        """Verify with `rauc info`, then write the other slot with `rauc install`."""
        try:
            info = self.rauc.info(bundle)
            if offer.version and info.version != offer.version:
                raise BundleRefused(f"the bundle says version {info.version}, the index {offer.version}")
            if info.version == self.rauc.booted_version():  # a stick's bundle of the running version
                bundle.unlink(missing_ok=True)
                state.installed = {"version": info.version, "sha256": offer.sha256, "at": self.clock(), "boot_id": ""}
                return RoundResult(Outcome.UP_TO_DATE, f"version {info.version} is the one running", info.version)
            log.info("installing version %s from %s", info.version, offer.location)
            target = self.rauc.other_slot()  # asked before: after the install RAUC may name it otherwise
            record = {
                "version": info.version,
                "sha256": offer.sha256,
                "at": self.clock(),
                "boot_id": read_boot_id(),
                "slot": target or "",
            }
            if retry_due(state) and state.installed.get("sha256") == offer.sha256:
                record["retried"] = True  # once: a second rollback is the release's to answer for
                log.warning("installing version %s once more: %s", info.version, describe_rollback(state))
            # on the card before RAUC writes anything: a power cut during the install is told by it
            state.installing = record
            state.save(self.state_path)
            (self.directory / BOOT_VERDICTS_FILE).unlink(missing_ok=True)  # the new slot's trial starts
            try:
                self.rauc.install(bundle)
            finally:
                state.installing = {}
        except BundleRefused:
            bundle.unlink(missing_ok=True)
            raise
        bundle.unlink(missing_ok=True)  # written to the slot; kept only while an install may be retried
        state.installed = record
        return RoundResult(Outcome.INSTALLED, f"version {info.version} written to the other slot", info.version)

    def note_cut_install(self, state: UpdateState) -> None:
        """An install that a power cut (or a kill) ended in an earlier boot: what RAUC finished.

        RAUC takes the slot out of the boot order before writing it and puts it first only once
        it is written (and its status with the version: that alone says nothing), so a boot of that
        slot means the install was whole: it is recorded as installed, not written again. Another
        slot booted: the cut came before RAUC made the slot bootable, and the kept bundle is
        installed again - or, a cut in the milliseconds between RAUC's last write and this
        record's, the slot did not come up healthy: then the install again is this round's, once
        (its rollback is recorded as any other)."""
        cut = state.installing
        if not cut or cut.get("boot_id") == read_boot_id():
            return  # none, or this boot's: a round killed mid-install; the next install redoes it
        state.installing = {}
        status = self.rauc.status()
        booted = str(status.get("booted") or "") if status else ""
        slot = str(cut.get("slot") or "")
        if slot and booted == slot:
            state.installed = cut
            self._bundle_file(str(cut.get("sha256") or "")).unlink(missing_ok=True)  # in the slot now
            log.warning(
                "the install of version %s into slot %s was cut short (a power cut?) after RAUC finished: "
                "slot %s runs it",
                cut.get("version"),
                slot,
                slot,
            )
        else:
            log.warning(
                "the install of version %s into slot %s was cut short (a power cut?) before RAUC made it "
                "bootable: slot %s runs; it is installed again",
                cut.get("version"),
                slot or "?",
                booted or "?",
            )

    def note_rollback(self, state: UpdateState) -> None:
        """The slot installed in an earlier boot is not the one booted: it did not come up healthy
        (lastmile-mark-good) and U-Boot went back. Recorded once, in the state, for the console,
        the doctor and the metrics; its bundle is not installed again (`is_new`: installed sha256)."""
        installed = state.installed
        if not installed.get("slot") or installed.get("rolled_back") or reboot_pending(state):
            return
        status = self.rauc.status()  # one D-Bus round trip for the slot and its version
        booted = str(status.get("booted") or "") if status else ""
        if not booted or booted == installed["slot"]:
            return
        installed["rolled_back"] = {
            "at": self.clock(),
            "booted_slot": booted,
            "booted_version": _booted_version(status) or "",
            "failed_boots": self.failed_boots(str(installed["slot"])),
        }
        if retry_due(state):
            log.warning("%s", describe_rollback(state))
        else:
            log.error("%s (journalctl -b -1 -u lastmile-mark-good shows why)", describe_rollback(state))

    def failed_boots(self, slot: str) -> int | None:
        """Boots of `slot` lastmile-mark-good failed since the last install; None when its notes
        cannot be read (then the rollback is not taken for the power's)."""
        try:
            text = (self.directory / BOOT_VERDICTS_FILE).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("lastmile-mark-good's notes unreadable: %s", exc)
            return None
        return sum(1 for line in text.splitlines() if line.split()[1:2] == [slot])

    # -- rounds ------------------------------------------------------------------------------
    def offers(
        self, state: UpdateState, *, url: str | None = None, file: Path | None = None, look: bool = False
    ) -> list[Offer]:
        """What there is to take: the given file or URL, else the sticks, then the index when due
        (`look`: asked now, as `update check` does, without moving the next poll)."""
        if file is not None:
            return [self.usb_offer(state, file)]
        if url is not None:
            return [self.check_index(state, url)]
        found = []
        for path in self.usb_bundles():
            try:
                found.append(self.usb_offer(state, path))
            except OSError as exc:  # pulled out while it was read
                log.warning("cannot read %s: %s", path, exc)
        now = self.clock()
        # due: never asked, the interval passed, or the clock went back (a Pi without its RTC)
        interval = self.settings.poll_interval_h * 3600
        # due too while a rollback's bundle waits to be installed once more (retry_due)
        due = not state.last_poll or not 0 < now - state.last_poll < interval or retry_due(state)
        if self.settings.url and (due or look):
            if not look:
                state.last_poll = now
            found.append(self.check_index(state, self.settings.url))
        return found

    def run(
        self, *, url: str | None = None, file: Path | None = None, install: bool = True, reboot: bool = True
    ) -> RoundResult:
        """One round; the result is recorded in the state whatever it is."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / LOCK_FILE).open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return RoundResult(
                    Outcome.ALREADY_RUNNING, "another update round is running (lastmile-update.service?)"
                )
            return self._locked_run(url=url, file=file, install=install, reboot=reboot)

    def _locked_run(self, *, url: str | None, file: Path | None, install: bool, reboot: bool) -> RoundResult:
        with self.state() as state:
            if install:
                self.note_cut_install(state)
                self.note_rollback(state)
            result = self._round(state, url=url, file=file, install=install)
            if install:  # `update check` looks, it does not change what the county sees
                state.last_result = _recorded(state.last_result, result, self.clock())
            if reboot and install and reboot_pending(state):
                why = busy_reason(self.config, self.clock())
                if why is None:
                    log.warning("rebooting into the new slot (version %s)", state.installed.get("version"))
                    result = RoundResult(result.outcome, result.message, result.version, rebooting=True)
                else:
                    log.info("new slot installed; reboot waits: %s", why)
        if result.rebooting:
            self.reboot()
        return result

    def _round(self, state: UpdateState, *, url: str | None, file: Path | None, install: bool) -> RoundResult:
        if reboot_pending(state) and url is None and file is None:
            version = str(state.installed.get("version"))
            return RoundResult(Outcome.INSTALLED, f"version {version} is installed; waiting to reboot", version)
        failure: UpdateError | None = None
        try:
            offers = self.offers(state, url=url, file=file, look=not install)
        except UpdateError as exc:
            failure, offers = exc, []
        for offer in offers:
            skip = self.is_new(state, offer)
            if skip is not None:
                log.info("%s: %s", offer.location, skip)
                continue
            if not install:
                return RoundResult(Outcome.AVAILABLE, f"offered: {offer.version or offer.location}", offer.version)
            try:
                return self.install(state, offer, self.fetch(state, offer))
            except OSError as exc:  # the card (full, failing) or a stick pulled out mid-copy
                outcome = Outcome.NO_SPACE if exc.errno == errno.ENOSPC else Outcome.DOWNLOAD_FAILED
                log.error("update failed (%s): %s", outcome.value, exc)
                return RoundResult(outcome, f"{describe_fault(exc)}; the next round tries again", offer.version)
            except BundleRefused as exc:
                state.remember_refused(offer.sha256, str(exc))
                log.error("update refused: %s", exc)
                failure = exc
                continue  # one bad bundle never blocks the next one on offer
            except UpdateError as exc:
                log.error("update failed (%s): %s", exc.outcome.value, exc)
                return RoundResult(exc.outcome, str(exc), offer.version)
        if failure is not None:
            return RoundResult(failure.outcome, str(failure))
        return RoundResult(Outcome.UP_TO_DATE, "no new bundle")


def _range_start(content_range: str) -> int | None:
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", content_range.strip())
    return int(m.group(1)) if m else None


def _systemctl_reboot() -> None:
    subprocess.run(["systemctl", "reboot"], check=False, timeout=60)
