# Lastmile reference bridge firmware: MicroPython on an RP2040 board (e.g. Raspberry Pi Pico).
#
# Forwards the report lines of a legacy RS-232 device (through a MAX3232 level shifter on
# UART0, GP0 = TX, GP1 = RX) to the gateway over USB-CDC, framed by the bridge protocol
# (docs/bridge-protocol.md). Everything protocol-related lives in bridge_core.py and the shared
# codec (devices/bridge/), which the gateway's tests run under CPython; this file is only the
# board glue: pins, the USB serial stream, the clock and the LED. See README.md for deployment.
#
# Nothing may print(): the USB-CDC port is the protocol stream (a stray traceback is garbage
# the gateway skips, but it costs the frame around it).

import os
import select
import sys
import time

import machine
import micropython
from bridge_core import BridgeCore

UART_ID = 0
UART_TX_PIN = 0
UART_RX_PIN = 1
UART_BAUD = 9600  # the legacy device's speed (8N1)
UART_IDLE_MS = 2000  # a last line without a line end is forwarded after this much silence
POLL_MS = 20


class Clock:
    """Milliseconds since boot that do not wrap (time.ticks_ms wraps after ~12 days)."""

    def __init__(self):
        self.last = time.ticks_ms()
        self.ms = 0

    def now(self):
        t = time.ticks_ms()
        self.ms += time.ticks_diff(t, self.last)
        self.last = t
        return self.ms


def hexlify(data):
    return "".join("%02X" % b for b in data)


def main():
    micropython.kbd_intr(-1)  # 0x03 in a frame must not raise KeyboardInterrupt
    led = machine.Pin("LED", machine.Pin.OUT)
    uart = machine.UART(
        UART_ID, baudrate=UART_BAUD, tx=machine.Pin(UART_TX_PIN), rx=machine.Pin(UART_RX_PIN), rxbuf=4096
    )
    usb_in = sys.stdin.buffer
    usb_out = sys.stdout.buffer
    clock = Clock()
    boot_id = int.from_bytes(os.urandom(4), "little")
    core = BridgeCore(hexlify(machine.unique_id()), boot_id, capabilities=("serial-forward", "time-sync"))
    poller = select.poll()
    poller.register(usb_in, select.POLLIN)
    poller.register(uart, select.POLLIN)
    usb_out.write(core.hello(clock.now()))
    last_uart = clock.now()
    while True:
        out = b""
        for obj, _event in poller.poll(POLL_MS):
            now = clock.now()
            if obj is uart:
                data = uart.read()
                if data:
                    last_uart = now
                    led.toggle()
                    out += core.uart_bytes(data, now)
            else:
                # Drain what the gateway sent (ACK, NACK, TIME_SYNC, HELLO) byte by byte while
                # stdin stays readable: it offers no "bytes available" count.
                incoming = usb_in.read(1)
                while len(incoming) < 512 and any(o is not uart for o, _ in poller.poll(0)):
                    incoming += usb_in.read(1)
                out += core.receive(incoming, now)
        now = clock.now()
        if time.ticks_diff(now, last_uart) > UART_IDLE_MS:
            out += core.uart_idle(now)
            last_uart = now
        out += core.poll(now)
        if out:
            usb_out.write(out)


try:
    main()
except Exception as exc:  # noqa: BLE001 — last words for the gateway's log, then restart clean
    try:
        sys.stdout.buffer.write(BridgeCore("unknown", 0).log(40, "firmware crashed: %r" % (exc,), 0))
    finally:
        machine.reset()
