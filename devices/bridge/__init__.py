"""The bridge protocol: framed messages between a microcontroller bridge and the gateway.

`cobs`, `crc` and `codec` also run on the bridge itself (MicroPython), so this package's
`__init__` imports nothing: importing `devices.bridge.codec` on a board must not pull in numpy.
The gateway side lives in `protocol` (sans-I/O state machine), `ecg_stream` and `session`.
"""
