"""tests/waiting.py's wait_for: what its timeout says when a wait in CI fails."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.waiting import wait_for


def test_a_timeout_says_the_values_seen_with_their_times_not_only_the_last() -> None:
    """A wait that failed in CI said only "last: False": whether the value never changed, or went
    True-ish-then-back, or went through a server error first, was not in the log. Now the message
    lists the last changes seen (bounded), each with when it was seen, and how many came before."""
    seen: Iterator[object] = iter([0, 0, None, ConnectionRefusedError("starting"), "", [], False, 0.0, 0.0])

    def condition() -> object:
        value = next(seen, {})
        if isinstance(value, Exception):
            raise value
        return value

    with pytest.raises(AssertionError) as failed:
        wait_for(condition, 0.3, what="the page", interval=0.01, tolerate=(ConnectionRefusedError,))
    message = str(failed.value)
    assert message.startswith("the page not met within 0.3 s"), message
    changes = re.findall(r"\+(\d+\.\d\d) s: ([^;]+?)(?=, \+|; |$)", message)
    assert [value for _at, value in changes] == ["''", "[]", "False", "0.0", "{}"], message
    assert [float(at) for at, _value in changes] == sorted(float(at) for at, _value in changes), message
    assert "3 earlier changes not shown" in message, message
    assert message.endswith("last: {}"), message


class NotYet:
    """A falsy value with a long repr, as a page's whole text would be."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NotYet(" + "x" * 10_000 + ")"


def test_a_long_value_is_cut_in_the_message() -> None:
    """A page's whole text as the value must not make a CI log line of megabytes."""
    with pytest.raises(AssertionError) as failed:
        wait_for(NotYet, 0.05, what="the text")
    message = str(failed.value)
    assert len(message) < 600 and "NotYet(xxx" in message, message
