"""A/B updates (issue 18 item 4): the pieces that run without the whole image.

- Bundles: image/rauc/make-bundle signs a root filesystem image with a county signing certificate
  (image/rauc/make-test-pki: a throwaway CA); real `rauc` with the gateway's own system.conf
  accepts it, gives back the very bytes, and refuses one from another CA, one signed by a
  certificate not issued for code signing, and one whose payload was changed after signing.
- Slot choice and rollback: image/rauc/boot.cmd run by real U-Boot (u-boot-qemu's qemu_arm64 under
  qemu-system-aarch64 -M virt) on a small card laid out as the A/B image (p1 boot vfat, p2 slot A,
  p3 slot B, p4 data). The slots' "kernels" are not kernels: booti refuses them, which is a failed
  try, and the script resets (qemu -no-reboot: the process ends). Each boot's choice is read from
  its console; between boots lastmile-ab.env is read and edited with fw_printenv/fw_setenv (libubootenv),
  what RAUC's uboot backend runs on the gateway, so the two sides are checked against each other.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.system.ab_card import (
    DISK_ID,
    ENV_SIZE,
    FW_ENV,
    GOOD_TRIES,
    INSTALL_TRIES,
    RAUC_DIR,
    SYSTEM_CONF,
    Card,
    run,
    state_copy,
)

# -- bundles -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("openssl")
    out = tmp_path_factory.mktemp("pki")
    run(RAUC_DIR / "make-test-pki", out / "county")
    run(RAUC_DIR / "make-test-pki", out / "elsewhere", "Another county")
    return out


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small root filesystem image (random content: squashfs cannot shrink it to nothing)."""
    require_tool("mkfs.ext4")
    work = tmp_path_factory.mktemp("rootfs")
    tree = work / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "lastmile-release").write_text("0.2.0\n")
    (tree / "noise").write_bytes(os.urandom(200_000))
    image = work / "rootfs.ext4"
    run("mkfs.ext4", "-q", "-d", tree, "-L", "LM-ROOT", image, "8M")
    return image


def make_bundle(rootfs: Path, pki: Path, out: Path, *, signer: str = "county", keyring: str = "county") -> Path:
    for tool in ("rauc", "mksquashfs"):
        require_tool(tool)
    run(
        RAUC_DIR / "make-bundle",
        rootfs,
        "0.2.0",
        pki / signer / "signing.cert.pem",
        pki / signer / "signing.key.pem",
        pki / keyring / "ca.cert.pem",
        out,
    )
    return out


def rauc(*args: str | Path, keyring: Path) -> subprocess.CompletedProcess[str]:
    return run("rauc", "--conf", SYSTEM_CONF, *args, "--keyring", keyring, check=False)


@pytest.fixture(scope="module")
def bundle(rootfs: Path, pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(rootfs, pki, tmp_path_factory.mktemp("bundle") / "update.raucb")


def test_a_bundle_signed_for_the_county_is_accepted_and_holds_the_root_image(
    bundle: Path, rootfs: Path, pki: Path, tmp_path: Path
) -> None:
    info = rauc("info", bundle, keyring=pki / "county" / "ca.cert.pem")
    assert info.returncode == 0, info.stderr
    assert "Compatible: \t'lastmile-gateway-arm64'" in info.stdout
    assert "Version:    \t'0.2.0'" in info.stdout
    assert "Bundle Format: \tverity" in info.stdout
    assert "Filename:  rootfs.ext4" in info.stdout
    assert "CN = Lastmile test county update signing" in info.stdout
    extracted = rauc("extract", bundle, tmp_path / "out", keyring=pki / "county" / "ca.cert.pem")
    assert extracted.returncode == 0, extracted.stderr
    assert (tmp_path / "out" / "rootfs.ext4").read_bytes() == rootfs.read_bytes()


def test_a_gateway_of_another_county_refuses_the_bundle(bundle: Path, pki: Path) -> None:
    info = rauc("info", bundle, keyring=pki / "elsewhere" / "ca.cert.pem")
    assert info.returncode != 0
    assert "unable to get local issuer certificate" in info.stderr


def test_make_bundle_refuses_to_sign_with_a_certificate_the_gateways_would_refuse(
    rootfs: Path, pki: Path, tmp_path: Path
) -> None:
    with pytest.raises(subprocess.CalledProcessError) as refused:
        make_bundle(rootfs, pki, tmp_path / "update.raucb", signer="elsewhere", keyring="county")
    assert "unable to get local issuer certificate" in refused.value.stderr
    assert not (tmp_path / "update.raucb").exists()


def test_a_certificate_not_issued_for_code_signing_cannot_sign_an_update(
    bundle: Path, rootfs: Path, pki: Path, tmp_path: Path
) -> None:
    # The county CA's TLS server certificate (extendedKeyUsage serverAuth), e.g. for its update server.
    county = pki / "county"
    tls_key, tls_csr, tls_cert, ext = (tmp_path / n for n in ("tls.key", "tls.csr", "tls.pem", "ext.cnf"))
    ext.write_text(
        "[req]\ndistinguished_name = dn\n[dn]\n"
        "[tls]\nbasicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = serverAuth\n"
    )
    run(
        "openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", tls_key,
        "-out", tls_csr, "-subj", "/CN=updates.county.example", "-config", ext,
    )  # fmt: skip
    run(
        "openssl", "x509", "-req", "-in", tls_csr, "-CA", county / "ca.cert.pem", "-CAkey", county / "ca.key.pem",
        "-CAcreateserial", "-CAserial", tmp_path / "ca.srl", "-days", "30", "-extfile", ext, "-extensions", "tls",
        "-out", tls_cert,
    )  # fmt: skip
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "rootfs.ext4").write_bytes(rootfs.read_bytes())
    (stage / "manifest.raucm").write_text(
        "[update]\ncompatible=lastmile-gateway-arm64\nversion=0.2.0\n\n[bundle]\nformat=verity\n\n"
        "[image.rootfs]\nfilename=rootfs.ext4\n"
    )
    # signed without a keyring check (what a careless signer could do) ...
    made = run("rauc", "bundle", "--cert", tls_cert, "--key", tls_key, stage, tmp_path / "tls.raucb", check=False)
    assert made.returncode == 0, made.stderr
    # ... the gateway's system.conf (check-purpose=codesign) refuses it, though the county CA issued it
    info = rauc("info", tmp_path / "tls.raucb", keyring=county / "ca.cert.pem")
    assert info.returncode != 0
    assert "unsuitable certificate purpose" in info.stderr


def test_a_bundle_changed_after_signing_is_refused_before_its_image_is_used(
    bundle: Path, pki: Path, tmp_path: Path
) -> None:
    tampered = tmp_path / "tampered.raucb"
    data = bytearray(bundle.read_bytes())
    data[4096] ^= 0xFF  # inside the squashfs payload (the signature at the end still verifies)
    tampered.write_bytes(bytes(data))
    keyring = pki / "county" / "ca.cert.pem"
    extracted = rauc("extract", tampered, tmp_path / "out", keyring=keyring)
    assert extracted.returncode != 0
    assert "bundle payload is corrupted" in extracted.stderr
    assert not (tmp_path / "out" / "rootfs.ext4").exists()


# -- slot choice and rollback (U-Boot) -----------------------------------------------------------


@pytest.fixture(scope="module")
def pristine_card(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Card(tmp_path_factory.mktemp("pristine-card")).path


@pytest.fixture
def card(tmp_path: Path, pristine_card: Path) -> Card:
    return Card(tmp_path, pristine_card)


def test_a_new_card_boots_slot_a_and_never_tries_the_empty_slot_b(card: Card) -> None:
    chosen = [card.boot() for _ in range(2)]
    assert [(c["slot"], c["left"]) for c in chosen] == [("A", "8"), ("A", "7")]
    # the root is named by the slot's partition (same on the Pi's mmcblk0 and qemu's vda), not by label
    assert [c["root"] for c in chosen] == [f"PARTUUID={DISK_ID}-02"] * 2
    # the try is saved before the kernel runs, where fw_printenv reads it on the gateway
    assert card.env() == {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "7", "BOOT_B_LEFT": "0"}


def test_an_installed_slot_boots_next_and_rolls_back_when_it_is_never_marked_good(card: Card) -> None:
    assert card.boot()["slot"] == "A"
    card.setenv(BOOT_A_LEFT=GOOD_TRIES)  # mark-good: A came up healthy
    # rauc install wrote slot B and marked it active: B first, with boot-attempts-primary tries
    card.setenv(BOOT_ORDER="B A", BOOT_B_LEFT=INSTALL_TRIES)
    tries = [card.boot() for _ in range(4)]
    # B never gets marked good (its kernel never starts): three tries, then A again, A's tries intact
    assert [(c["slot"], c["left"], c["order"]) for c in tries] == [
        ("B", "2", "B A"),
        ("B", "1", "B A"),
        ("B", "0", "B A"),
        ("A", "8", "B A"),
    ]
    # mark-good on the fallback restores its tries; B stays out of the way until the next install
    card.setenv(BOOT_A_LEFT=GOOD_TRIES)
    assert card.boot()["slot"] == "A"
    assert card.env()["BOOT_B_LEFT"] == "0"


def test_power_cuts_before_mark_good_do_not_send_a_proven_slot_back(card: Card) -> None:
    """A flickering supply after an update: once B came up healthy (mark-good), boots that end before
    it does again (cut in their first minutes) count down from boot-attempts, not from 3."""
    card.setenv(BOOT_ORDER="B A", BOOT_B_LEFT=INSTALL_TRIES)  # installed
    assert card.boot()["slot"] == "B"
    card.setenv(BOOT_B_LEFT=GOOD_TRIES)  # marked good on its first boot
    cut = [card.boot() for _ in range(int(GOOD_TRIES))]  # then never again: every boot cut early
    assert [(c["slot"], c["left"]) for c in cut] == [("B", str(n)) for n in range(int(GOOD_TRIES) - 1, -1, -1)]
    assert int(GOOD_TRIES) >= 3 * int(INSTALL_TRIES)  # what a slot has once proven, against a new one's
    assert card.boot()["slot"] == "A"  # nine in a row: the other slot, as for a slot gone bad


def test_each_write_goes_to_the_older_copy_and_both_sides_agree_which_is_newer(card: Card) -> None:
    assert [c[:2] for c in card.copies()] == [(True, 1), (True, 1)]  # as build.sh writes them
    writes = []
    for step in range(3):
        card.boot()  # U-Boot takes a try
        writes.append(("u-boot", card.newer(), card.copies()[card.newer()][1]))
        card.setenv(BOOT_A_LEFT=GOOD_TRIES)  # mark-good from Linux
        writes.append(("linux", card.newer(), card.copies()[card.newer()][1]))
        assert card.env() == {"BOOT_ORDER": "A B", "BOOT_A_LEFT": GOOD_TRIES, "BOOT_B_LEFT": "0"}, step
    # alternating copies, each write's flag the last one's + 1: the other copy is always whole
    assert writes == [
        ("u-boot", 1, 2), ("linux", 0, 3), ("u-boot", 1, 4), ("linux", 0, 5), ("u-boot", 1, 6), ("linux", 0, 7),
    ]  # fmt: skip
    assert all(whole for whole, _, _ in card.copies())


def test_a_power_cut_during_a_write_leaves_the_state_from_before_it(card: Card) -> None:
    """After a rollback (A's update was bad: no tries left, B first) a torn write must not make A boot:
    with one file on the FAT a torn write gave the defaults, "A B", 3 tries each: the bad slot, thrice."""
    card.setenv(BOOT_ORDER="B A", BOOT_A_LEFT="0", BOOT_B_LEFT="3")
    assert (card.boot()["slot"], card.env()["BOOT_B_LEFT"]) == ("B", "2")
    card.tear(card.newer())  # the power went while U-Boot wrote that try
    assert card.env() == {"BOOT_ORDER": "B A", "BOOT_A_LEFT": "0", "BOOT_B_LEFT": "3"}  # Linux reads the other
    assert card.boot()["slot"] == "B"  # and so does U-Boot: B again, not the bad A
    card.setenv(BOOT_B_LEFT=GOOD_TRIES)  # mark-good...
    card.tear(card.newer())  # ...cut while fw_setenv wrote it: the try taken before it stays taken
    assert card.env() == {"BOOT_ORDER": "B A", "BOOT_A_LEFT": "0", "BOOT_B_LEFT": "2"}
    assert (card.boot()["slot"], card.boot()["slot"]) == ("B", "B")
    assert card.env()["BOOT_A_LEFT"] == "0"


def test_with_neither_copy_whole_the_defaults(card: Card) -> None:
    card.setenv(BOOT_ORDER="B A", BOOT_B_LEFT="3")
    card.tear(0)
    card.tear(1)
    text = card.power_on()
    assert "LMBOOT no whole slot state" in text, text[-3000:]
    assert re.search(r"^LMBOOT slot=A part=2 left=2 ", text, re.M), text[-3000:]
    # U-Boot wrote one whole copy again, which is what Linux reads
    assert card.env() == {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "2", "BOOT_B_LEFT": "3"}
    assert sorted(whole for whole, _, _ in card.copies()) == [False, True]


@pytest.mark.parametrize(
    ("flags", "newer"),
    [((0xFF, 0x00), 1), ((0x00, 0xFF), 0), ((7, 8), 1), ((9, 8), 0)],
    ids=["copy-1-wrapped", "copy-0-wrapped", "copy-1-greater", "copy-0-greater"],
)
def test_the_flag_after_0xff_is_0_for_u_boot_and_libubootenv_alike(
    card: Card, flags: tuple[int, int], newer: int
) -> None:
    states = [{"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"} for _ in (0, 1)]
    states[newer] = {"BOOT_ORDER": "B A", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"}
    for copy in (0, 1):
        card.put_copy(copy, state_copy(states[copy], flags[copy]))
    assert card.env()["BOOT_ORDER"] == "B A"  # libubootenv
    assert card.boot()["slot"] == "B"  # U-Boot
    assert card.copies()[1 - newer][:2] == (True, (flags[newer] + 1) % 256)  # written over the older


def test_a_card_made_before_keeps_its_slot_state_file(tmp_path: Path) -> None:
    """A bundle never rewrites p1: a card made when the state was lastmile-ab.env on the FAT keeps that
    boot.scr, so fw_env, updated with the root, must go on writing the file and leave the disk alone."""
    require_tool("mkenvimage")
    card = Card.__new__(Card)  # only fw_env: no card to boot
    disk = tmp_path / "card.img"
    disk.write_bytes(bytes(0x100000))
    card.tools, card.path, card.boot_dir = tmp_path / "sbin", disk, tmp_path / "boot-firmware"
    card.tools.mkdir()
    card.boot_dir.mkdir()
    for name in ("fw_printenv", "fw_setenv"):
        (card.tools / name).symlink_to(FW_ENV)
    card.fw_env = {
        **os.environ,
        "LASTMILE_BOOT_DIR": str(card.boot_dir),
        "LASTMILE_FW_ENV_DISK": str(disk),
        "LASTMILE_FW_ENV_CONFIG": str(tmp_path / "fw_env.config"),
    }
    old_file = card.boot_dir / "lastmile-ab.env"
    subprocess.run(
        ["mkenvimage", "-s", hex(ENV_SIZE), "-o", str(old_file), "-"],
        input=b"BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=3\n", check=True,
    )  # fmt: skip
    card.setenv(BOOT_ORDER="B A", BOOT_B_LEFT="3")
    assert card.env() == {"BOOT_ORDER": "B A", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"}
    data = old_file.read_bytes()
    assert len(data) == ENV_SIZE and b"BOOT_ORDER=B A\0" in data  # the file boot.scr reads, same size
    assert disk.read_bytes() == bytes(0x100000)  # nothing written before p1


def test_with_no_tries_left_anywhere_both_slots_get_their_tries_back(card: Card) -> None:
    card.boot()
    card.setenv(BOOT_A_LEFT="0", BOOT_B_LEFT="0")
    # the script resets both counters and reboots (no kernel tried on this power-on)
    assert "LMBOOT no slot has tries left" in card.power_on()
    assert card.env() == {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"}
    assert card.boot()["slot"] == "A"
