"""The device call's plan: its phases, their points and settings (GPU and CPU profiles), each point's
estimated GPU seconds, and a phase's file (``Phase``: ``OUT/<phase>.json``, written after every point,
read back to continue). Standard library only: ``tools/gpu_call.py`` and a broken machine's ``env``
phase import it before anything else loads."""

from __future__ import annotations

import json
import os
import time
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


def point_key(batch: int, context: int | None) -> str:
    return f"B{batch}/{'prompt' if context is None else context}"
