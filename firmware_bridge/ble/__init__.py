"""Bluetooth LE transport: the bleak-based device manager (`link`) and, only when asked for,
an in-process emulation of the radio and of health devices (`emulation`,
`emulated_peripherals`; they need the optional `bumble` package, the `emulation` extra)."""
