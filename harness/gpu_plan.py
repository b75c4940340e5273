"""The device call's phases (docs/gpu.md): ``python -m harness.gpu_plan PHASE --out DIR [--tier N]``.

``tools/gpu_call.py`` runs each phase in its own process with its own timeout, in the order of
``tools/gpu_call.py``'s ``STEPS`` (by value), so a CUDA device-side assert or a hang in one phase
loses nothing of the others. Each phase writes ``DIR/<phase>.json`` atomically after every point,
so a phase that is killed keeps its finished points, and reads it back first: a folder of partial
results carried back in continues where it stopped (points measured on another device are redone).

Phases (``--profile gpu``, the default on CUDA; the points of ``--tier N`` only, tier 1 first):

- ``env``: the machine, the packages (the carried transformers must be the one imported), a
  device-to-device copy and a bf16 matmul against the card's peak, so a broken machine shows first;
- ``throughput``: ``model=llava15_7b_random`` (float16, sdpa): dense, Lazy r=0.5, r=0.7 and the
  ``share=qkv`` reading at 0.35, and the backend control (``dense_explicit``: dense with explicit
  decode attention, as anchors form theirs); at the first point dense, r=0.5 and r=0.7 once more
  with compiled static-graph decode steps (CUDA graphs); all variants of a point timed in one ABBA set
  (``harness.measure.interleaved``): decode-only and end-to-end tokens/s, KV bytes, peak memory;
  batch 1, 8, 32 x the 584-token prompt and 2048 tokens, 128 new tokens, point-major;
- ``correctness``: the mask and timing-protocol checks, calibration and VTW's ``k=auto`` on the
  device, then every family x method in float16 and bfloat16, eager and sdpa, and PyTorch's flash
  kernel forced on the unpadded cells (``harness.gpu_check.matrix``: every registered method at the
  settings it gives for checks, ``lazyattn.examples_of``);
- ``pruning``: FastV, SparseVLM, VTW and Lazy+FastV against dense at batch 8, and every other registered
  token pruner defined for LLaVA-1.5 (PruMerge+, a method registered from code) at the settings it
  gives for checks (``pruning_variants``; HiRED, LLaVA-NeXT only, is in the correctness matrix);
- ``budget``: the fixed device-memory budget (dense's peak at batch 8) at 2048 tokens: each
  method's largest batch and its throughput there (``harness.bench.budget_plan`` / ``run_budget``).

Without CUDA (``--profile cpu``, ``make gpu-dryrun``) every phase runs the same code on the tiny
random LLaVA in seconds and says the GPU readings were skipped (``status: skipped``); a crash
is ``failed`` either way. A phase stops before a point it cannot finish by ``--stop-at`` (its
estimate, scaled by what this call has measured), leaving it ``not_run`` for the next call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

PHASES = ("env", "throughput", "correctness", "pruning", "budget")
MODEL_7B = "model=llava15_7b_random"
PROMPT_7B = 584  # 576 image tokens and the question
LOAD_S = 30  # estimated: a phase's imports, CUDA start and the 7B model built on the GPU
NEW_TOKENS = 128
REPEATS, WARMUP = 5, 1
LAZY_VARIANTS = ["lazy ratio=0.5", "lazy ratio=0.7", "lazy ratio=0.35 share=qkv"]
# the backend control beside them: dense with every layer's decode attention formed explicitly, as an anchor's is
CONTROL_VARIANTS = ["dense_explicit"]
COMPILED_VARIANTS = 3  # dense and the first two lazy settings, once more as compiled static-graph decode steps
PRUNING_VARIANTS = ["fastv ratio=0.5", "sparsevlm budget=128", "vtw k=16", "lazy_fastv"]
TIMED_FAMILY, TIMED_LAYERS = "llava", 32  # the timed model's (LLaVA-1.5-7B) family and depth
# (batch, context length or None for the 584-token prompt, tier): by value, point-major
THROUGHPUT_POINTS = [(8, None, 1), (32, 2048, 1), (1, None, 2), (32, None, 2), (8, 2048, 2), (1, 2048, 2)]
PRUNING_POINTS = [(8, None, 1), (8, 2048, 2)]
BUDGET_CONTEXT, BUDGET_REFERENCE_BATCH = 2048, 8
BUDGET_GROUPS = [("lazy", LAZY_VARIANTS, 1), ("pruning", PRUNING_VARIANTS, 2)]  # the budget's pruners: the named ones
CORRECTNESS_DTYPES = ["float16", "bfloat16"]
# bf16 dense matmul peak (FLOP/s, vendor figures without sparsity) by device name, specific first
PEAK_BF16 = (("h200", 989e12), ("h100 pcie", 756e12), ("h100", 989e12), ("a100", 312e12))
# What the CPU profile runs instead (the same code on the tiny random LLaVA, in seconds)
CPU = {"model": "model=llava_tiny_random", "new_tokens": 4, "repeats": 1, "warmup": 0,
       "throughput": [(1, None, 1), (2, None, 2)], "pruning": [(2, None, 1)], "budget_reference_batch": 2,
       "correctness_families": ["llava_llama", "qwen2_vl"], "correctness_dtypes": ["float32"],
       "replace": {"vtw k=16": "vtw k=6"}}  # the tiny model has 12 layers


def slug(name: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_json(path: Path, data) -> None:
    """Atomic (a temporary file beside it, then a rename): a killed phase never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


# ---- point estimates (seconds on one H100; estimates, not readings) ------------------------------


def estimate_run_s(batch: int, prompt: int, new_tokens: int) -> float:
    """One timed generate of LLaVA-1.5-7B (float16) on an H100: the prefill at ~400 TFLOP/s, each
    decode step the larger of ~22 ms of host overhead and its bytes (13.5 GB of weights plus the
    KV cache) at ~2.6 TB/s."""
    prefill = 2 * 7e9 * batch * prompt / 4e14
    step = max(0.022, (13.5e9 + batch * (prompt + new_tokens / 2) * 2**19) / 2.6e12)
    return prefill + new_tokens * step


def estimate_point_s(n_variants: int, batch: int, prompt: int, new_tokens: int = NEW_TOKENS,
                     repeats: int = REPEATS, warmup: int = WARMUP) -> float:
    """All variants of one point in one ABBA set: ``repeats`` timed runs and ``warmup`` short ones each."""
    run, short = estimate_run_s(batch, prompt, new_tokens), estimate_run_s(batch, prompt, 4)
    return n_variants * (repeats * run + warmup * short)


def estimate_budget_s(n_variants: int, prompt: int = BUDGET_CONTEXT, new_tokens: int = NEW_TOKENS) -> float:
    """Peaks at batch 1 and 2 per variant, dense at the reference batch, one verifying run per
    variant near batch 10, then the ABBA set there."""
    one, two = estimate_run_s(1, prompt, new_tokens), estimate_run_s(2, prompt, new_tokens)
    ref = estimate_run_s(BUDGET_REFERENCE_BATCH, prompt, new_tokens)
    big = estimate_run_s(10, prompt, new_tokens)
    return n_variants * (one + two + big) + ref + estimate_point_s(n_variants, 10, prompt, new_tokens)


# ---- the phase file --------------------------------------------------------------------------------


class Phase:
    """``OUT/<name>.json``: the plan (point keys and tiers), finished points, status, seconds."""

    def __init__(self, name: str, out: Path, profile: str, tier: int, stop_at: float | None) -> None:
        self.name, self.out, self.profile, self.tier, self.stop_at = name, out, profile, tier, stop_at
        self.path = out / f"{name}.json"
        self.started = time.time()
        data = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                data = {}
        self.data = {"phase": name, "status": "running", "profile": profile, "plan": [], "points": {},
                     "complete_tiers": [], "seconds": 0.0, "runs": [], **data}
        self.data.update(status="running", profile=profile)
        self.device_slug: str | None = None
        self.factor = 1.0  # measured / estimated seconds, from this call's points

    def use_device(self, device_name: str) -> None:
        """Points measured on another device are dropped (redone here)."""
        self.device_slug = slug(device_name)
        if self.data.get("device_slug") not in (None, self.device_slug):
            self.data["dropped_from"] = self.data.get("device_slug")
            self.data["points"] = {}
            self.data["complete_tiers"] = []
        self.data["device_slug"] = self.device_slug
        self.data["device_name"] = device_name

    def plan(self, keys: list[tuple[str, int]]) -> None:
        self.data["plan"] = [{"key": k, "tier": t} for k, t in keys]

    def todo(self) -> list[str]:
        return [p["key"] for p in self.data["plan"] if p["tier"] == self.tier and p["key"] not in self.data["points"]]

    def left(self) -> float:
        return float("inf") if self.stop_at is None else self.stop_at - time.time()

    def fits(self, estimate_s: float | None) -> bool:
        """Whether a point estimated at ``estimate_s`` (GPU seconds) can finish before ``stop_at``."""
        if estimate_s is None or self.profile != "gpu":
            return self.left() > 0
        return estimate_s * self.factor <= self.left()

    def record(self, key: str, point: dict, estimate_s: float | None = None) -> None:
        self.data["points"][key] = {**point, "device_slug": self.device_slug, "finished": now()}
        if estimate_s and self.profile == "gpu" and point.get("seconds"):
            self.factor = max(0.25, point["seconds"] / estimate_s)
        self.save()

    def save(self) -> None:
        self.data["not_run"] = [p["key"] for p in self.data["plan"] if p["key"] not in self.data["points"]]
        done = {p["tier"] for p in self.data["plan"]} - {p["tier"] for p in self.data["plan"]
                                                          if p["key"] not in self.data["points"]}
        self.data["complete_tiers"] = sorted(done)
        write_json(self.path, self.data)

    def finish(self, status: str, note: str | None = None) -> None:
        seconds = time.time() - self.started
        self.data["status"] = status
        if note:
            self.data["note"] = note
        self.data["seconds"] = float(self.data.get("seconds") or 0.0) + seconds
        self.data["runs"] = [*self.data.get("runs", []), {"tier": self.tier, "seconds": round(seconds, 1),
                                                          "status": status, "ended": now()}]
        self.save()


# ---- shared helpers ----------------------------------------------------------------------------------


def point_key(batch: int, context: int | None) -> str:
    return f"B{batch}/{'prompt' if context is None else context}"


def _load(profile: str, threads: int | None = None):
    """The model of the profile on its device, via the bench's config (``conf/bench.yaml``)."""
    import torch

    from harness.config import compose
    from harness.device import setup
    from harness.models import load_model

    overrides = [MODEL_7B, "device=cuda"] if profile == "gpu" else [CPU["model"], "device=cpu"]
    if threads:
        overrides.append(f"threads={threads}")
    cfg = compose(overrides, config_name="bench")
    device = setup(cfg)
    loaded = load_model(cfg.model, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loaded, device


def pruning_variants() -> list[str]:
    """``PRUNING_VARIANTS``, then every other registered method that prunes tokens (its plan has a
    ``pruner``), is not a composition and is defined for the timed model's family, as a bench entry
    at the settings it gives for checks (``lazyattn.examples_of``)."""
    import lazyattn

    named = {entry.split()[0] for entry in PRUNING_VARIANTS}
    out = list(PRUNING_VARIANTS)
    for name in lazyattn.METHODS:
        if name in named or lazyattn.parts_of(name):
            continue
        for spec in lazyattn.examples_of(name, TIMED_LAYERS, TIMED_FAMILY).values():
            plan = lazyattn.build(spec).plan(TIMED_LAYERS)
            if plan.pruner is not None and (plan.families is None or TIMED_FAMILY in plan.families):
                out.append(" ".join([name, *(f"{k}={v}" for k, v in spec.items() if k != "name")]))
    return out


def _variants(entries: list[str], profile: str = "gpu"):
    import lazyattn
    from harness import bench

    if profile != "gpu":
        entries = [CPU["replace"].get(e, e) for e in entries]
    return [bench.Variant(label="dense", config="dense", method=lazyattn.Dense()),
            *(bench.make_variant(e) for e in entries)]


FIGURES = ("prefill_ms", "prefill_ms_iqr", "decode_tokens_per_s", "decode_tokens_per_s_iqr", "e2e_tokens_per_s",
           "e2e_tokens_per_s_iqr", "kv_cache_bytes", "peak_memory_bytes", "decode_bandwidth_bytes_per_s",
           "bandwidth_utilisation", "decode_step_bytes", "decode_weight_bytes", "decode_kv_read_bytes",
           "decode_read_terms", "graph_note", "lazy_layers",
           "repeats", "cache")


def time_point(model, prompts, variants, batch: int, context: dict, new_tokens: int, repeats: int,
               warmup: int, compiled: bool = False) -> dict:
    """Every variant of one point (dense first) in one ABBA set, on the preallocated cache, and dense
    once more on transformers' concatenating cache (``dense dynamic``: what the copying costs);
    with ``compiled``, dense and the first lazy settings once more with their decode steps compiled
    as one static graph (``harness.generate.compiled_decode``: CUDA graphs on a GPU); figures, ratios
    to dense and the speed-up the bytes per step predict."""
    import torch

    from harness import measure
    from lazyattn.arch import decoder_layers

    inputs = prompts.inputs(context["extra_words"], batch)
    timed = {v.label: (inputs, v.method, "static") for v in variants}
    timed["dense dynamic"] = (inputs, variants[0].method, "dynamic")
    extra = ["dense dynamic"]
    if compiled:
        for v in variants[:COMPILED_VARIANTS]:
            timed[f"{v.label} compiled"] = (inputs, v.method, {"cache": "static", "compile": True})
            extra.append(f"{v.label} compiled")
    start = time.time()
    summaries = measure.interleaved(model, timed, new_tokens=new_tokens, repeats=repeats, warmup=warmup)
    seconds = time.time() - start
    dense = summaries[variants[0].label]
    rows = {}
    for label in [v.label for v in variants] + extra:
        v = next((x for x in variants if x.label == label), None) or next(
            (x for x in variants[::-1] if label.startswith(x.label)), variants[0])
        s = summaries[label]
        row = {k: s.get(k) for k in FIGURES}
        if label != variants[0].label:
            row.update(measure.speedups(dense, s))
            row["kv_fraction"] = s["kv_cache_bytes"] / dense["kv_cache_bytes"]
            if s.get("peak_memory_bytes") and dense.get("peak_memory_bytes"):
                row["memory_fraction"] = s["peak_memory_bytes"] / dense["peak_memory_bytes"]
            if v.method.plan(len(decoder_layers(model))).host_sync:
                row["host_sync"] = True
        rows[label] = row
    del inputs
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"batch_size": batch, "context_length": context["context_length"],
            "prompt_tokens": context["prompt_tokens"], "new_tokens": new_tokens, "order": "abba",
            "variants": [v.label for v in variants], "rows": rows, "seconds": round(seconds, 1),
            "device_name": _device_name(inputs_device(model))}


def inputs_device(model):
    return next(model.parameters()).device


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# ---- phases ---------------------------------------------------------------------------------------


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
    git = Path(__file__).resolve().parent.parent / ".whl" / "GIT_SHA"
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
    loaded, device = _load(ph.profile, threads=None if gpu else 1)
    ph.use_device(_device_name(device))
    model = loaded.model
    variants = _variants(entries, ph.profile)
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
    loaded, device = _load(ph.profile, threads=None if gpu else 1)
    model = loaded.model
    dev = device_info(device)
    ph.use_device(_device_name(device))
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
            variants = _variants(groups[key], ph.profile)
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


if __name__ == "__main__":
    sys.exit(main())
