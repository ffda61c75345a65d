"""What a device service's process (acquire, ble) does first: modules it never uses kept out or
deferred, and glibc's allocator tuned and trimmed, to stay in its memory goal on a 512 MB Pi.

    prepare_device_process()  # first thing, before pydicom and sqlite-utils are imported
    ...
    trim = HeapTrim()
    trim.maybe(time.monotonic())  # in the service's step: free heap pages go back now and then
"""

from __future__ import annotations

from typing import Any

# pydicom 3 imports pydicom.examples -> pydicom.data -> its test-file downloader, which imports
# requests and tqdm when they are installed (the forward service needs requests for FHIR). The
# acquire process sends nothing over HTTP and downloads no test files: ~4.5 MB of RSS it never
# uses, found by bench/soak.py (acquire at 65 MB with the LAN receiver, over the 64 MB goal).
NOT_IN_DEVICE_PROCESSES = ("requests", "tqdm")
# sqlite-utils imports dateutil's parser for its command line's date recipes (sqlite_utils.recipes),
# which no service calls: deferred, its code (and dateutil.tz, relativedelta, six) loads only if
# one ever is. ~1 MB of acquire's RSS (bench/soak.py with the BLE part then in acquire).
DEFERRED_IN_DEVICE_PROCESSES = ("dateutil.parser",)


def prepare_device_process() -> None:
    """Call first thing in a device service's process (acquire, ble), before pydicom and sqlite-utils
    are imported."""
    import sys

    for name in NOT_IN_DEVICE_PROCESSES:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    for name in DEFERRED_IN_DEVICE_PROCESSES:
        defer_import(name)
    GLIBC_MALLOC.tune(arenas=MALLOC_ARENAS, mmap_threshold=MMAP_THRESHOLD)


def defer_import(name: str) -> None:
    """Import `name` lazily: a module object now, its code run at the first use of one of its
    attributes (importlib.util.LazyLoader). Nothing if it is imported already or not installed."""
    import importlib.util
    import sys

    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    parent, _, child = name.rpartition(".")
    if parent:
        # `from parent import child` must find it as an attribute: otherwise the import system
        # looks it up again, touching the module, and Python 3.11 then loads it there and then
        setattr(sys.modules[parent], child, module)


# glibc gives each thread that allocates its own malloc arena (up to 8 per core), and an arena
# rarely hands freed memory back: the LAN receiver's association threads, the serial link's and
# the BLE loop's each kept one. And glibc raises its mmap threshold to the size of each large
# block freed, so after the first ECG's quality check the next ones' arrays (~1.5 MB) came from
# the heap and stayed there. Two arenas, a fixed threshold and a trim now and then took ~2 MB
# off acquire's RSS with the serial bridge and the LAN receiver (bench/soak.py). The trim comes
# soon after each ECG: decoding, checking and building one leaves ~1.3 MB of free heap pages,
# which a trim a minute later left resident meanwhile (a trim with nothing to give back: ~25 µs).
MALLOC_ARENAS = 2
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, kept: larger blocks are mapped and unmapped
TRIM_EVERY_S = 2.0  # how often free heap pages go back to the system
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt() parameter numbers


class GlibcMalloc:
    """glibc's allocator tuning, through ctypes; does nothing on another C library."""

    def __init__(self) -> None:
        self._libc: Any = None
        self._loaded = False

    def _lib(self) -> Any:
        if not self._loaded:
            self._loaded = True
            import ctypes

            try:
                libc = ctypes.CDLL("libc.so.6")
                if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):
                    self._libc = libc
            except OSError:
                pass  # not glibc (musl, another system): nothing to tune
        return self._libc

    def tune(self, *, arenas: int, mmap_threshold: int) -> bool:
        """Before the process starts its threads; True if glibc took both settings."""
        libc = self._lib()
        if libc is None:
            return False
        took_arenas = libc.mallopt(M_ARENA_MAX, arenas) == 1
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and took_arenas)

    def trim(self) -> None:
        """Give free pages at the top and in the middle of every arena back to the system."""
        libc = self._lib()
        if libc is not None:
            libc.malloc_trim(0)


GLIBC_MALLOC = GlibcMalloc()


class HeapTrim:
    """A service step's malloc trim, at most every TRIM_EVERY_S: what an ECG's decoding or a
    reading's handling freed goes back to the system soon after, not a minute later."""

    def __init__(self, now: float, *, every_s: float = TRIM_EVERY_S, malloc: GlibcMalloc = GLIBC_MALLOC) -> None:
        self.every_s = every_s
        self.malloc = malloc
        self.last = now

    def maybe(self, now: float) -> bool:
        """Trim if the last trim is at least `every_s` old; True if it did."""
        if now - self.last < self.every_s:
            return False
        self.last = now
        self.malloc.trim()
        return True
