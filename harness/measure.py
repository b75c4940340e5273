"""Efficiency measurement: KV cache bytes, device memory, prefill latency, decode and end-to-end
throughput, achieved bandwidth.

Dense and method run on the same inputs in the same process. After one warm-up run of each,
the repeats alternate the order (ABBA: dense, method, method, dense, dense, method, ...), so
that drift on a noisy machine, and whatever the previous run leaves behind (allocator state,
clocks, caches), hits both alike. On CUDA there are at least ``MIN_CUDA_REPEATS`` repeats.
Each repeat is the harness's own decode loop (``harness.generate.Generator``, the loop that
answers), on the run's KV cache (``static``: preallocated; ``dynamic``: concatenating): a prefill
forward that computes the logits of the last position only (``logits_to_keep=1``), then
``new_tokens`` single-token decode forwards fed with the greedy token (no early stop). The prefill and the decode loop are timed separately, with the
device synchronised at the edges of each. Every figure is the median over repeats, with its
interquartile range (``*_iqr``) beside it.

Per run: KV bytes counted from the cache tensors themselves after every forward (the peak kept);
on CUDA the peak allocated device memory (``torch.cuda.max_memory_allocated``, reset before each
run, so it covers the weights, activations and the cache); and the bytes a decode step reads
(the decoder weights it touches plus the KV each layer's attention read,
``lazyattn.kv_read_bytes``), which over the step's time is the achieved bandwidth, compared with
the device's peak (``PEAK_BANDWIDTH``) as gpt-fast does.

Speed-ups are method over dense, higher is better: ``decode_speedup`` and ``e2e_speedup`` are
throughput ratios, ``prefill_speedup`` is dense's latency over the method's;
``predicted_decode_speedup`` is the ratio the bytes per step allow.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
import time

import torch
from torch import nn
from harness.generate import Generator
from lazyattn.arch import decoder_layers
from lazyattn.base import Dense, Method, Plan
from lazyattn.cache import READ_TERMS, kv_allocated_bytes, kv_cache_bytes, kv_read_terms

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


def _bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def decode_weight_bytes(model: nn.Module, layers: list[nn.Module], plan: Plan | None = None) -> int:
    """Weight bytes one decode step reads: every decoder layer (``layers``, ``decoder_layers(model)``)
    less the projections its lazy layers skip (``Plan.skips``: what a layer's slot keeps says what
    it computes; dense's plan when None), the final norm and the LM head. The vision tower is not
    run when decoding."""
    plan = plan or Plan()
    total = sum(_bytes(layer) for layer in layers)
    for i, layer in enumerate(layers):
        for name in plan.skips(i):
            total -= _bytes(getattr(layer.self_attn, name))
    decoder = model.get_decoder()
    norm = getattr(decoder, "norm", None)
    head = model.get_output_embeddings()
    return total + (_bytes(norm) if norm is not None else 0) + (_bytes(head) if head is not None else 0)


@torch.inference_mode()
def generate_once(model, inputs: dict, new_tokens: int, cache: str = "static", compile: bool = False) -> dict:
    """One timed prefill + ``new_tokens`` decode forwards of the harness's own decode loop
    (``harness.generate.Generator``, the loop that answers), forced to that length (no early
    stop). Returns seconds, the peak KV bytes, the peak device memory (None off CUDA) and the KV
    bytes the decode forwards read (``lazyattn.cache.kv_read_bytes``, summed over steps).

    The prefill forward computes the logits of the last position only; a decode forward feeds
    the greedy token. The mask goes to the model only when the prompt is padded (the efficiency
    prompts are one prompt repeated, so never): without one every model places the new token
    itself. No device read happens between the two synchronisations of the decode loop.
    """
    device = inputs["input_ids"].device
    cuda = device.type == "cuda"
    gen = Generator(model, None, device, min_new_tokens=new_tokens + 1, cache=cache, compile=compile)
    budgets = [new_tokens + 1] * inputs["input_ids"].shape[0]  # the prefill's token, then one per decode forward
    totals = {"kv_read": 0, "peak": 0, "steps": 0, **{f"read_{t}": 0 for t in READ_TERMS}}

    def on_step(dialogue) -> None:  # tensor sizes only: no device sync
        for term, n in kv_read_terms(dialogue.cache).items():
            totals[f"read_{term}"] += n
            totals["kv_read"] += n
        totals["peak"] = max(totals["peak"], kv_cache_bytes(dialogue.cache))
        totals["steps"] += 1

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    dialogue, logits = gen.prefill(inputs, reserve=new_tokens)
    _sync(device)
    t1 = time.perf_counter()
    totals["peak"] = kv_cache_bytes(dialogue.cache)
    gen._decode(dialogue, logits, budgets, on_step=on_step)
    _sync(device)
    t2 = time.perf_counter()
    return {
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "decode_steps": totals["steps"],
        "kv_cache_bytes": totals["peak"],
        "kv_allocated_bytes": kv_allocated_bytes(dialogue.cache),
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)) if cuda else None,
        "kv_read_bytes": totals["kv_read"],
        "kv_read_terms": {t: totals[f"read_{t}"] for t in READ_TERMS},
        "cache": cache,
        "compiled": compile,
        # compiled decode ran as one static graph, or why not (then its steps ran eagerly)
        "graph_note": gen.graph_note if compile else None,
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


def summarise(runs: list[dict], batch_size: int, new_tokens: int, peak_bw: float | None, *,
              weight_bytes: int, lazy_layers: Sequence[int]) -> dict:
    """A variant's repeats as medians and IQRs; with the KV bytes read, its bytes per decode step
    (``weight_bytes``, ``decode_weight_bytes``, plus the KV read) and the layers whose slots hold no
    keys (``lazy_layers``, its plan's ``keyless_layers``)."""
    prefill = [1e3 * r["prefill_s"] for r in runs]
    decode = [batch_size * r.get("decode_steps", new_tokens) / r["decode_s"] for r in runs]
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
    if "cache" in runs[0]:
        out["cache"] = runs[0]["cache"]
        out["compiled"] = bool(runs[0].get("compiled"))
        if runs[0].get("graph_note"):  # compiled, but its decode could not run as one graph
            out["graph_note"] = runs[0]["graph_note"]
    if "kv_read_bytes" in runs[0]:
        steps = runs[0].get("decode_steps", new_tokens)
        kv_step = runs[0]["kv_read_bytes"] / max(1, steps)
        step_bytes = weight_bytes + kv_step
        bandwidth = statistics.median(step_bytes * steps / r["decode_s"] for r in runs)
        terms = runs[0].get("kv_read_terms") or {}
        out.update(
            decode_step_bytes=int(step_bytes),
            decode_weight_bytes=int(weight_bytes),
            decode_kv_read_bytes=int(kv_step),
            # the step's bytes by term (weights, K, V, scores): what the predicted speed-up is made of
            decode_read_terms={"weights": int(weight_bytes), **{t: int(terms[t] / max(1, steps)) for t in terms}},
            decode_bandwidth_bytes_per_s=bandwidth,
            bandwidth_utilisation=bandwidth / peak_bw if peak_bw else None,
            lazy_layers=sorted(lazy_layers),
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
    variants: dict[str, tuple],
    new_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    cache: str = "static",
    compile: bool = False,
) -> dict[str, dict]:
    """Several variants, each ``name -> (inputs, method[, cache kind])``, timed in ABBA order in this
    process (``abba_order``) on the KV cache ``cache`` (or the variant's own), each with ``method``
    applied and its plan saying what its layers compute; each variant's summary over its own inputs'
    batch size."""
    device = next(iter(variants.values()))[0]["input_ids"].device
    layers = decoder_layers(model)
    plans = {name: spec[1].plan(len(layers)) for name, spec in variants.items()}  # what each variant's layers compute
    weights = {name: decode_weight_bytes(model, layers, plan) for name, plan in plans.items()}  # host-side, once
    repeats = repeats_for(device, repeats)
    peak_bw = peak_bandwidth(device_name(device))

    def options(name: str) -> dict:  # a third element: this variant's own cache kind, or {"cache", "compile"}
        own = variants[name][2] if len(variants[name]) > 2 else {}
        own = {"cache": own} if isinstance(own, str) else own
        return {"cache": own.get("cache", cache), "compile": bool(own.get("compile", compile))}

    settings = {name: options(name) for name in variants}

    def once(name: str, tokens: int) -> dict:
        inputs, method = variants[name][:2]
        with method.apply(model):
            return generate_once(model, inputs, tokens, settings[name]["cache"], settings[name]["compile"])

    for _ in range(warmup):  # a compiled step warms up at the timed length: its graph is shaped by it
        for name in variants:
            once(name, new_tokens if settings[name]["compile"] else min(new_tokens, 4))
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for name in abba_order(list(variants), repeats):
        runs[name].append(once(name, new_tokens))
    return {
        name: summarise(runs[name], spec[0]["input_ids"].shape[0], new_tokens, peak_bw, weight_bytes=weights[name],
                        lazy_layers=plans[name].keyless_layers())
        for name, spec in variants.items()
    }


def predicted_decode_speedup(dense: dict, method: dict, dense_batch: int = 1, method_batch: int = 1) -> float | None:
    """The decode throughput ratio the bytes allow, if a step's time were its bytes over the
    bandwidth: tokens per step (the batch) over bytes per step (weights touched plus KV read),
    method over dense. None where the summaries carry no byte counts."""
    if not dense.get("decode_step_bytes") or not method.get("decode_step_bytes"):
        return None
    return (method_batch / method["decode_step_bytes"]) / (dense_batch / dense["decode_step_bytes"])


def speedups(dense: dict, method: dict) -> dict:
    """Method over dense, higher is better; the predicted decode speed-up from bytes per step and
    the fraction of it achieved."""
    out = {
        "kv_reduction": 1.0 - method["kv_cache_bytes"] / dense["kv_cache_bytes"],
        "decode_speedup": method["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
        "e2e_speedup": method["e2e_tokens_per_s"] / dense["e2e_tokens_per_s"],
        "prefill_speedup": dense["prefill_ms"] / method["prefill_ms"],
    }
    predicted = predicted_decode_speedup(dense, method)
    out["predicted_decode_speedup"] = predicted
    out["decode_speedup_of_predicted"] = None if predicted is None else out["decode_speedup"] / predicted
    return out


def time_against_dense(
    model,
    inputs: dict,
    method: Method,
    new_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    cache: str = "static",
    compile: bool = False,
) -> dict:
    """Dense vs ``method`` on identical inputs: both figures and the speed-ups (method over dense),
    and the notes that concern the method (``host_sync`` for SparseVLM)."""
    summaries = interleaved(
        model,
        {"dense": (inputs, Dense()), "method": (inputs, method)},
        new_tokens=new_tokens,
        repeats=repeats,
        warmup=warmup,
        cache=cache,
        compile=compile,
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
        "cache": cache,
        "compiled": compile,
        "peak_bandwidth_bytes_per_s": peak_bandwidth(device_name(device)),
        "dense": dense,
        "method": method_summary,
        **speedups(dense, method_summary),
    }
    if method.plan(len(decoder_layers(model))).host_sync:
        out["host_sync"] = SPARSEVLM_HOST_SYNC
    # the verdict travels with the numbers: result.json, W&B (headline/timing_noisy), tables
    out["noisy"], out["noise"] = timing_verdict(out)
    return out


# each speed-up and the per-variant median it is a ratio of
SPEEDUPS = (("decode_speedup", "decode_tokens_per_s"), ("e2e_speedup", "e2e_tokens_per_s"),
            ("prefill_speedup", "prefill_ms"))


def ratio_spread(eff: dict, speedup: str, measure_key: str) -> float | None:
    """The spread of an in-process speed-up: the ratio times the sum of the two medians' relative
    half-IQRs (method and dense, over the interleaved repeats); None when the IQRs were not kept."""
    m, d = eff.get("method") or {}, eff.get("dense") or {}
    if eff.get(speedup) is None or m.get(f"{measure_key}_iqr") is None or d.get(f"{measure_key}_iqr") is None:
        return None
    if not m.get(measure_key) or not d.get(measure_key):
        return None
    rel = m[f"{measure_key}_iqr"] / (2 * m[measure_key]) + d[f"{measure_key}_iqr"] / (2 * d[measure_key])
    return eff[speedup] * rel


# A speed-up whose spread (ratio_spread: its relative half-IQRs, method and dense) is wider than this
# fraction of it is noise, and so is an achieved share of the bytes prediction above ACHIEVED_MAX (a
# method cannot beat what its bytes allow by half again: the dense timing was slowed).
NOISE_FRACTION = 0.25
ACHIEVED_MAX = 1.5


def timing_verdict(eff: Mapping | None) -> tuple[bool | None, str | None]:
    """Whether a run's timing is noise, and why in one line: any speed-up (decode, end-to-end,
    prefill) whose spread is wider than ``NOISE_FRACTION`` of it, or an achieved share of the
    predicted decode speed-up above ``ACHIEVED_MAX``. (None, None) without timing; with one repeat
    there is no spread to judge, only the prediction."""
    if not eff:
        return None, None
    reasons = []
    for speedup, measure_key in SPEEDUPS:
        value, spread = eff.get(speedup), ratio_spread(eff, speedup, measure_key)
        if value and spread is not None and spread > NOISE_FRACTION * value:
            reasons.append(f"{speedup} {value:.2f} ± {spread:.2f} (spread {spread / value:.0%} of it)")
    achieved = eff.get("decode_speedup_of_predicted")
    if achieved is not None and achieved > ACHIEVED_MAX:
        reasons.append(f"decode_speedup achieved {achieved:.0%} of what its bytes predict")
    return bool(reasons), "; ".join(reasons) or None
