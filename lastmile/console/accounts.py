"""Console accounts: one per person, argon2id passwords, lockout, logins, CSRF tokens.

Rows live in clinic.db (`console_users`, `console_logins`; migration 0005_console). A login is a
random token in an HttpOnly cookie; only its sha256 is stored, so a copy of the database does not
hand out sessions. Each login has its own CSRF token, required on every form the user posts.

Lockout: `max_failures` wrong passwords in a row lock the account for `lockout_s`; while locked,
even the right password is refused (and says so), so guessing from the clinic LAN is slow. An
unknown name gets the same answers (tries left, then locked) and costs the same hash as a known
one. Its count is kept where a real name's is, the same way (`console_login_failures`, one row a
name tried, the last FAILURE_COUNTS_KEPT only, unknown names trimmed first so a flood of them cannot
end a real account's lock): neither the page, a restart, nor the time a write takes tells which
names exist.

Argon2id parameters: OWASP's m=12 MiB, t=3, p=1 profile. The library's default (64 MiB, p=4)
would double the console's memory on every login on a 512 MB Pi; 12 MiB is freed right after.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import secrets
import sqlite3
import unicodedata
from dataclasses import dataclass
from typing import NoReturn

import sqlite_utils
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from lastmile.clinic.db import from_iso, iso, iso_or_none, transaction

log = logging.getLogger(__name__)

ROLES = ("doctor", "admin")
LANGUAGES = ("zh-CN", "en")
PASSWORD_MIN_LENGTH = 8
NAME_MAX_LENGTH = 64
TOUCH_EVERY = dt.timedelta(seconds=60)  # last_seen_at is written at most this often (SD card)
# Failure counts kept (real and unknown names alike): names typed at random cannot fill the SD card
# (~1 MB at most). Persisted, not in memory, so a lock outlives a restart and `lastmile user unlock`
# (another process) can end it; the write it costs is one a real name's failure always made.
FAILURE_COUNTS_KEPT = 4096
HASHER = PasswordHasher(time_cost=3, memory_cost=12 * 1024, parallelism=1)


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the name is unknown, so that path costs what a real check costs
    (made on first use: hashing at import would cost every start ~50 ms)."""
    return HASHER.hash("lastmile: no such user")


class AccountError(ValueError):
    """A name, role or password that cannot be used; the message says why."""


class LoginRefused(Exception):
    """Wrong name or password, a disabled account, or a locked one (`locked_until` set)."""

    def __init__(
        self, message: str, locked_until: dt.datetime | None = None, *, attempts_left: int | None = None
    ) -> None:
        super().__init__(message)
        self.locked_until = locked_until
        self.attempts_left = attempts_left  # before the account locks (a wrong password)


@dataclass(frozen=True, slots=True)
class User:
    name: str
    role: str
    language: str  # "" = the browser's
    created_at: dt.datetime
    failed_logins: int
    locked_until: dt.datetime | None
    last_login_at: dt.datetime | None
    disabled: bool

    def locked(self, now: dt.datetime) -> bool:
        return self.locked_until is not None and self.locked_until > now

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True, slots=True)
class Login:
    user: User
    csrf_token: str
    created_at: dt.datetime


def check_name(name: str) -> str:
    name = unicodedata.normalize("NFC", name.strip())
    if not name or len(name) > NAME_MAX_LENGTH:
        raise AccountError(f"a user name has 1 to {NAME_MAX_LENGTH} characters")
    if any(unicodedata.category(ch)[0] in "CZ" and ch != " " for ch in name) or "  " in name:
        raise AccountError("a user name has no control characters, tabs or line breaks")
    return name


def check_password(password: str) -> str:
    if len(password) < PASSWORD_MIN_LENGTH:
        raise AccountError(f"a password has at least {PASSWORD_MIN_LENGTH} characters")
    if password != password.strip("\r\n"):
        raise AccountError("a password does not start or end with a line break")
    return password


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# A user with their failure count (kept by name in console_login_failures, not in console_users).
_USER_COLUMNS = (
    "u.name, u.role, u.password_hash, u.language, u.created_at, u.last_login_at, u.disabled, "
    "COALESCE(f.failures, 0) AS failed_logins, f.locked_until"
)
_USERS = f"SELECT {_USER_COLUMNS} FROM console_users u LEFT JOIN console_login_failures f ON f.name = u.name"


def _user(row: sqlite3.Row) -> User:
    created = from_iso(row["created_at"])
    assert created is not None
    return User(
        name=row["name"],
        role=row["role"],
        language=row["language"] or "",
        created_at=created,
        failed_logins=int(row["failed_logins"] or 0),
        locked_until=from_iso(row["locked_until"]),
        last_login_at=from_iso(row["last_login_at"]),
        disabled=bool(row["disabled"]),
    )


class Accounts:
    def __init__(
        self,
        db: sqlite_utils.Database,
        *,
        max_failures: int = 5,
        lockout_s: float = 900.0,
        idle_s: float = 43200.0,
    ) -> None:
        if max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        self.db = db
        self.max_failures = max_failures
        self.lockout = dt.timedelta(seconds=lockout_s)
        self.idle = dt.timedelta(seconds=idle_s)

    # -- accounts ---------------------------------------------------------------------------------
    def add_user(self, name: str, role: str, password: str, *, now: dt.datetime) -> User:
        name = check_name(name)
        if role not in ROLES:
            raise AccountError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        encoded = HASHER.hash(check_password(password))
        try:
            with transaction(self.db) as conn:
                conn.execute(
                    "INSERT INTO console_users (name, role, password_hash, created_at) VALUES (?, ?, ?, ?)",
                    (name, role, encoded, iso(now)),
                )
        except sqlite3.IntegrityError:
            raise AccountError(f"user {name!r} exists already (use 'lastmile user passwd')") from None
        user = self.get(name)
        assert user is not None
        return user

    def set_password(self, name: str, password: str) -> None:
        """A new password; unlocks the account and ends its logins."""
        encoded = HASHER.hash(check_password(password))
        with transaction(self.db) as conn:
            cur = conn.execute("UPDATE console_users SET password_hash = ? WHERE name = ?", (encoded, name))
            if cur.rowcount == 0:
                raise AccountError(f"no user {name!r}")
            conn.execute("DELETE FROM console_login_failures WHERE name = ?", (name,))
            conn.execute("DELETE FROM console_logins WHERE user_name = ?", (name,))

    def get(self, name: str) -> User | None:
        row = self.db.conn.execute(f"{_USERS} WHERE u.name = ?", (name,)).fetchone()
        return _user(row) if row else None

    def users(self) -> list[User]:
        return [_user(r) for r in self.db.conn.execute(f"{_USERS} ORDER BY u.name")]

    def unlock(self, name: str) -> bool:
        if self.get(name) is None:
            return False
        with transaction(self.db) as conn:
            conn.execute("DELETE FROM console_login_failures WHERE name = ?", (name,))
        return True

    def set_disabled(self, name: str, disabled: bool) -> bool:
        """Disable (or re-enable) an account; disabling ends its logins."""
        with transaction(self.db) as conn:
            cur = conn.execute("UPDATE console_users SET disabled = ? WHERE name = ?", (int(disabled), name))
            if disabled:
                conn.execute("DELETE FROM console_logins WHERE user_name = ?", (name,))
        return cur.rowcount == 1

    def set_language(self, name: str, language: str) -> None:
        if language not in LANGUAGES:
            raise AccountError(f"language must be one of {', '.join(LANGUAGES)}")
        with transaction(self.db) as conn:
            conn.execute("UPDATE console_users SET language = ? WHERE name = ?", (language, name))

    # -- logging in -------------------------------------------------------------------------------
    def authenticate(self, name: str, password: str, *, now: dt.datetime) -> User:
        """The user, if the password is right and the account usable; LoginRefused otherwise.
        A name no account has is refused exactly as a real account's wrong password is (same hash
        cost, same count and writes, tries left, then locked), so typing names tells nothing."""
        try:
            name = check_name(name)
        except AccountError:
            name = name[: NAME_MAX_LENGTH + 1]  # no account has such a name; its count's row stays small
        row = self.db.conn.execute("SELECT * FROM console_users WHERE name = ?", (name,)).fetchone()
        failures, locked_until = self._failures_of(name)
        if locked_until is not None and locked_until > now:
            raise LoginRefused("account locked", locked_until)
        right = _verify(row["password_hash"] if row else _dummy_hash(), password)
        if row is None or not right or row["disabled"]:
            self._count_failure(name, failures, now)
        if HASHER.check_needs_rehash(row["password_hash"]):
            self._rehash(name, password)
        with transaction(self.db) as conn:
            conn.execute("DELETE FROM console_login_failures WHERE name = ?", (name,))
            conn.execute("UPDATE console_users SET last_login_at = ? WHERE name = ?", (iso(now), name))
        fresh = self.get(name)
        assert fresh is not None
        return fresh

    def _failures_of(self, name: str) -> tuple[int, dt.datetime | None]:
        """Wrong passwords in a row for `name` (any name typed) and until when it is locked."""
        row = self.db.conn.execute(
            "SELECT failures, locked_until FROM console_login_failures WHERE name = ?", (name,)
        ).fetchone()
        return (int(row["failures"]), from_iso(row["locked_until"])) if row else (0, None)

    def _count_failure(self, name: str, failed_logins: int, now: dt.datetime) -> NoReturn:
        """Count one more wrong password for `name` (the same write whether an account has it or
        not; past FAILURE_COUNTS_KEPT the oldest unknown names' counts go first) and refuse."""
        failures, locked_until = self._one_more_failure(failed_logins, now)
        with transaction(self.db) as conn:
            conn.execute(
                "INSERT INTO console_login_failures (name, failures, locked_until, failed_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET failures = excluded.failures, "
                "locked_until = excluded.locked_until, failed_at = excluded.failed_at",
                (name, failures, iso_or_none(locked_until), iso(now)),
            )
            # real accounts' counts sort first, so the trim takes the oldest unknown names: names
            # typed at random cannot push out (and so end) a real account's lock
            conn.execute(
                "DELETE FROM console_login_failures WHERE name IN (SELECT name FROM console_login_failures "
                "ORDER BY name IN (SELECT name FROM console_users) DESC, failed_at DESC LIMIT -1 OFFSET ?)",
                (FAILURE_COUNTS_KEPT,),
            )
        if locked_until is not None:
            log.warning("console login locked after %d failed logins", self.max_failures)
            raise LoginRefused("account locked", locked_until)
        raise LoginRefused("wrong name or password", attempts_left=self.max_failures - failures)

    def _one_more_failure(self, failed_logins: int, now: dt.datetime) -> tuple[int, dt.datetime | None]:
        """The failure count and lock after one more wrong password (the count restarts at a lock)."""
        failures = failed_logins + 1
        if failures >= self.max_failures:
            return 0, now + self.lockout
        return failures, None

    def _rehash(self, name: str, password: str) -> None:
        with transaction(self.db) as conn:
            conn.execute("UPDATE console_users SET password_hash = ? WHERE name = ?", (HASHER.hash(password), name))

    def start_login(self, user: User, *, now: dt.datetime) -> str:
        """A new login for `user`; returns the token for the cookie."""
        token = secrets.token_urlsafe(32)
        with transaction(self.db) as conn:
            conn.execute(
                "INSERT INTO console_logins (token_hash, user_name, csrf_token, created_at, last_seen_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (_token_hash(token), user.name, secrets.token_urlsafe(32), iso(now), iso(now)),
            )
            # Logins idle past their time are gone for good: no table of stale tokens on the card.
            conn.execute("DELETE FROM console_logins WHERE last_seen_at < ?", (iso(now - self.idle),))
        return token

    def login_for(self, token: str | None, *, now: dt.datetime) -> Login | None:
        """The live login behind a cookie's token, or None (unknown, idle too long, account
        disabled or locked)."""
        if not token or len(token) > 128:
            return None
        row = self.db.conn.execute(
            f"SELECT l.token_hash, l.csrf_token, l.created_at AS login_created_at, l.last_seen_at, {_USER_COLUMNS} "
            "FROM console_logins l JOIN console_users u ON u.name = l.user_name "
            "LEFT JOIN console_login_failures f ON f.name = u.name WHERE l.token_hash = ?",
            (_token_hash(token),),
        ).fetchone()
        if row is None:
            return None
        user = _user(row)
        last_seen = from_iso(row["last_seen_at"])
        created = from_iso(row["login_created_at"])
        assert last_seen is not None and created is not None
        if user.disabled or user.locked(now) or now - last_seen > self.idle:
            self.end_login(token)
            return None
        if now - last_seen >= TOUCH_EVERY:
            with transaction(self.db) as conn:
                conn.execute(
                    "UPDATE console_logins SET last_seen_at = ? WHERE token_hash = ?", (iso(now), row["token_hash"])
                )
        return Login(user, row["csrf_token"], created)

    def end_login(self, token: str) -> None:
        with transaction(self.db) as conn:
            conn.execute("DELETE FROM console_logins WHERE token_hash = ?", (_token_hash(token),))


def _verify(encoded: str, password: str) -> bool:
    try:
        return HASHER.verify(encoded, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
