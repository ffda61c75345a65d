"""`lastmile doctor`'s Bluetooth check: a clinic that uses BLE devices needs a radio.

The BLE service stays up without one (a Pi without Bluetooth, a USB dongle left out, the adapter
blocked by rfkill) and says so only in its systemd status, so the cuff's readings silently stop.
When BLE is enabled and devices are paired (`lastmile ble pair`), no usable adapter in the
kernel's Bluetooth class is a WARN with what to do; without paired devices no radio is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lastmile.doctor import Doctor, Finding

BLUETOOTH_CLASS = Path("/sys/class/bluetooth")  # hci0, hci1 ...: the adapters the kernel has
NO_RADIO_HINT = (
    "fit or plug in the Bluetooth adapter (USB dongle; lastmile-ble keeps trying and finds it), or if "
    "it is there `rfkill unblock bluetooth`; then `lastmile ble scan` should list the devices"
)


def adapters(bluetooth_class: Path) -> tuple[list[str], list[str]]:
    """(usable adapters, adapters blocked by rfkill) by name."""
    found = sorted(p for p in bluetooth_class.glob("hci*") if p.is_dir()) if bluetooth_class.is_dir() else []

    def blocked(adapter: Path) -> bool:
        for switch in adapter.glob("rfkill*"):
            for kind in ("soft", "hard"):
                try:
                    if (switch / kind).read_text().strip() == "1":
                        return True
                except OSError:
                    continue
        return False

    stopped = [p.name for p in found if blocked(p)]
    return [p.name for p in found if p.name not in stopped], stopped


def paired_ble_devices(doctor: Doctor) -> list[str]:
    """The allow-listed BLE devices' names (addresses when unnamed), as the doctor read clinic.db."""
    return [r.name or r.address for r in doctor.device_records() or [] if r.allowed and r.transport == "ble"]


def check_bluetooth(doctor: Doctor) -> list[Finding]:
    from lastmile.doctor import Finding, Level

    if not doctor.config.ble.enabled:
        return [Finding("bluetooth", Level.OK, "BLE is off (ble.enabled = false): no radio needed")]
    paired = paired_ble_devices(doctor)
    if not paired:
        return [Finding("bluetooth", Level.OK, "no BLE devices paired: no radio needed")]
    usable, blocked = adapters(BLUETOOTH_CLASS)
    devices = f"{len(paired)} paired BLE device(s) ({', '.join(sorted(paired)[:3])})"
    if usable:
        return [Finding("bluetooth", Level.OK, f"Bluetooth adapter {', '.join(usable)} for {devices}")]
    radio = f"Bluetooth adapter {', '.join(blocked)} blocked by rfkill" if blocked else "no Bluetooth adapter"
    return [Finding("bluetooth", Level.WARN, f"{radio}: {devices} cannot be read", NO_RADIO_HINT)]
