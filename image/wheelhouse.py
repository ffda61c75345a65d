"""A wheelhouse to install Lastmile offline: the project's wheel plus every dependency as a wheel.

    python image/wheelhouse.py --arch arm64 OUT_DIR

The dependencies come from PyPI with pip (binary wheels only, for CPython 3.11 on the target:
Debian 12's python3), cached under ~/.cache/lastmile-image/wheels-ARCH-HASH keyed by the
dependency list, so a rebuild downloads nothing. The project wheel is built from a clean copy
of the tracked and new files (the work tree is never touched: no build/ left behind).
Install on the target with:  pip install --no-index --find-links OUT_DIR lastmile
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLATFORMS = {
    # Debian 12: glibc 2.36, so manylinux up to 2_36 fits.
    "amd64": [
        "manylinux_2_36_x86_64",
        "manylinux_2_34_x86_64",
        "manylinux_2_28_x86_64",
        "manylinux_2_27_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
    ],
    "arm64": [
        "manylinux_2_36_aarch64",
        "manylinux_2_34_aarch64",
        "manylinux_2_28_aarch64",
        "manylinux_2_27_aarch64",
        "manylinux_2_17_aarch64",
        "manylinux2014_aarch64",
    ],
}
PYTHON_VERSION = "3.11"  # Debian 12 (bookworm)


def dependencies() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"])


def cache_root() -> Path:
    base = os.environ.get("LASTMILE_IMAGE_CACHE") or Path.home() / ".cache" / "lastmile-image"
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def dependency_wheels(arch: str, pip: list[str]) -> Path:
    deps = dependencies()
    key = hashlib.sha256("\n".join([arch, PYTHON_VERSION, *sorted(deps)]).encode()).hexdigest()[:16]
    target = cache_root() / f"wheels-{arch}-{key}"
    if (target / ".complete").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    cmd = [
        *pip,
        "download",
        "--quiet",
        "--dest",
        str(target),
        "--only-binary=:all:",
        "--python-version",
        PYTHON_VERSION,
        "--implementation",
        "cp",
        "--abi",
        "cp311",
        "--abi",
        "abi3",
        "--abi",
        "none",
    ]
    for tag in PLATFORMS[arch]:
        cmd += ["--platform", tag]
    subprocess.run([*cmd, *deps, "pip"], check=True)
    (target / ".complete").write_text("\n".join(deps) + "\n")
    return target


def project_wheel(out: Path, pip: list[str]) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        for name in filter(None, (f.decode() for f in files)):
            if not (REPO / name).is_file():
                continue  # deleted in the work tree
            dest = src / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest)
        subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(src)], check=True)
    found = sorted(out.glob("lastmile-*.whl"))
    if not found:
        raise RuntimeError("the project wheel was not built")
    return found[-1]


def build(arch: str, out: Path, pip: list[str] | None = None) -> Path:
    pip = pip or [sys.executable, "-m", "pip"]
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("lastmile-*.whl"):
        old.unlink()
    for wheel in dependency_wheels(arch, pip).glob("*.whl"):
        if not (out / wheel.name).exists():
            shutil.copy2(wheel, out / wheel.name)
    project_wheel(out, pip)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(PLATFORMS), default="arm64")
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    out = build(args.arch, args.out)
    print(f"{out}: {len(list(out.glob('*.whl')))} wheels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
