"""Bluetooth SIG health profiles: pure decoders of characteristic values (sans-I/O).

`registry.decode(uuid16, data)` decodes any characteristic we know; measurement characteristics
give a `measurement.Measurement`, which `measurement.to_observation` turns into a
`devices.observation.Observation` once the caller knows the device, the time and the patient.
"""
