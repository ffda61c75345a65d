"""The clinic configurations the image tests put on the boot partition: one with no link to the county
(nothing listens), and one whose reading center is reached through qemu's user-mode network."""

WATCHED = "/var/lib/lastmile/import"
CLINIC_CONFIG = f"""\
# A clinic's configuration, as a county technician copies it to lastmile/ on the boot partition.
[gateway]
id = "boot-test-gw"   # at most 16 bytes: it is the DICOM StationName too
institution = "Boot test village clinic"

[reading_center]
host = "127.0.0.1"   # nothing listens: the gateway keeps the study queued, as with no link
port = 11112
called_ae = "COUNTY_PACS"

[usb_import]
folders = ["{WATCHED}"]
"""
# The reading center as the gateway sees it through qemu's user-mode network (restrict=on: only
# these two forwards exist): the PACS at a fixed guest-side address, carried by tests/system/
# tcp_relay.py to the test's Orthanc on host loopback; Orthanc's storage-commitment report comes
# back through a host-loopback port forwarded to the gateway's listener (slirp's 10.0.2.2 calls it).
PACS_ADDRESS = "10.0.2.100"
PACS_PORT = 4242
GATEWAY_AE = "BOOT_TEST_GW"
NETWORKED_CONFIG = f"""\
# A clinic with a link to the county reading center.
[gateway]
id = "boot-test-gw"
institution = "Boot test village clinic"

[reading_center]
host = "{PACS_ADDRESS}"
port = {PACS_PORT}
called_ae = "READING_CENTER"
calling_ae = "{GATEWAY_AE}"
report_networks = ["10.0.2.2/32"]   # qemu's gateway address: where the forwarded reports come from

[ecg]
re_record_hold_s = 0   # the test ECG goes out whatever its quality verdict ...

[patient]
unassigned_ecg_hold_s = 0   # ... and with no patient checked in (the doctor is not in this test)

[usb_import]
folders = ["{WATCHED}"]
"""
