"""System test: image/files/overlay-root run with the image's own initramfs tools, in seconds.

    LASTMILE_IMAGE=/path/to/lastmile.img scripts/test.sh -m slow tests/system/test_overlay_root.py

The whole-machine boot (test_image_boot.py) takes minutes per path; this runs the script inside
the initrd extracted from the image's boot partition (klibc's sh, mount, mkdir; arm64 binaries
under qemu-user through binfmt_misc, on this host's kernel) in a private mount namespace, with
a read-only tmpfs standing in for the SD-card root. Each path is checked: the overlay, the
maintenance switch (`lastmile.overlay=0`) and a kernel without overlayfs (a /proc/filesystems
without it). The first boot of the image found that the script called a grep the initramfs does
not have; this is where a change to the script is tried first.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, missing, require_tool
from tests.system.qemu_machine import GatewayDisk

pytestmark = pytest.mark.slow

SCRIPT = REPO / "image" / "files" / "overlay-root"
IN_INITRD = "scripts/local-bottom/overlay-root"


def extract_newc(archive: bytes, dest: Path) -> int:
    """Unpack a "newc" cpio archive (what mkinitramfs writes) without cpio; entries unpacked."""
    offset, count = 0, 0
    while offset < len(archive):
        header = archive[offset : offset + 110]
        if header[:6] != b"070701":
            break  # padding after the trailer
        mode, size, namesize = (int(header[6 + 8 * i : 14 + 8 * i], 16) for i in (1, 6, 11))
        name = archive[offset + 110 : offset + 110 + namesize - 1].decode()
        offset = (offset + 110 + namesize + 3) & ~3
        body = archive[offset : offset + size]
        offset = (offset + size + 3) & ~3
        if name == "TRAILER!!!":
            break
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if stat.S_ISDIR(mode):
            path.mkdir(exist_ok=True)
            path.chmod(stat.S_IMODE(mode))
        elif stat.S_ISLNK(mode):
            if path.is_symlink() or path.exists():
                path.unlink()
            path.symlink_to(body.decode())
        elif stat.S_ISREG(mode):
            path.write_bytes(body)
            path.chmod(stat.S_IMODE(mode))
        else:
            continue  # device nodes: the test mounts its own /dev
        count += 1
    return count


@pytest.fixture(scope="module")
def initramfs(image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        missing("mount namespaces and chroot need root")
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        missing("qemu-aarch64 is not registered with binfmt_misc (image/build.sh registers it)")
    for tool in ("zstd", "unshare", "qemu-img", "mcopy"):
        require_tool(tool)
    workdir = tmp_path_factory.mktemp("initramfs")
    disk = GatewayDisk.create(image, workdir)
    _kernel, initrd = disk.kernel_and_initrd()
    archive = subprocess.run(["zstd", "-dc", str(initrd)], check=True, capture_output=True).stdout
    tree = workdir / "tree"
    assert extract_newc(archive, tree) > 100
    return tree


def run_script(tree: Path, cmdline: str, *, hide_overlayfs: bool = False) -> dict[str, str]:
    """Run overlay-root from this repository in the initramfs tree; what it left behind."""
    (tree / IN_INITRD).write_bytes(SCRIPT.read_bytes())
    fake = tree.parent / "fake"
    fake.mkdir(exist_ok=True)
    (fake / "cmdline").write_text(cmdline + "\n")
    filesystems = Path("/proc/filesystems").read_text()
    if hide_overlayfs:
        filesystems = "".join(ln + "\n" for ln in filesystems.splitlines() if ln.split()[-1] != "overlay")
    (fake / "filesystems").write_text(filesystems)
    t = str(tree)
    setup = f"""
set -e
mkdir -p {t}/proc {t}/dev {t}/run {t}/root
mount -t proc proc {t}/proc
mount --bind {fake}/cmdline {t}/proc/cmdline
mount --bind {fake}/filesystems {t}/proc/filesystems
mount -t tmpfs tmpfs {t}/dev && : > {t}/dev/kmsg
mount -t tmpfs tmpfs {t}/run
# the SD-card root, as the initramfs mounted it: read-only
mount -t tmpfs tmpfs {t}/root && mkdir -p {t}/root/etc {t}/root/media && echo lower > {t}/root/etc/marker
mount -o remount,ro {t}/root
set +e
chroot {t} /bin/sh -c 'export rootmnt=/root quiet=n; /bin/sh /{IN_INITRD}'
echo "@rc $?"
echo "@state $(cat {t}/run/lastmile-root.state)"
echo "@kmsg $(cat {t}/dev/kmsg)"
echo "@root $(findmnt -n -o FSTYPE,OPTIONS {t}/root)"
echo "@lower $(findmnt -n -o FSTYPE,OPTIONS {t}/root/media/root-ro)"
echo upper > {t}/root/etc/marker 2>/dev/null; echo "@written $(cat {t}/root/etc/marker)"
echo "@lower-marker $(cat {t}/root/media/root-ro/etc/marker 2>/dev/null)"
"""
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", setup], capture_output=True, text=True, timeout=300
    )
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith("@"):
            key, *value = line[1:].split()  # findmnt pads its columns
            found[key] = " ".join(value)
    found["console"] = proc.stdout + proc.stderr
    return found


def test_the_image_carries_this_script(initramfs: Path) -> None:
    assert (initramfs / IN_INITRD).read_bytes() == SCRIPT.read_bytes(), "rebuild the image (image/build.sh)"


def test_overlay_over_the_read_only_root(initramfs: Path) -> None:
    result = run_script(initramfs, "root=LABEL=LM-ROOT ro")
    assert result["rc"] == "0", result["console"]
    assert result["state"].startswith("overlay:")
    assert result["root"].startswith("overlay rw")
    assert result["lower"].startswith("tmpfs ro")
    assert (result["written"], result["lower-marker"]) == ("upper", "lower")  # writes go to RAM only
    assert result["kmsg"] == ""  # nothing critical to say


@pytest.mark.parametrize(
    ("cmdline", "hide_overlayfs", "reason"),
    [
        ("root=LABEL=LM-ROOT ro lastmile.overlay=0", False, "overlay disabled by lastmile.overlay=0"),
        ("root=LABEL=LM-ROOT ro", True, "no overlayfs"),
    ],
)
def test_without_the_overlay_the_root_is_writable_and_it_says_so(
    initramfs: Path, cmdline: str, hide_overlayfs: bool, reason: str
) -> None:
    result = run_script(initramfs, cmdline, hide_overlayfs=hide_overlayfs)
    assert result["rc"] == "0", result["console"]
    assert result["state"].startswith(f"writable: {reason}")
    assert result["root"].startswith("tmpfs rw")  # remounted writable, never left read-only
    assert result["written"] == "upper"
    # Critical (printk level 2) in the kernel log: on the console whatever the log level.
    assert result["kmsg"].startswith(f"<2>lastmile-overlay-root: {reason}")
    assert "Failure: lastmile-overlay-root" in result["console"]
