"""Build VLMEvalKit's environment beside the project's: ``make vlmeval-install``.

    python3 tools/vlmeval_env.py [--venv .venv-vlmeval]

VLMEvalKit (PyPI ``ms-vlmeval``) imports torchvision when it is imported, and every torchvision
wheel reachable here links the CUDA torch, so it cannot live in the project's ``.venv`` (pinned CPU
``torch==2.13.0``). This builds a second virtual environment with

1. the CUDA torch and its torchvision (``constraints/vlmeval.txt``; both run on a CPU);
2. the project's own dependencies as ``pyproject.toml`` lists them, less its torch pin, plus the
   ``test`` extra, plus what VLMEvalKit's import and its image datasets need
   (``constraints/vlmeval-requirements.txt``), all under the constraints that keep Hydra's
   omegaconf and antlr4;
3. the project (editable, ``--no-deps``) and ``ms-vlmeval`` itself (``--no-deps``);
4. ``python -m harness.vlmeval.check``: the VLMEvalKit pieces the harness uses import, and Hydra
   still composes.

pip (upgraded first: it installs faster than the one ensurepip brings) byte-compiles nothing (most of
the CUDA torch's files are never imported); step 4 and an import of the harness's entry point run with bytecode
writing on instead, so what they import is compiled once. The editable build of step 3 takes
``.install.lock``, as the Makefile's do: ``make test`` builds this environment beside ``.venv``.

It is idempotent (pip skips what is there) and stamps ``<venv>/.installed`` with the inputs' hash,
so ``make`` rebuilds it only when one of them changes.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLMEVAL = "ms-vlmeval==0.0.20"
INPUTS = ("pyproject.toml", "constraints/vlmeval.txt", "constraints/vlmeval-requirements.txt", "tools/vlmeval_env.py")


def project_requirements() -> list[str]:
    """pyproject's dependencies and test extra, less torch (the constraints choose the build)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return [r for r in reqs if re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() != "torch"]


def inputs_hash() -> str:
    digest = hashlib.sha256(VLMEVAL.encode())
    for name in INPUTS:
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()[:16]


def pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile", *args],
                   check=True, cwd=ROOT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-vlmeval")
    args = parser.parse_args(argv)
    venv = args.venv if args.venv.is_absolute() else ROOT / args.venv
    stamp, want = venv / ".installed", inputs_hash()
    if stamp.exists() and stamp.read_text().strip() == want:
        print(f"{venv}: up to date")
        return 0
    start = time.monotonic()
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip(python, "--upgrade", "pip")
    constraints = ["-c", "constraints/vlmeval.txt"]
    pip(python, "torch", "torchvision", *constraints)
    pip(python, *project_requirements(), "-r", "constraints/vlmeval-requirements.txt", *constraints)
    with open(ROOT / ".install.lock", "w") as lock:  # one editable build of this tree at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        pip(python, "--no-deps", "-e", ".", VLMEVAL)
    writing = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([str(python), "-m", "harness.vlmeval.check"], check=True, cwd=ROOT, env=writing)
    subprocess.run([str(python), "-c", "import harness.__main__, pytest"], check=True, cwd=ROOT, env=writing)
    stamp.write_text(want + "\n")
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    print(f"{venv}: VLMEvalKit environment ready ({size / 2**30:.1f} GiB, {time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
