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

from tests.conftest import REPO, missing, require_tool

RAUC_DIR = REPO / "image" / "rauc"
SYSTEM_CONF = RAUC_DIR / "system.conf"
UBOOT_QEMU = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")
SECTOR = 512
# The A/B card in miniature (sectors): what build.sh lays out, with tiny slots.
BOOT_START, BOOT_SECTORS = 2048, 80 * 2048
SLOT_SECTORS = 16 * 2048
DATA_SECTORS = 8 * 2048
DISK_ID = "4c4d4731"
ENV_SIZE = 0x4000


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check, timeout=300)


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


class Card:
    """The A/B card in miniature, booted by real U-Boot with image/rauc/boot.cmd."""

    def __init__(self, work: Path, pristine: Path | None = None) -> None:
        """A new card in `work`: made here, or a copy of `pristine` (a card made before)."""
        for tool in ("qemu-system-aarch64", "mkimage", "mkfs.vfat", "mcopy", "mkfs.ext4", "sfdisk", "fw_printenv"):
            require_tool(tool)
        if not UBOOT_QEMU.exists():
            missing(f"{UBOOT_QEMU} is absent (apt-get install u-boot-qemu; scripts/setup.sh --test installs it)")
        self.work = work
        self.path = work / "card.img"
        self.boots = 0
        slot_a = BOOT_START + BOOT_SECTORS
        slot_b = slot_a + SLOT_SECTORS
        data = slot_b + SLOT_SECTORS
        self.boot_offset = BOOT_START * SECTOR
        self.fw_config = work / "fw_env.config"
        self.env_copy = work / "lastmile-ab.env"
        self.fw_config.write_text(f"{self.env_copy} 0x0000 {ENV_SIZE:#x}\n")
        if pristine is not None:
            run("cp", "--sparse=always", pristine, self.path)
            return
        with self.path.open("wb") as card:
            card.truncate((data + DATA_SECTORS) * SECTOR)
        table = (
            f"label: dos\nlabel-id: 0x{DISK_ID}\n"
            f"start={BOOT_START}, size={BOOT_SECTORS}, type=c, bootable\n"
            f"start={slot_a}, size={SLOT_SECTORS}, type=83\n"
            f"start={slot_b}, size={SLOT_SECTORS}, type=83\n"
            f"start={data}, size={DATA_SECTORS}, type=83\n"
        )
        subprocess.run(["sfdisk", "--quiet", str(self.path)], input=table, text=True, check=True)
        script = work / "boot.scr"
        run("mkimage", "-A", "arm64", "-T", "script", "-C", "none", "-d", RAUC_DIR / "boot.cmd", script)
        boot = work / "boot.vfat"
        run("mkfs.vfat", "-C", "-n", "LM-BOOT", "-F", "32", boot, str(BOOT_SECTORS // 2))
        # what lastmile-bootargs.txt gives qemu (the Pi's firmware gives cmdline.txt instead)
        bootargs = work / "lastmile-bootargs.txt"
        bootargs.write_text("lm_cmdline=console=ttyAMA0 root=LABEL=LM-ROOT ro quiet\n")
        run("mcopy", "-i", boot, script, bootargs, "::/")
        self.write(boot, BOOT_START)
        for name, start in (("A", slot_a), ("B", slot_b)):
            tree = work / f"slot-{name}"
            (tree / "boot").mkdir(parents=True)
            (tree / "boot" / "vmlinuz-test").write_text(f"not a kernel {name}\n")
            (tree / "boot" / "initrd.img-test").write_text(f"initrd {name}\n")
            (tree / "vmlinuz").symlink_to("boot/vmlinuz-test")  # as Debian's kernel package makes them
            (tree / "initrd.img").symlink_to("boot/initrd.img-test")
            fs = work / f"slot-{name}.ext4"
            run("mkfs.ext4", "-q", "-d", tree, "-L", "LM-ROOT", fs, f"{SLOT_SECTORS // 2}K")
            self.write(fs, start)

    def write(self, part: Path, start: int) -> None:
        run("dd", f"if={part}", f"of={self.path}", "bs=512", f"seek={start}", "conv=notrunc", "status=none")

    def power_on(self) -> str:
        """One power-on until U-Boot resets (qemu -no-reboot: the process ends); the console."""
        self.boots += 1
        console = self.work / f"console-{self.boots}.log"
        with console.open("w") as out:
            subprocess.run(
                ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a72", "-m", "256", "-display", "none",
                 "-monitor", "none", "-serial", "stdio", "-nic", "none", "-no-reboot",
                 "-bios", str(UBOOT_QEMU), "-drive", f"file={self.path},if=virtio,format=raw"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=600,
            )  # fmt: skip
        return console.read_text(errors="replace")

    def boot(self) -> dict[str, str]:
        """One power-on; what boot.cmd chose (its LMBOOT line)."""
        text = self.power_on()
        chosen = re.search(r"^LMBOOT slot=(\S+) part=(\d) left=(\d+) order=(.*?) root=(\S+)\r?$", text, re.M)
        assert chosen, f"boot.cmd chose no slot (console {self.boots}):\n{text[-3000:]}"
        assert "did not start" in text, text[-3000:]  # the fake kernel was refused: a failed try
        keys = ("slot", "part", "left", "order", "root")
        return dict(zip(keys, chosen.groups(), strict=True))

    def env(self) -> dict[str, str]:
        """lastmile-ab.env as the gateway's fw_printenv reads it (what RAUC's uboot backend sees)."""
        run("mcopy", "-o", "-n", "-i", f"{self.path}@@{self.boot_offset}", "::/lastmile-ab.env", self.env_copy)
        printed = run("fw_printenv", "-c", self.fw_config).stdout
        return dict(line.split("=", 1) for line in printed.splitlines())

    def setenv(self, **values: str) -> None:
        """What RAUC's uboot backend does from Linux (mark-active, mark-good, mark-bad)."""
        self.env()  # the current file
        for name, value in values.items():
            run("fw_setenv", "-c", self.fw_config, name, value)
        run("mcopy", "-o", "-i", f"{self.path}@@{self.boot_offset}", self.env_copy, "::/lastmile-ab.env")

    def put_env_file(self, data: bytes) -> None:
        self.env_copy.write_bytes(data)
        run("mcopy", "-o", "-i", f"{self.path}@@{self.boot_offset}", self.env_copy, "::/lastmile-ab.env")


@pytest.fixture(scope="module")
def pristine_card(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Card(tmp_path_factory.mktemp("pristine-card")).path


@pytest.fixture
def card(tmp_path: Path, pristine_card: Path) -> Card:
    return Card(tmp_path, pristine_card)


def test_a_new_card_boots_slot_a_and_a_slot_that_never_comes_up_falls_back_to_the_other(card: Card) -> None:
    chosen = [card.boot() for _ in range(4)]
    assert [(c["slot"], c["left"]) for c in chosen] == [("A", "2"), ("A", "1"), ("A", "0"), ("B", "2")]
    # the root is named by the slot's partition (same on the Pi's mmcblk0 and qemu's vda), not by label
    assert [c["root"] for c in chosen] == [f"PARTUUID={DISK_ID}-02"] * 3 + [f"PARTUUID={DISK_ID}-03"]
    # the try is saved before the kernel runs, in the file fw_printenv reads on the gateway
    assert card.env() == {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "0", "BOOT_B_LEFT": "2"}


def test_an_installed_slot_boots_next_and_rolls_back_when_it_is_never_marked_good(card: Card) -> None:
    assert card.boot()["slot"] == "A"
    card.setenv(BOOT_A_LEFT="3")  # mark-good: A came up healthy
    # rauc install wrote slot B and marked it active: B first, with boot-attempts-primary tries
    card.setenv(BOOT_ORDER="B A", BOOT_B_LEFT="3")
    tries = [card.boot() for _ in range(4)]
    # B never gets marked good (its kernel never starts): three tries, then A again, A's tries intact
    assert [(c["slot"], c["left"], c["order"]) for c in tries] == [
        ("B", "2", "B A"),
        ("B", "1", "B A"),
        ("B", "0", "B A"),
        ("A", "2", "B A"),
    ]
    # mark-good on the fallback restores its tries; B stays out of the way until the next install
    card.setenv(BOOT_A_LEFT="3")
    assert card.boot()["slot"] == "A"
    assert card.env()["BOOT_B_LEFT"] == "0"


def test_a_torn_slot_state_file_gives_the_defaults(card: Card) -> None:
    card.boot()
    card.setenv(BOOT_ORDER="B A", BOOT_B_LEFT="3")
    state = bytearray((card.work / "lastmile-ab.env").read_bytes())
    state[10] ^= 0xFF  # a power cut while it was written: its CRC no longer matches
    card.put_env_file(bytes(state))
    assert card.boot()["slot"] == "A"  # "A B", 3 tries each: the slot the card was made with
    assert card.env() == {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "2", "BOOT_B_LEFT": "3"}


def test_with_no_tries_left_anywhere_both_slots_get_their_tries_back(card: Card) -> None:
    card.boot()
    card.setenv(BOOT_A_LEFT="0", BOOT_B_LEFT="0")
    # the script resets both counters and reboots (no kernel tried on this power-on)
    assert "LMBOOT no slot has tries left" in card.power_on()
    assert card.env() == {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"}
    assert card.boot()["slot"] == "A"
