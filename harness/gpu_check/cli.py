"""``python -m harness.gpu_check``: the CPU checks without CUDA; with it, the checks, the
correctness matrix, the benches and the README of ``results/gpu/<device>/``."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch

from harness.gpu_check.benches import run_benches
from harness.gpu_check.checks import mask_check, protocol_check
from harness.gpu_check.matrix import correctness, flash_available
from harness.gpu_check.readme import summary, write_readme
from harness.results import env_info, write_json_atomic

def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def cpu_checks(out: Path, threads: int = 1) -> tuple[bool, dict]:
    """The CPU-checkable parts, on ``threads`` CPU threads (tiny models: one thread is fastest,
    and does not fight a busy machine's other jobs)."""
    device = torch.device("cpu")
    start = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        checks = {"mask": mask_check(device), "timing_protocol": protocol_check(device)}
        checks["correctness"] = correctness(device, ["float32"], ["sdpa", "eager"])
    finally:
        torch.set_num_threads(before)
    checks["seconds"] = time.perf_counter() - start
    checks["env"] = env_info()
    ok = checks["mask"]["ok"] and checks["timing_protocol"]["ok"] and checks["correctness"]["passed"] == checks[
        "correctness"]["total"]
    checks["ok"] = ok
    write_json_atomic(out / "cpu_checks.json", checks)
    return ok, checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="results folder (default results/gpu/<device>, or runs/gpu_check/cpu)")
    p.add_argument("--quick", action="store_true", help="a smaller bench grid (batch 1 and 8, the unpadded prompt)")
    p.add_argument("--skip-bench", action="store_true", help="correctness only")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        out = Path(args.out or "runs/gpu_check/cpu")
        ok, checks = cpu_checks(out)
        c = checks["correctness"]
        print(
            f"gpu-check needs a CUDA GPU (flash/fp16/bf16 correctness, LLaVA-1.5-7B throughput); ran the CPU checks "
            f"instead in {checks['seconds']:.0f} s: masks {'ok' if checks['mask']['ok'] else 'FAILED'}, timing protocol "
            f"{'ok' if checks['timing_protocol']['ok'] else 'FAILED'}, sdpa vs eager fp32 {c['passed']}/{c['total']} "
            f"cells ok -> {out / 'cpu_checks.json'}"
        )
        return 0 if ok else 1

    device = torch.device("cuda")
    out = Path(args.out or Path("results/gpu") / device_slug(device))
    out.mkdir(parents=True, exist_ok=True)
    impls = (["flash_attention_2"] if flash_available() else []) + ["sdpa", "eager", "sdpa_flash"]
    if not flash_available():
        print("flash-attn is not importable: the correctness matrix covers sdpa and eager only (docs/gpu.md: install)")
    checks = {"mask": mask_check(device), "timing_protocol": protocol_check(device)}
    write_json_atomic(out / "protocol_checks.json", checks)
    matrix = correctness(device, ["float16", "bfloat16"], impls, out / "correctness.json")
    print(f"correctness: {matrix['passed']} / {matrix['total']} cells pass -> {out / 'correctness.json'}", flush=True)
    benches = [] if args.skip_bench else run_benches(out, args.quick)
    readme = write_readme(out, matrix, benches)
    print(summary(matrix, benches))
    print(f"wrote {readme}")
    ok = checks["mask"]["ok"] and checks["timing_protocol"]["ok"] and matrix["passed"] == matrix["total"]
    return 0 if ok else 1
