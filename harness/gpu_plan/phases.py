"""The phases of a device call (``RUNNERS``, by name): ``env``, the timing phases (``throughput``,
``pruning``), ``budget`` and ``correctness``; each plans its points on a ``Phase``, skips the finished
ones, stops before one it cannot finish by ``stop_at`` and returns its status. torch and the harness
load inside the functions, so a phase fails alone."""

from __future__ import annotations

import contextlib
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

from harness.gpu_plan.plan import (BUDGET_CONTEXT, BUDGET_GROUPS, BUDGET_REFERENCE_BATCH, CORRECTNESS_DTYPES, CPU,
                                   LAZY_VARIANTS, CONTROL_VARIANTS, LOAD_S, NEW_TOKENS, PEAK_BF16, PROMPT_7B,
                                   PRUNING_POINTS, REPEATS, THROUGHPUT_POINTS, WARMUP, Phase, estimate_budget_s,
                                   estimate_point_s, now, point_key)
from harness.gpu_plan.timing import bench_variants, device_name, load_profile_model, pruning_variants, time_point

def phase_env(ph: Phase) -> str:
    import torch

    info: dict = {"python": platform.python_version(), "executable": sys.executable, "time": now()}
    for name in ("torch", "transformers", "hydra", "omegaconf", "tokenizers", "huggingface_hub", "accelerate",
                 "safetensors", "numpy", "PIL"):
        try:
            mod = __import__(name)
            info[name] = {"version": getattr(mod, "__version__", None), "path": str(Path(mod.__file__).parent)}
        except Exception as err:
            info[name] = {"error": f"{type(err).__name__}: {err}"}
    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    try:
        from harness.gpu_check import matrix

        info["flash_attn_2_available"] = matrix.flash_available()
    except Exception as err:
        info["flash_attn_2_available"] = f"{type(err).__name__}: {err}"
    git = Path(__file__).resolve().parents[2] / ".whl" / "GIT_SHA"  # the repository's
    info["git_sha_of_wheels"] = git.read_text().strip() if git.exists() else None
    ph.plan([("readings", 1)])
    if not torch.cuda.is_available():
        ph.use_device("cpu")
        a = torch.randn(512, 512)
        t = time.perf_counter()
        for _ in range(5):
            a @ a
        info["cpu_matmul_gflops"] = 5 * 2 * 512**3 / (time.perf_counter() - t) / 1e9
        ph.data["env"] = info
        ph.record("readings", {"seconds": 0.0})
        return "skipped"
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    ph.use_device(name)
    props = torch.cuda.get_device_properties(dev)
    info.update(device_name=name, multiprocessors=props.multi_processor_count,
                memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                sdp_flash_enabled=torch.backends.cuda.flash_sdp_enabled())
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as err:
        info["nvidia_smi"] = f"{type(err).__name__}: {err}"
    readings = {}

    def timed(fn, n: int) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / n

    src = torch.empty(2**30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    s = timed(lambda: dst.copy_(src), 10)
    readings["copy_bytes"] = src.numel()
    readings["copy_tb_per_s"] = 2 * src.numel() / s / 1e12  # bytes read and written
    from harness import measure

    peak_bw = measure.peak_bandwidth(name)
    readings["copy_fraction_of_peak_bandwidth"] = 2 * src.numel() / s / peak_bw if peak_bw else None
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    s = timed(lambda: a @ b, 10)
    readings["matmul_bf16_tflops"] = 2 * 8192**3 / s / 1e12
    peak = next((p for pattern, p in PEAK_BF16 if pattern in name.lower()), None)
    readings["matmul_fraction_of_peak"] = 2 * 8192**3 / s / peak if peak else None
    del a, b
    torch.cuda.empty_cache()
    info["readings"] = readings
    ph.data["env"] = info
    ph.record("readings", {"seconds": round(time.time() - ph.started, 1)})
    return "done"


def _timing_phase(ph: Phase, entries: list[str], points: list[tuple[int, int | None, int]]) -> str:
    from harness import bench

    gpu = ph.profile == "gpu"
    pts = points if gpu else CPU[ph.name]
    ph.plan([(point_key(b, c), t) for b, c, t in pts])
    if not ph.todo():
        return "done" if gpu else "skipped"
    by_key = {point_key(b, c): (b, c) for b, c, _ in pts}
    batch, ctx = by_key[ph.todo()[0]]
    first = estimate_point_s(1 + len(entries), batch, ctx or PROMPT_7B)
    if not ph.fits(LOAD_S + first):  # before the model is built: leave the time to the next phase
        ph.data.setdefault("stopped", {})[ph.todo()[0]] = f"estimated {first:.0f} s, {ph.left():.0f} s left"
        return "partial"
    loaded, device = load_profile_model(ph.profile, threads=None if gpu else 1)
    ph.use_device(device_name(device))
    model = loaded.model
    variants = bench_variants(entries, ph.profile)
    ph.data["variants"] = {v.label: {"method": v.config, "params": v.method.params()} for v in variants}
    ph.data["model"] = {"name": loaded.name, "n_params": loaded.n_params, "dtype": str(model.dtype),
                        "attn_implementation": model.config._attn_implementation}
    prompts = bench.Prompts(loaded, device)
    new_tokens = NEW_TOKENS if gpu else CPU["new_tokens"]
    repeats, warmup = (REPEATS, WARMUP) if gpu else (CPU["repeats"], CPU["warmup"])
    ph.data["settings"] = {"new_tokens": new_tokens, "repeats": repeats, "warmup": warmup}
    for key in ph.todo():
        batch, ctx = by_key[key]
        context = prompts.fit(ctx)
        estimate = estimate_point_s(len(variants) + 1, batch, context["prompt_tokens"], new_tokens, repeats, warmup)
        if not ph.fits(estimate):
            ph.data.setdefault("stopped", {})[key] = f"estimated {estimate * ph.factor:.0f} s, {ph.left():.0f} s left"
            break
        compiled = gpu and not ph.data.get("compiled_timed")  # the compiled decode step, at the first point only
        try:
            point = time_point(model, prompts, variants, batch, context, new_tokens, repeats, warmup, compiled)
            ph.data["compiled_timed"] = ph.data.get("compiled_timed") or compiled
            point["estimate_s"] = round(estimate, 1)
        except Exception as err:  # out of memory, say: the point says so, the next one runs
            point = {"error": f"{type(err).__name__}: {str(err)[:500]}", "batch_size": batch,
                     "context_length": ctx, "estimate_s": round(estimate, 1)}
            print(traceback.format_exc(), file=sys.stderr)
            with contextlib.suppress(Exception):
                __import__("torch").cuda.empty_cache()
        ph.record(key, point, estimate)
        print(f"{ph.name} {key}: {'error' if 'error' in point else str(point['seconds']) + ' s'}", flush=True)
    return _status(ph, gpu)


def _status(ph: Phase, gpu: bool) -> str:
    """A timing phase's end: failed when every point failed, skipped off CUDA (the CPU profile ran),
    else done or partial (points left for the next call)."""
    errors = [k for k, p in ph.data["points"].items() if "error" in p]
    if errors and len(errors) == len(ph.data["points"]):
        return "failed"
    if not gpu:
        return "skipped"
    return "done" if not ph.data["not_run"] else "partial"


def phase_throughput(ph: Phase) -> str:
    return _timing_phase(ph, LAZY_VARIANTS + CONTROL_VARIANTS, THROUGHPUT_POINTS)


def phase_pruning(ph: Phase) -> str:
    return _timing_phase(ph, pruning_variants(), PRUNING_POINTS)


def phase_budget(ph: Phase) -> str:
    import torch
    from omegaconf import OmegaConf

    from harness import bench
    from harness.results import device_info

    gpu = ph.profile == "gpu"
    ph.plan([(name, tier) for name, _, tier in BUDGET_GROUPS])
    if not ph.todo():
        return "done" if gpu else "skipped"
    new_tokens = NEW_TOKENS if gpu else CPU["new_tokens"]
    repeats, warmup = (REPEATS, WARMUP) if gpu else (CPU["repeats"], CPU["warmup"])
    estimates = {name: estimate_budget_s(1 + len(entries)) for name, entries, _ in BUDGET_GROUPS}
    first = ph.todo()[0]
    if gpu and not ph.fits(LOAD_S + estimates[first]):  # before the model is built: give the time to the next phase
        ph.data.setdefault("stopped", {})[first] = f"estimated {estimates[first]:.0f} s, {ph.left():.0f} s left"
        return "partial"
    loaded, device = load_profile_model(ph.profile, threads=None if gpu else 1)
    model = loaded.model
    dev = device_info(device)
    ph.use_device(device_name(device))
    prompts = bench.Prompts(loaded, device)
    context = prompts.fit(BUDGET_CONTEXT if gpu else None)
    settings = {"new_tokens": new_tokens, "repeats": repeats, "warmup": warmup}
    ph.data["settings"] = {**settings, "kind": "memory" if gpu else "kv", "context": context,
                           "reference_batch": BUDGET_REFERENCE_BATCH if gpu else CPU["budget_reference_batch"]}
    groups = {name: entries for name, entries, _ in BUDGET_GROUPS}
    for key in ph.todo():
        if not ph.fits(estimates[key]):
            wanted = estimates[key] * ph.factor
            ph.data.setdefault("stopped", {})[key] = f"estimated {wanted:.0f} s, {ph.left():.0f} s left"
            break
        known = next((p["bytes"] for p in ph.data["points"].values() if p.get("bytes")), None)
        cfg = OmegaConf.create({"kind": ph.data["settings"]["kind"], "bytes": known,
                                "reference_batch": ph.data["settings"]["reference_batch"], "max_batch": 256})
        start = time.time()
        try:
            variants = bench_variants(groups[key], ph.profile)
            plan = bench.budget_plan(model, prompts, context, variants, cfg, new_tokens, dev)
            point = bench.run_budget(model, prompts, context, variants, plan, settings, device)
        except Exception as err:
            point = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
            print(traceback.format_exc(), file=sys.stderr)
        point["seconds"] = round(time.time() - start, 1)
        ph.record(key, point, estimates[key])
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"budget {key}: {'error' if 'error' in point else str(point['seconds']) + ' s'}", flush=True)
    return _status(ph, gpu)


def phase_correctness(ph: Phase) -> str:
    import torch

    import importlib

    from harness.gpu_check import checks as measurement, matrix

    calibrate, vtw = importlib.import_module("lazyattn.calibration"), importlib.import_module("lazyattn.vtw")
    gpu = ph.profile == "gpu"
    device = torch.device("cuda" if gpu else "cpu")
    if not gpu:
        torch.set_num_threads(1)
    ph.use_device(torch.cuda.get_device_name(device) if gpu else "cpu")
    fams = list(matrix.FAMILIES) if gpu else CPU["correctness_families"]
    dtypes = CORRECTNESS_DTYPES if gpu else CPU["correctness_dtypes"]
    impls = ["sdpa", "eager", "sdpa_flash"] + (["flash_attention_2"] if matrix.flash_available() else [])
    cells = [f"{f}/{m}/{d}/{'padded' if p else 'unpadded'}" for f in fams for d in dtypes
             for m in matrix.entries(f) for p in (False, True)]
    ph.plan([("checks", 1), *((c, 1) for c in cells)])
    points = ph.data["points"]
    if "checks" not in points:
        checks: dict = {}
        for name, fn in (("mask", lambda: measurement.mask_check(device, "float16" if gpu else "float32")),
                         ("timing_protocol", lambda: measurement.protocol_check(device)),
                         ("calibration", lambda: _calibration_check(device, calibrate, vtw))):
            try:
                checks[name] = fn()
            except Exception as err:
                checks[name] = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:500]}"}
                print(traceback.format_exc(), file=sys.stderr)
        checks["ok"] = all(c.get("ok") for c in checks.values() if isinstance(c, dict))
        ph.record("checks", checks)

    def save(current: dict) -> None:
        for cell in current["cells"]:
            points[cell["key"]] = {**cell, "device_slug": ph.device_slug}
        ph.data["matrix"] = {k: v for k, v in current.items() if k != "cells"}
        ph.save()

    previous = {"cells": [p for k, p in points.items() if k != "checks"]}
    result = matrix.correctness(device, dtypes, impls, None, families_=fams, previous=previous, save=save,
                                stop_at=ph.stop_at)
    ph.data["matrix"] = {k: v for k, v in result.items() if k != "cells"}
    # findings, not a broken phase: the phase ran; the summary lists every failing cell and check
    ph.data["failed_cells"] = [c["key"] for c in result["cells"] if not c["ok"]]
    ph.data["checks_ok"] = bool(points["checks"].get("ok"))
    if not gpu:
        return "skipped"
    return "done" if not ph.todo() else "partial"


def _calibration_check(device, calibrate, vtw) -> dict:
    """``method.layers=auto`` (layer_divergence) and VTW ``k=auto`` (withdrawal_kl) on ``device``:
    their float64 sums live on the CPU while the model's scalars are on the device."""
    import torch

    from harness.gpu_check import matrix
    from harness.models import families

    family, text, vision = matrix.FAMILIES["llava_llama"]
    loaded = families.build_random(family, text, vision, device=device, initializer_range=matrix.INIT_RANGE)
    batches = [matrix.two_prompts(loaded, device, padded=p) for p in (False, True)]
    div = calibrate.layer_divergence(loaded.model, batches)
    kl = vtw.withdrawal_kl(loaded.model, batches)
    ok = bool(torch.isfinite(div).all()) and div.shape[0] == matrix.N_LAYERS and len(kl) == matrix.N_LAYERS
    return {"ok": ok and all(k == k for k in kl), "layer_divergence_max": float(div.max()), "withdrawal_kl": kl}


RUNNERS = {"env": phase_env, "throughput": phase_throughput, "correctness": phase_correctness,
           "pruning": phase_pruning, "budget": phase_budget}
