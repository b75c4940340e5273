"""Efficiency measurement: KV cache bytes, prefill latency and decode throughput.

Dense and method run on the same inputs in the same process, interleaved repeat by repeat so
that drift on a noisy machine hits both alike. Each repeat is a prefill forward followed by
``new_tokens`` single-token decode forwards fed with the greedy token (no early stop), timed
separately with the device synchronised around each timed region; the figures are medians.
KV bytes are counted from the cache tensors themselves, after every forward, and the peak kept.
"""

from __future__ import annotations

import contextlib
import inspect
import statistics
import time
from collections.abc import Callable

import torch
from transformers import DynamicCache

from lazyattn import kv_cache_bytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_kwarg(model) -> str:
    """transformers 5.24 renamed forward's ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def generate_once(model, inputs: dict, new_tokens: int) -> dict[str, float]:
    """One timed prefill + decode. Returns seconds and the peak KV bytes seen.

    Decode steps pass the attention mask only when the prompt is padded: without one, every
    model places the new token itself (positions continue from the cache length; Qwen2-VL adds
    its M-RoPE offset), whereas a full-length mask would make Qwen2-VL compute positions for the
    whole sequence. The efficiency prompts are one prompt repeated, so they are never padded.
    """
    device = inputs["input_ids"].device
    cache = DynamicCache(config=model.config)
    mask = inputs["attention_mask"]
    padded = not bool(mask.all())
    cache_arg = _cache_kwarg(model)
    _sync(device)
    t0 = time.perf_counter()
    out = model(**inputs, **{cache_arg: cache}, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    t1 = time.perf_counter()
    peak = kv_cache_bytes(cache)
    decode_s = 0.0
    for _ in range(new_tokens):
        if padded:  # an unpadded prompt decodes without a mask
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        _sync(device)
        t = time.perf_counter()
        out = model(input_ids=token, attention_mask=mask if padded else None, **{cache_arg: cache}, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        decode_s += time.perf_counter() - t
        peak = max(peak, kv_cache_bytes(cache))
    return {"prefill_s": t1 - t0, "decode_s": decode_s, "kv_cache_bytes": peak}


def summarise(runs: list[dict], batch_size: int, new_tokens: int) -> dict[str, float]:
    return {
        "kv_cache_bytes": max(r["kv_cache_bytes"] for r in runs),
        "prefill_ms": 1e3 * statistics.median(r["prefill_s"] for r in runs),
        "decode_tokens_per_s": statistics.median(batch_size * new_tokens / r["decode_s"] for r in runs),
        "repeats": len(runs),
    }


def interleaved(
    model,
    variants: dict[str, tuple[dict, Callable[[], contextlib.AbstractContextManager]]],
    new_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
) -> dict[str, dict[str, float]]:
    """Several variants, each ``name -> (inputs, context factory)``, timed round-robin repeat by
    repeat in this process; each variant's summary over its own inputs' batch size."""
    for _ in range(warmup):
        for inputs, ctx in variants.values():
            with ctx():
                generate_once(model, inputs, min(new_tokens, 4))
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (inputs, ctx) in variants.items():
            with ctx():
                runs[name].append(generate_once(model, inputs, new_tokens))
    return {
        name: summarise(runs[name], inputs["input_ids"].shape[0], new_tokens) for name, (inputs, _) in variants.items()
    }


def compare(
    model,
    inputs: dict,
    method_ctx: Callable[[], contextlib.AbstractContextManager],
    new_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
) -> dict:
    """Dense vs method on identical inputs: both figures and their ratios."""
    summaries = interleaved(
        model,
        {"dense": (inputs, contextlib.nullcontext), "method": (inputs, method_ctx)},
        new_tokens=new_tokens,
        repeats=repeats,
        warmup=warmup,
    )
    dense, method = summaries["dense"], summaries["method"]
    return {
        "device": str(inputs["input_ids"].device),
        "batch_size": inputs["input_ids"].shape[0],
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "new_tokens": new_tokens,
        "dense": dense,
        "method": method,
        "kv_reduction": 1.0 - method["kv_cache_bytes"] / dense["kv_cache_bytes"],
        "decode_speedup": method["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
        "prefill_speedup": dense["prefill_ms"] / method["prefill_ms"],
    }
