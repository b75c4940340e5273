"""Prepare the wheels the GPU image lacks: ``make gpu-wheels`` (docs/gpu.md).

Standard library only; runs on a development machine with network access to the package
registry. Fills the ignored ``.whl/`` with exactly one wheel per package:

- ``hydra-core``, ``omegaconf`` and ``transformers`` (the version this project's suite is tested
  with), downloaded as wheels for CPython 3.12 on manylinux x86-64 (the device's Python). All three
  are pure Python (``py3-none-any``), so the same files install on the development machine's 3.11
  too, which is what ``make gpu-dryrun`` relies on.
- ``antlr4-python3-runtime``, which has no wheel on PyPI: built here from its sdist (pure Python).

Everything else transformers needs at that version is already in the device image (KINDS.md);
``REQUIRES_FROM_IMAGE`` lists what was compared. Writes ``.whl/GIT_SHA`` (``.git`` may not travel)
and ``.whl/MANIFEST.json``, then fails when ``.whl/`` plus the tracked tree exceeds the limit
(60 MiB by default; the device takes 64 MiB in all).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The versions the test suite runs with (pyproject.toml's ranges; the shared .venv's picks).
DOWNLOAD = ["transformers==5.24.0", "hydra-core==1.3.8", "omegaconf==2.3.1"]
BUILD = ["antlr4-python3-runtime==4.9.3"]  # sdist only on PyPI
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]
# transformers 5.24's run-time needs, and what the device image holds (KINDS.md, 2026-11): all met.
REQUIRES_FROM_IMAGE = {
    "huggingface-hub>=1.31.0,<3.0": "1.33.0", "tokenizers>=0.23.1,<0.24.0": "0.23.2", "safetensors>=0.8.0": "0.8.0",
    "numpy>=1.17": "2.5.2", "regex>=2025.10.22": "present (transformers 5.17 in the image needs the same)",
    "pyyaml>=5.1": "present", "packaging>=20.0": "present", "tqdm>=4.60": "present", "typer": "present",
    "accelerate>=1.1.0 (checked at import)": "1.15.0",
}
LIMIT_MIB = 60


def tracked_bytes(root: Path = ROOT) -> int:
    """Bytes of the files git tracks (what travels besides the carried folders)."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    return sum((root / p).stat().st_size for p in out.decode().split("\0") if p and (root / p).is_file())


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def git_sha(root: Path = ROOT) -> str:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True).stdout.strip()
    return sha + ("-dirty" if dirty else "")


def is_pure(wheel: Path) -> bool:
    return wheel.name.endswith("-none-any.whl")


def check_one_version_each(folder: Path) -> dict[str, str]:
    """``{distribution: wheel file}``; two versions of one package would stop the device's install."""
    seen: dict[str, str] = {}
    for wheel in sorted(folder.glob("*.whl")):
        dist = wheel.name.split("-")[0].lower().replace("_", "-")
        if dist in seen:
            raise SystemExit(f"gpu-wheels: two wheels of {dist} in {folder}: {seen[dist]} and {wheel.name}")
        seen[dist] = wheel.name
    return seen


def size_check(folder: Path, limit_mib: float, root: Path = ROOT) -> tuple[int, int]:
    wheels, tracked = folder_bytes(folder), tracked_bytes(root)
    if wheels + tracked > limit_mib * 2**20:
        raise SystemExit(f"gpu-wheels: {folder} ({wheels / 2**20:.1f} MiB) plus the tracked tree "
                         f"({tracked / 2**20:.1f} MiB) is {(wheels + tracked) / 2**20:.1f} MiB, over {limit_mib} MiB")
    return wheels, tracked


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", default=str(ROOT / ".whl"))
    p.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    p.add_argument("--python", default=sys.executable, help="the Python whose pip downloads and builds")
    args = p.parse_args(argv)
    dest = Path(args.dest)
    pip = [args.python, "-m", "pip"]
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "whl"
        subprocess.run([*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", *PLATFORM, "-d", str(stage),
                        *DOWNLOAD], check=True)
        subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "--no-binary=:all:", "-w", str(stage), *BUILD],
                       check=True)
        for wheel in stage.glob("*.whl"):
            if not is_pure(wheel):
                raise SystemExit(f"gpu-wheels: {wheel.name} is not pure Python; the dry run (3.11) could not use it")
            with zipfile.ZipFile(wheel) as z:  # a broken download fails here, not on the device
                bad = z.testzip()
                if bad:
                    raise SystemExit(f"gpu-wheels: {wheel.name} is corrupt ({bad})")
        if dest.exists():
            shutil.rmtree(dest)  # one version of each: never leave an older wheel beside a newer one
        shutil.copytree(stage, dest)
    wheels = check_one_version_each(dest)
    sha = git_sha()
    (dest / "GIT_SHA").write_text(sha + "\n")
    (dest / "MANIFEST.json").write_text(json.dumps(
        {"git_sha": sha, "wheels": wheels, "downloaded": DOWNLOAD, "built_from_sdist": BUILD,
         "requires_from_image": REQUIRES_FROM_IMAGE}, indent=1) + "\n")
    size, tracked = size_check(dest, args.limit_mib)
    print(f"gpu-wheels: {len(wheels)} wheels, {size / 2**20:.1f} MiB in {dest} + tracked tree "
          f"{tracked / 2**20:.1f} MiB "
          f"= {(size + tracked) / 2**20:.1f} MiB (limit {args.limit_mib:g}); git {sha}")
    for name in wheels.values():
        print(f"  {name}  {(dest / name).stat().st_size / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
