"""Reference bridge firmware (MicroPython, RP2040). Only `bridge_core` is importable on CPython:
`main.py` needs the board's `machine` module. See README.md in this folder."""
