"""The reference firmware's pure parts against the gateway side, and the shared codec under MicroPython."""

from __future__ import annotations

import ast
import datetime as dt
import json
import os
import subprocess
from pathlib import Path

import pytest

from devices.bridge import codec
from devices.bridge.session import BridgeSession, DeviceHello, DeviceLog, ObservationReady, SerialDataReceived
from firmware_bridge.firmware import bridge_core
from firmware_bridge.firmware.bridge_core import LINE_MAX, MAX_PENDING, RESEND_MS, BridgeCore
from tests.conftest import missing, require_tool

REPO = Path(__file__).resolve().parents[1]
NOW = dt.datetime(2025, 3, 4, 10, 0, tzinfo=dt.timezone.utc)
# Files that run on the board: they must stay within what MicroPython offers.
BOARD_FILES = [
    "devices/bridge/cobs.py",
    "devices/bridge/crc.py",
    "devices/bridge/codec.py",
    "firmware_bridge/firmware/bridge_core.py",
    "firmware_bridge/firmware/main.py",
]
BOARD_IMPORTS = {
    "struct",
    "binascii",
    "devices",
    "devices.bridge",
    "devices.errors",
    "devices.bridge.cobs",
    "devices.bridge.crc",
    "devices.bridge.codec",
    "bridge_core",
    "micropython",
    "os",
    "select",
    "sys",
    "time",
    "machine",
}


def _frames(data: bytes) -> list[codec.Message]:
    return [codec.decode_message(f) for f in codec.FrameReader().feed(data) if isinstance(f, codec.Frame)]


def test_board_files_use_only_what_micropython_has() -> None:
    for rel in BOARD_FILES:
        tree = ast.parse((REPO / rel).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "__future__", f"{rel}: no __future__ imports on the board"
                assert node.module in BOARD_IMPORTS, f"{rel}: imports {node.module}"
            elif isinstance(node, ast.Import):
                assert all(a.name in BOARD_IMPORTS for a in node.names), f"{rel}: imports {node.names[0].name}"
            elif isinstance(node, ast.JoinedStr):
                pytest.fail(f"{rel}:{node.lineno}: f-strings are optional in MicroPython builds")
            elif isinstance(node, ast.ClassDef):
                assert not node.decorator_list, f"{rel}: no class decorators (dataclasses) on the board"


def test_hello_exchange_acks_and_resends_with_the_same_seq() -> None:
    core = BridgeCore("BR-5", boot_id=0xBEEF)
    session = BridgeSession("/dev/ttyACM0")
    greeting = session.connection_made(NOW)
    reply = core.receive(greeting, now_ms=0)
    events = session.receive_data(reply, NOW)
    assert isinstance(events[0], DeviceHello) and events[0].boot_id == 0xBEEF
    core.receive(session.data_to_send(), now_ms=1)  # ACK of HELLO + TIME_SYNC
    assert core.pending_count == 0
    assert core.time_stamp(1)[0] == codec.TIME_SYNCED

    sent = core.measurement("spo2", (codec.MeasuredValue("spo2", 98.0, "%"),), now_ms=10)
    seq = core.pending_seqs()[0]
    assert core.poll(10 + RESEND_MS - 1) == b""  # not yet due
    again = core.poll(10 + RESEND_MS)
    assert again == sent  # resent verbatim: same sequence number
    first = session.receive_data(sent, NOW)
    dup = session.receive_data(again, NOW)
    assert len(first) == 1 and dup == []  # the gateway drops the duplicate
    core.receive(session.acknowledge(seq), now_ms=20)
    assert core.pending_count == 0
    # After the ACK, a late duplicate is re-acknowledged at once by the gateway.
    session.receive_data(sent, NOW)
    assert _frames(session.data_to_send()) == [codec.Ack(seq)]


def test_refused_messages_back_off_and_others_are_dropped() -> None:
    core = BridgeCore("BR-6", boot_id=1)
    core.log(20, "hi", 0)
    core.measurement("x", (codec.MeasuredValue("a", 1.0, "1"),), 0)
    refused, malformed = core.pending_seqs()
    gateway = BridgeSession("g")
    core.receive(gateway.reject(refused, codec.NACK_REFUSED) + gateway.reject(malformed, codec.NACK_MALFORMED), 100)
    assert core.pending_seqs() == [refused]
    assert core.poll(100 + RESEND_MS) == b""  # the interval doubled
    assert core.poll(100 + 2 * RESEND_MS) != b""


def test_gateway_hello_gets_hello_and_everything_unacknowledged() -> None:
    core = BridgeCore("BR-7", boot_id=2)
    pending = core.uart_bytes(b"LINE 1\r\nLINE 2\r\n", 0)
    out = core.receive(BridgeSession("g").connection_made(NOW), 50)
    messages = _frames(out)
    assert isinstance(messages[0], codec.Hello)
    assert [m.data for m in messages[1:]] == [b"LINE 1\r\n", b"LINE 2\r\n"]
    assert out.endswith(pending)  # same frames, same sequence numbers


def test_line_forwarding_and_bounds() -> None:
    core = BridgeCore("BR-8", boot_id=3)
    session = BridgeSession("g")
    out = core.uart_bytes(b"NIBP 120/80", 0) + core.uart_bytes(b" mmHg\r\nPUL", 1)
    data = [e.data for e in session.receive_data(out, NOW) if isinstance(e, SerialDataReceived)]
    assert data == [b"NIBP 120/80 mmHg\r\n"]
    assert [m.data for m in _frames(core.uart_idle(2))] == [b"PUL"]
    long = core.uart_bytes(b"x" * (LINE_MAX * 2 + 5), 3)
    assert [len(m.data) for m in _frames(long)] == [LINE_MAX, LINE_MAX]
    for i in range(MAX_PENDING + 10):
        core.log(20, str(i), 4)
    assert core.pending_count == MAX_PENDING and core.dropped > 0


# -- the same files under real MicroPython -------------------------------------------------------

MPY_PACKAGE = "@micropython/micropython-webassembly-pyscript"
RUNNER = r"""
import { loadMicroPython } from "%(module)s";
import fs from "node:fs";
const [,, root, script] = process.argv;
let out = "";
const mp = await loadMicroPython({ stdout: (t) => { out += t + "\n"; }, stderr: (t) => { out += t + "\n"; } });
for (const d of ["/lib", "/lib/devices", "/lib/devices/bridge"]) mp.FS.mkdir(d);
const files = {"/lib/devices/__init__.py": "devices/__init__.py", "/lib/devices/errors.py": "devices/errors.py",
  "/lib/devices/bridge/__init__.py": "devices/bridge/__init__.py", "/lib/devices/bridge/cobs.py": "devices/bridge/cobs.py",
  "/lib/devices/bridge/crc.py": "devices/bridge/crc.py", "/lib/devices/bridge/codec.py": "devices/bridge/codec.py",
  "/lib/bridge_core.py": "firmware_bridge/firmware/bridge_core.py"};
for (const [dst, src] of Object.entries(files)) mp.FS.writeFile(dst, fs.readFileSync(root + "/" + src));
try { mp.runPython("import sys\nsys.path.insert(0, '/lib')\n" + fs.readFileSync(script, "utf8")); }
catch (e) { out += "EXCEPTION " + e + "\n"; }
process.stdout.write(out);
"""
# Runs on both interpreters; prints one JSON line of hex strings to compare.
SCENARIO = r"""
import sys
from devices.bridge import codec
import bridge_core
core = bridge_core.BridgeCore("BR-MPY", 0x01020304, capabilities=("serial-forward", "ecg"))
out = [core.hello(0)]
out.append(core.uart_bytes(b"NIBP 121/79 (93) mmHg\r\nTEMP 36.8 C\r\npartial", 5))
out.append(core.measurement("blood-pressure", (codec.MeasuredValue("systolic", 121.0, "mm[Hg]"),
                                               codec.MeasuredValue("diastolic", None, "mm[Hg]", "nres")), 6, "r1"))
out.append(codec.encode_message(codec.EcgStart(1, 2, 1717171717000, 500, 2.5, ("I", "II")), 9))
out.append(codec.encode_message(codec.EcgBlock(1, 25, 2, bytes(range(100))), 10))
ack = codec.encode_message(codec.Ack(1), 0) + codec.encode_message(codec.TimeSync(1717171717000), 1)
out.append(core.receive(b"garbage\x00" + ack, 100))
out.append(core.measurement("spo2", (codec.MeasuredValue("spo2", 97.0, "%"),), 200))
out.append(core.poll(100000))
decoded = [repr(codec.decode_message(f)) for f in codec.FrameReader().feed(b"".join(out)) if isinstance(f, codec.Frame)]
print("RESULT " + repr(["".join("%02x" % b for b in o) for o in out]))
print("DECODED %d" % len(decoded))
"""


def _micropython_module() -> Path:
    """micropython.mjs as scripts/fetch-test-assets installs it (npm, pinned in tests/npm), or from
    the folder named by LASTMILE_MICROPYTHON_WASM."""
    folder = Path(os.environ.get("LASTMILE_MICROPYTHON_WASM") or REPO / "tests" / "npm" / "node_modules" / MPY_PACKAGE)
    module = folder / "micropython.mjs"
    if not module.is_file():
        missing(
            f"MicroPython (npm {MPY_PACKAGE}) is not installed in {folder}: "
            "run scripts/fetch-test-assets (scripts/test.sh does)"
        )
    return module


def test_codec_and_core_give_the_same_bytes_under_micropython(tmp_path: Path) -> None:
    module = _micropython_module()
    node = require_tool("node")
    runner = tmp_path / "run.mjs"
    runner.write_text(RUNNER % {"module": module.as_uri()})
    script = tmp_path / "scenario.py"
    script.write_text(SCENARIO)
    result = subprocess.run(
        [node, str(runner), str(REPO), str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("RESULT", "DECODED")))
    assert "RESULT" in lines, result.stdout + result.stderr
    # The same scenario under CPython.
    import io
    import sys as _sys

    saved = _sys.stdout
    _sys.stdout = io.StringIO()
    try:
        _sys.modules.setdefault("bridge_core", bridge_core)
        exec(SCENARIO, {})
        cpython = dict(line.split(" ", 1) for line in _sys.stdout.getvalue().splitlines())
    finally:
        _sys.stdout = saved
    assert lines["RESULT"] == cpython["RESULT"]
    assert lines["DECODED"] == cpython["DECODED"] == "11"
    json.dumps(lines)  # plain strings only


def test_a_new_frame_under_a_sequence_number_already_seen_is_not_taken_for_a_resend() -> None:
    """A resend is the same frame, byte for byte (the firmware keeps the frame it sent); a different frame under a
    number the gateway has seen is new. Two ways a bridge sends one: main.py's last words after a
    crash (a fresh BridgeCore: seq 0, the number of this boot's HELLO), and a bridge on a plain
    UART that restarts while its new HELLO is lost on the line (its numbers start at 0 again). The
    gateway dropped both as duplicates - and re-ACKed the reading it never stored, so the bridge
    forgot it: a reading lost, and the crash report never reached the journal."""
    core = BridgeCore("BR-8", boot_id=0x11)
    session = BridgeSession("/dev/ttyUSB0")
    session.receive_data(core.receive(session.connection_made(NOW), 0), NOW)  # HELLO, seq 0
    core.receive(session.data_to_send(), 2)
    session.receive_data(core.measurement("spo2", (codec.MeasuredValue("spo2", 97.0, "%"),), 3), NOW)
    (seq,) = core.pending_seqs()
    core.receive(session.acknowledge(seq), 4)
    assert core.pending_count == 0

    last_words = BridgeCore("unknown", 0).log(40, "firmware crashed: MemoryError()", 0)
    assert session.receive_data(last_words, NOW) == [DeviceLog(40, "firmware crashed: MemoryError()")]
    assert _frames(session.data_to_send()) == [codec.Ack(0)]  # to the board that is gone

    rebooted = BridgeCore("BR-8", boot_id=0x12)
    rebooted.hello(10)  # lost on the line
    reading = rebooted.measurement("spo2", (codec.MeasuredValue("spo2", 88.0, "%"),), 11)
    events = session.receive_data(reading, NOW)
    assert [type(e) for e in events] == [ObservationReady]
    assert events[0].observation.quantities[0].value == 88.0
    rebooted.receive(session.data_to_send(), 12)
    assert rebooted.pending_seqs() == [0, 1]  # nothing acknowledged that was not stored
