"""The run-level settings, checked before any data or model is touched: each refusal a ``RunError``
of one line that names its key and says what to pass."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig


class RunError(Exception):
    """A problem with the run's settings, reported as one clear line."""


def positive_int(value: Any, key: str, minimum: int = 1, allow_none: bool = False) -> int | None:
    """``value`` as an int >= ``minimum``, or a RunError that names ``key`` and says what to pass."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = f"an integer >= {minimum}" + (" or null" if allow_none else "")
        raise RunError(f"{key} must be {what}, got {value!r}; e.g. {key}={max(minimum, 16)}.")
    return value


def check_run(cfg: DictConfig) -> None:
    """The run-level settings, checked before any data or model is touched."""
    positive_int(cfg.limit, "limit", allow_none=True)
    positive_int(cfg.batch_size, "batch_size")
    positive_int(cfg.seed, "seed", minimum=0)
    if cfg.get("threads") is not None:
        positive_int(cfg.threads, "threads")
    eff = cfg.efficiency
    if eff.enabled:
        positive_int(eff.batch_size, "efficiency.batch_size")
        positive_int(eff.new_tokens, "efficiency.new_tokens")
        positive_int(eff.repeats, "efficiency.repeats")
        positive_int(eff.warmup, "efficiency.warmup", minimum=0)
    cal = cfg.calibration
    if cal.get("select", "pairwise") not in ("pairwise", "anchor", "blocks"):
        raise RunError(f"calibration.select must be pairwise, anchor or blocks (the paper's rule), got {cal.select!r}.")
    if cal.get("select") == "blocks" and cal.get("max_per_anchor") is not None:
        raise RunError("calibration.select=blocks takes no calibration.max_per_anchor (it merges every layer below "
                       "epsilon into its block); drop one of them.")
    positive_int(cal.get("max_per_anchor"), "calibration.max_per_anchor", allow_none=True)
    positive_int(cal.get("samples"), "calibration.samples")
    threshold = cal.get("threshold")
    # a JS divergence is >= 0: a negative threshold selects no lazy layer at all, and the run would
    # report "lazy layers none" as if it were a result
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or threshold < 0):
        raise RunError(f"calibration.threshold must be a JS divergence >= 0 (or null: method.ratio decides), "
                       f"got {threshold!r}; e.g. calibration.threshold=0.05.")
    check_cache(cfg.get("cache", "static"))
    resolve_device(str(cfg.device))


def check_dtype(cfg: DictConfig) -> None:
    """float16 on a CPU refused in one line: its kernels are slow emulation, so the timings mean
    nothing, and a run would go on silently with KV bytes half float32's. ``model.dtype=auto`` is
    judged by the dtype it would read, a checkpoint's config.json."""
    if resolve_device(str(cfg.device)).type != "cpu":
        return
    dtype, read = str(cfg.model.get("dtype", "auto")), ""
    if dtype == "auto" and cfg.model.get("path"):
        try:
            config = json.loads((Path(str(cfg.model.path)).expanduser() / "config.json").read_text())
        except (OSError, ValueError):
            return  # the checkpoint check says what is wrong with it
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "auto")
        read = " (model.dtype=auto: config.json)"
    if dtype == "float16":
        raise RunError(f"model.dtype=float16{read} on a CPU: emulated half-precision kernels make timings meaningless; "
                       "pass model.dtype=float32 (or bfloat16), or run on device=cuda.")


def check_cache(cache) -> None:
    from lazyattn.cache import CACHE_KINDS

    if cache not in CACHE_KINDS:
        raise RunError(f"cache must be static (preallocated, written in place) or dynamic (transformers' "
                       f"concatenating DynamicCache), got {cache!r}.")


def resolve_device(name: str) -> torch.device:
    """The device a ``device=`` setting names (``auto``: CUDA where one is visible), or a RunError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise RunError(f"device must be auto, cpu or cuda, got {name!r}.")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError("device=cuda but no CUDA device is visible; use device=cpu or device=auto.")
    return torch.device(name)
