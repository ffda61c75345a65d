"""How bytes move: serial links, BLE, USB-storage imports, hot-plug, the bridge link."""
