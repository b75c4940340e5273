"""Efficiency measurement: KV cache bytes, device memory, prefill latency, decode and end-to-end
throughput, achieved bandwidth.

Dense and method run on the same inputs in the same process. After one warm-up run of each,
the repeats alternate the order (ABBA: dense, method, method, dense, dense, method, ...), so
that drift on a noisy machine, and whatever the previous run leaves behind (allocator state,
clocks, caches), hits both alike. On CUDA there are at least ``MIN_CUDA_REPEATS`` repeats.
Each repeat is what ``generate`` does: a prefill forward that computes the logits of the last
position only (``logits_to_keep=1``), then ``new_tokens`` single-token decode forwards fed with
the greedy token (no early stop). The prefill and the decode loop are timed separately, with the
device synchronised at the edges of each. Every figure is the median over repeats, with its
interquartile range (``*_iqr``) beside it.

Per run: KV bytes counted from the cache tensors themselves after every forward (the peak kept);
on CUDA the peak allocated device memory (``torch.cuda.max_memory_allocated``, reset before each
run, so it covers the weights, activations and the cache); and the bytes a decode step must read
(the decoder weights it touches plus the KV cache it attends over), which over the step's time is
the achieved bandwidth, compared with the device's peak (``PEAK_BANDWIDTH``) as gpt-fast does.

Speed-ups are method over dense, higher is better: ``decode_speedup`` and ``e2e_speedup`` are
throughput ratios, ``prefill_speedup`` is dense's latency over the method's.
"""

from __future__ import annotations

import contextlib
import inspect
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from transformers import DynamicCache

from lazyattn import kv_cache_bytes
from lazyattn.arch import decoder_layers

MIN_CUDA_REPEATS = 5
# Peak memory bandwidth (bytes/s) by device name (the first pattern found in
# torch.cuda.get_device_name, lower case, wins; so the specific ones come first). Vendor figures.
PEAK_BANDWIDTH = (
    ("h200", 4.8e12),  # H200 SXM and NVL, HBM3e
    ("h100 nvl", 3.9e12),
    ("h100 pcie", 2.0e12),
    ("h100", 3.35e12),  # H100 SXM5 80GB HBM3
    ("a100-sxm4-80gb", 2.039e12),
    ("a100 80gb pcie", 1.935e12),
    ("a100-pcie-80gb", 1.935e12),
    ("a100-sxm4-40gb", 1.555e12),
    ("a100-pcie-40gb", 1.555e12),
    ("a100", 1.555e12),
)
SPARSEVLM_HOST_SYNC = (
    "SparseVLM selects tokens with per-sample Python loops that read device values on the host "
    "(one synchronisation per sample and stage at prefill): its prefill time includes those stalls."
)


def peak_bandwidth(device_name: str | None) -> float | None:
    """The device's peak memory bandwidth in bytes/s, or None when not in the table."""
    name = (device_name or "").lower()
    return next((bw for pattern, bw in PEAK_BANDWIDTH if pattern in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_kwarg(model) -> str:
    """transformers 5.24 renamed forward's ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _keep_kwarg(model) -> dict:
    """``logits_to_keep=1`` where the model takes it (every supported family does), as generate."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def qk_weight_share(model: nn.Module) -> float:
    """The q_proj + k_proj share of the decoder layers' weight bytes (about 0.166 on LLaVA-1.5-7B)."""
    layers = decoder_layers(model)
    total = sum(_bytes(layer) for layer in layers)
    qk = sum(_bytes(layer.self_attn.q_proj) + _bytes(layer.self_attn.k_proj) for layer in layers)
    return qk / total


def predicted_ceilings(model: nn.Module, n_lazy: int) -> dict:
    """The decode speed-up a lazy fraction ``f`` of layers can give at most: weight-bound (a lazy
    layer skips q_proj and k_proj: ``1 / (1 - s f)``, ``s`` the q/k share of decoder weights) and
    KV-bound (a lazy layer keeps no keys: ``1 / (1 - f / 2)``)."""
    n_layers = len(decoder_layers(model))
    f = n_lazy / n_layers
    share = qk_weight_share(model)
    return {"lazy_layers": n_lazy, "lazy_fraction": f, "qk_weight_share": share,
            "weight_bound": 1 / (1 - share * f), "kv_bound": 1 / (1 - f / 2)}


def decode_weight_bytes(model: nn.Module, lazy: set[int]) -> int:
    """Weight bytes one decode step reads: every decoder layer (less q_proj and k_proj in the
    ``lazy`` layers), the final norm and the LM head. The vision tower is not run when decoding."""
    layers = decoder_layers(model)
    total = sum(_bytes(layer) for layer in layers)
    total -= sum(_bytes(layers[i].self_attn.q_proj) + _bytes(layers[i].self_attn.k_proj) for i in lazy)
    decoder = model.get_decoder()
    norm = getattr(decoder, "norm", None)
    head = model.get_output_embeddings()
    return total + (_bytes(norm) if norm is not None else 0) + (_bytes(head) if head is not None else 0)


def lazy_cache_layers(cache) -> set[int]:
    """The layers whose cache holds values only (Lazy Attention's layers)."""
    layers = getattr(cache, "layers", [])
    return {i for i, layer in enumerate(layers) if getattr(layer, "keys", 0) is None}


@torch.inference_mode()
def generate_once(model, inputs: dict, new_tokens: int) -> dict:
    """One timed prefill + decode, as ``generate`` runs them. Returns seconds, the peak KV bytes,
    the peak device memory (None off CUDA), the bytes the decode steps read, and the lazy layers.

    Decode steps pass the attention mask only when the prompt is padded: without one, every
    model places the new token itself (positions continue from the cache length; Qwen2-VL adds
    its M-RoPE offset), whereas a full-length mask would make Qwen2-VL compute positions for the
    whole sequence. The efficiency prompts are one prompt repeated, so they are never padded.
    """
    device = inputs["input_ids"].device
    cuda = device.type == "cuda"
    cache = DynamicCache(config=model.config)
    mask = inputs["attention_mask"]
    padded = not bool(mask.all())
    cache_arg = _cache_kwarg(model)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    out = model(**inputs, **{cache_arg: cache}, use_cache=True, **_keep_kwarg(model))
    token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    t1 = time.perf_counter()
    peak = kv_cache_bytes(cache)
    kv_read = 0
    for _ in range(new_tokens):
        if padded:  # an unpadded prompt decodes without a mask
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=token, attention_mask=mask if padded else None, **{cache_arg: cache}, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        kv = kv_cache_bytes(cache)  # tensor sizes only: no device sync
        kv_read += kv  # the step attends over the whole cache, its own token included
        peak = max(peak, kv)
    _sync(device)
    t2 = time.perf_counter()
    return {
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "kv_cache_bytes": peak,
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)) if cuda else None,
        "kv_read_bytes": kv_read,
        "lazy_layers": sorted(lazy_cache_layers(cache)),
    }


def iqr(values) -> float:
    """Interquartile range (inclusive quartiles); 0 for fewer than two values."""
    values = list(values)
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def e2e_tokens_per_s(batch_size: int, new_tokens: int, prefill_s: float, decode_s: float) -> float:
    """End-to-end generation throughput: batch x new tokens over prefill + decode time."""
    return batch_size * new_tokens / (prefill_s + decode_s)


def summarise(runs: list[dict], batch_size: int, new_tokens: int, model=None, peak_bw: float | None = None) -> dict:
    prefill = [1e3 * r["prefill_s"] for r in runs]
    decode = [batch_size * new_tokens / r["decode_s"] for r in runs]
    e2e = [e2e_tokens_per_s(batch_size, new_tokens, r["prefill_s"], r["decode_s"]) for r in runs]
    memory = [r.get("peak_memory_bytes") for r in runs]
    out = {
        "kv_cache_bytes": max(r["kv_cache_bytes"] for r in runs),
        "peak_memory_bytes": None if any(m is None for m in memory) else max(memory),
        "prefill_ms": statistics.median(prefill),
        "prefill_ms_iqr": iqr(prefill),
        "decode_tokens_per_s": statistics.median(decode),
        "decode_tokens_per_s_iqr": iqr(decode),
        "e2e_tokens_per_s": statistics.median(e2e),
        "e2e_tokens_per_s_iqr": iqr(e2e),
        "repeats": len(runs),
    }
    if model is not None and "kv_read_bytes" in runs[0]:
        lazy = set(runs[0].get("lazy_layers") or [])
        step_bytes = decode_weight_bytes(model, lazy) + runs[0]["kv_read_bytes"] / new_tokens
        bandwidth = statistics.median(step_bytes * new_tokens / r["decode_s"] for r in runs)
        out.update(
            decode_step_bytes=int(step_bytes),
            decode_bandwidth_bytes_per_s=bandwidth,
            bandwidth_utilisation=bandwidth / peak_bw if peak_bw else None,
            lazy_layers=sorted(lazy),
        )
    return out


def repeats_for(device: torch.device | str, repeats: int) -> int:
    """At least ``MIN_CUDA_REPEATS`` on CUDA; as asked elsewhere."""
    return max(repeats, MIN_CUDA_REPEATS) if torch.device(device).type == "cuda" else repeats


def abba_order(names: list[str], repeats: int) -> list[str]:
    """The timed runs in order: forward in even rounds, backward in odd ones (A B, B A, A B ...)."""
    order = []
    for r in range(repeats):
        order += names if r % 2 == 0 else names[::-1]
    return order


def device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def interleaved(
    model,
    variants: dict[str, tuple[dict, Callable[[], contextlib.AbstractContextManager]]],
    new_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
) -> dict[str, dict]:
    """Several variants, each ``name -> (inputs, context factory)``, timed in ABBA order in this
    process (``abba_order``); each variant's summary over its own inputs' batch size."""
    device = next(iter(variants.values()))[0]["input_ids"].device
    repeats = repeats_for(device, repeats)
    peak_bw = peak_bandwidth(device_name(device))
    for _ in range(warmup):
        for inputs, ctx in variants.values():
            with ctx():
                generate_once(model, inputs, min(new_tokens, 4))
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for name in abba_order(list(variants), repeats):
        inputs, ctx = variants[name]
        with ctx():
            runs[name].append(generate_once(model, inputs, new_tokens))
    return {
        name: summarise(runs[name], inputs["input_ids"].shape[0], new_tokens, model, peak_bw)
        for name, (inputs, _) in variants.items()
    }


def uses_sparsevlm(method) -> bool:
    from lazyattn import SparseVLM

    return isinstance(method, SparseVLM) or isinstance(getattr(method, "pruner", None), SparseVLM)


def speedups(dense: dict, method: dict) -> dict:
    """Method over dense, higher is better."""
    return {
        "kv_reduction": 1.0 - method["kv_cache_bytes"] / dense["kv_cache_bytes"],
        "decode_speedup": method["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
        "e2e_speedup": method["e2e_tokens_per_s"] / dense["e2e_tokens_per_s"],
        "prefill_speedup": dense["prefill_ms"] / method["prefill_ms"],
    }


def compare(
    model,
    inputs: dict,
    method_ctx: Callable[[], contextlib.AbstractContextManager],
    new_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    method=None,
) -> dict:
    """Dense vs method on identical inputs: both figures and the speed-ups (method over dense).
    ``method``, when given, adds the notes that concern it (``host_sync`` for SparseVLM)."""
    summaries = interleaved(
        model,
        {"dense": (inputs, contextlib.nullcontext), "method": (inputs, method_ctx)},
        new_tokens=new_tokens,
        repeats=repeats,
        warmup=warmup,
    )
    dense, method_summary = summaries["dense"], summaries["method"]
    device = inputs["input_ids"].device
    out = {
        "device": str(device),
        "device_name": device_name(device),
        "batch_size": inputs["input_ids"].shape[0],
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "new_tokens": new_tokens,
        "order": "abba",
        "peak_bandwidth_bytes_per_s": peak_bandwidth(device_name(device)),
        "dense": dense,
        "method": method_summary,
        **speedups(dense, method_summary),
        "predicted_decode_ceiling": predicted_ceilings(model, len(method_summary.get("lazy_layers", []))),
    }
    if method is not None and uses_sparsevlm(method):
        out["host_sync"] = SPARSEVLM_HOST_SYNC
    return out
