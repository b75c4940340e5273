"""The device call's phases (docs/gpu.md): ``python -m harness.gpu_plan PHASE --out DIR [--tier N]``.

The command: one phase (``RUNNERS``) on its ``Phase`` file, on the GPU profile where CUDA is, else the
CPU one; a crash is ``failed`` with its message, and the exit status is 1 for a failed phase."""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path

from harness.gpu_plan.phases import RUNNERS
from harness.gpu_plan.plan import PHASES, Phase

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.gpu_plan", description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=PHASES)
    p.add_argument("--out", required=True)
    p.add_argument("--tier", type=int, default=1)
    p.add_argument("--profile", choices=("auto", "gpu", "cpu"), default="auto")
    p.add_argument("--stop-at", type=float, default=None, help="wall-clock time (time.time()) to stop by")
    args = p.parse_args(argv)
    profile = args.profile
    if profile == "auto":
        import torch

        profile = "gpu" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ph = Phase(args.phase, out, profile, args.tier, args.stop_at)
    ph.save()
    try:
        status = RUNNERS[args.phase](ph)
        note = None
        if profile == "cpu" and status == "skipped":
            note = "no CUDA: the GPU readings were skipped; the same code ran on the CPU profile (tiny model)"
        ph.finish(status, note)
    except Exception as err:
        traceback.print_exc()
        ph.finish("failed", f"{type(err).__name__}: {str(err)[:500]}")
        return 1
    seconds = time.time() - ph.started
    print(f"{args.phase} (tier {args.tier}, {profile}): {ph.data['status']} in {seconds:.1f} s", flush=True)
    return 1 if ph.data["status"] == "failed" else 0
