"""The mutation bench's coverage map (bench/mutation.py): a mutant runs only against the tests
the baseline saw reach its lines, so a test the map leaves out can never kill it. A function
behind functools.cache runs its body for the first test that calls it and answers the others
from the cache: without emptying the caches between tests, only that first test would be known
to reach the body, and a mutant there could survive every other test that checks it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from bench.mutation import Recorder, clear_caches

CACHED_MODULE = """
import functools


@functools.cache
def table(n):
    return [k * k for k in range(n)]


class Holder:
    @staticmethod
    @functools.lru_cache(maxsize=4)
    def scale(x):
        return 2 * x
"""


class FakeItem:
    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid


def load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str):
    path = tmp_path / f"{name}.py"
    path.write_text(CACHED_MODULE)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module, path


def run_as_test(recorder: Recorder, nodeid: str, body) -> None:
    """What pytest does around one test with the recorder registered: its hook wrapper, and the
    trace the baseline installs."""
    wrapper = recorder.pytest_runtest_protocol(FakeItem(nodeid), None)
    next(wrapper)
    previous = sys.gettrace()
    sys.settrace(recorder.trace)
    try:
        body()
    finally:
        sys.settrace(previous)
    with pytest.raises(StopIteration):
        next(wrapper)


def test_every_test_that_calls_a_cached_function_is_known_to_reach_its_body(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, path = load(tmp_path, monkeypatch, "lm_bench_cached_a")
    body_line = CACHED_MODULE.splitlines().index("    return [k * k for k in range(n)]") + 1
    recorder = Recorder(str(path), module.__name__)
    run_as_test(recorder, "first", lambda: module.table(5))
    run_as_test(recorder, "second", lambda: module.table(5))
    assert body_line in recorder.lines["first"] and body_line in recorder.lines["second"]


def test_without_the_module_named_the_second_caller_is_invisible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blind spot itself, so that the test above cannot pass for another reason."""
    module, path = load(tmp_path, monkeypatch, "lm_bench_cached_b")
    body_line = CACHED_MODULE.splitlines().index("    return [k * k for k in range(n)]") + 1
    recorder = Recorder(str(path))
    run_as_test(recorder, "first", lambda: module.table(5))
    run_as_test(recorder, "second", lambda: module.table(5))
    assert body_line in recorder.lines["first"] and body_line not in recorder.lines.get("second", set())


def test_caches_in_classes_are_emptied_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module, _ = load(tmp_path, monkeypatch, "lm_bench_cached_c")
    module.table(3)
    module.Holder.scale(2)
    assert clear_caches(module) == 2
    assert module.table.cache_info().currsize == 0 and module.Holder.scale.cache_info().currsize == 0
