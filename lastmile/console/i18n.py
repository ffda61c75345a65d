"""Chinese first, English second: the language of a page, its catalog, dates and numbers.

Which language: the user's own choice (stored with the account), else the browser's
Accept-Language, else `console.language` (zh-CN by default). Source strings are English; the
zh_CN catalog (`locale/zh_CN/LC_MESSAGES/console.po`) is made with Babel (`scripts/i18n.sh`
extracts, updates and compiles) and its compiled `.mo` is committed beside it, so an install
from the repository has it without a build step; tests/test_console_i18n.py fails when the
committed `.mo` no longer matches its `.po` or a page string is missing from the catalog.

Dates and times are shown in the clinic's zone (`lastmile.clock.local_zone()`) and the page's
locale (CLDR through Babel): 14:05 / 2:05 PM, 12月1日 / Dec 1.
"""

from __future__ import annotations

import datetime as dt
import gettext
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from babel import Locale
from babel.dates import format_date, format_datetime, format_skeleton, format_time, format_timedelta
from babel.numbers import format_decimal

LOCALE_DIR = Path(__file__).with_name("locale")
DOMAIN = "console"
LANGUAGES = ("zh-CN", "en")  # first: the default when nothing else says
_CATALOG = {"zh-CN": "zh_CN", "en": "en"}
_BABEL = {"zh-CN": "zh_Hans_CN", "en": "en"}
LANGUAGE_NAMES = {"zh-CN": "中文", "en": "English"}


def N_(message: str) -> str:
    """Marks a string for the catalog where it is defined; translated where it is shown."""
    return message


@cache
def translations(language: str) -> gettext.NullTranslations:
    if language == "en":
        return gettext.NullTranslations()  # the source strings are English
    return gettext.translation(DOMAIN, LOCALE_DIR, languages=[_CATALOG[language]])


def negotiate(accept_language: str | None, default: str = "zh-CN") -> str:
    """The best of our languages for an Accept-Language header: any Chinese variant gets the
    simplified page (the only Chinese we have), any English gets English."""
    best: tuple[float, int, str] | None = None
    for position, part in enumerate((accept_language or "").split(",")):
        tag, _, params = part.strip().partition(";")
        tag = tag.strip().lower()
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality <= 0:
            continue
        language = "zh-CN" if tag.split("-")[0] == "zh" else "en" if tag.split("-")[0] == "en" else None
        if language is None:
            continue
        candidate = (-quality, position, language)
        if best is None or candidate < best:
            best = candidate
    return best[2] if best else default


@dataclass(frozen=True)
class Localizer:
    """Everything a page needs to speak one language in the clinic's zone."""

    language: str
    zone: dt.tzinfo
    now: Callable[[], dt.datetime] = field(default=lambda: dt.datetime.now(dt.timezone.utc))

    @property
    def locale(self) -> Locale:
        return _locale(self.language)

    def gettext(self, message: str, /, **values: object) -> str:
        text = translations(self.language).gettext(message)
        return text % values if values else text

    def ngettext(self, singular: str, plural: str, n: int, /, **values: object) -> str:
        text = translations(self.language).ngettext(singular, plural, n)
        return text % {"n": n, **values}

    def local(self, value: dt.datetime) -> dt.datetime:
        return value.astimezone(self.zone)

    def time(self, value: dt.datetime | None) -> str:
        return "" if value is None else format_time(self.local(value), "short", locale=self.locale)

    def date(self, value: dt.datetime | dt.date | None) -> str:
        if value is None:
            return ""
        if isinstance(value, dt.datetime):
            value = self.local(value).date()
        return format_date(value, "medium", locale=self.locale)

    def when(self, value: dt.datetime | None) -> str:
        """A time of today as 14:05; of another day with its date (12月1日 14:05 / Dec 1, 14:05)."""
        if value is None:
            return ""
        local = self.local(value)
        if local.date() == self.local(self.now()).date():
            return self.time(value)
        skeleton = "MMMd" if local.year == self.local(self.now()).year else "yMMMd"
        return f"{format_skeleton(skeleton, local, locale=self.locale)} {self.time(value)}"

    def full(self, value: dt.datetime | None) -> str:
        """Date and time with the zone's offset, for the record (2026年12月1日 14:05:07 +08:00)."""
        if value is None:
            return ""
        local = self.local(value)
        return f"{format_datetime(local, 'medium', locale=self.locale)} {local.strftime('%z')[:3]}:{local.strftime('%z')[3:]}"

    def ago(self, value: dt.datetime | None) -> str:
        if value is None:
            return ""
        return format_timedelta(value - self.now(), add_direction=True, locale=self.locale, threshold=1.0)

    def number(self, value: float | int | None, digits: int = 0) -> str:
        if value is None:
            return ""
        pattern = "#,##0" + ("." + "0" * digits if digits else "")
        return format_decimal(value, format=pattern, locale=self.locale)

    def iso(self, value: dt.datetime | None) -> str:
        """For <time datetime=...>: machine-readable, in the clinic's zone."""
        return "" if value is None else self.local(value).isoformat(timespec="seconds")


@cache
def _locale(language: str) -> Locale:
    return Locale.parse(_BABEL[language])
