"""Timing rows, and throughput under a fixed memory budget: each method's largest batch predicted,
verified and timed (``budget_plan``, ``run_budget``); the concatenating cache against the preallocated one."""

from __future__ import annotations


import torch
from omegaconf import DictConfig

from harness import measure
from harness.bench.constants import TIMINGS
from harness.bench.prompts import Prompts
from harness.bench.variants import BenchError, Variant
from lazyattn.cache import CACHE_KINDS


def _figures(summary: dict) -> dict:
    """A variant's figures as a row keeps them: medians with their IQRs, KV, memory, bandwidth."""
    keys = [k for t in TIMINGS for k in (t, f"{t}_iqr")] + [
        "kv_cache_bytes", "peak_memory_bytes", "decode_step_bytes", "decode_weight_bytes", "decode_kv_read_bytes",
        "decode_read_terms", "decode_bandwidth_bytes_per_s", "bandwidth_utilisation", "graph_note"]
    return {k: summary.get(k) for k in keys}


def timing_row(variant: Variant, res: dict, context: dict, dev: dict) -> dict:
    d, m = res["dense"], res["method"]
    row = {
        "method": variant.config,
        "label": variant.label,
        "params": variant.method.params(),
        "lazy_layers": variant.lazy_layers,
        "batch_size": res["batch_size"],
        "context_length": context["context_length"],
        "prompt_tokens": res["prompt_tokens"],
        "new_tokens": res["new_tokens"],
        **_figures(m),
        "dense": _figures(d),
        # method over dense; the speed-ups are higher-is-better, the fractions are method / dense
        "ratios": {
            "kv_fraction": m["kv_cache_bytes"] / d["kv_cache_bytes"],
            "kv_reduction": res["kv_reduction"],
            "memory_fraction": (m["peak_memory_bytes"] / d["peak_memory_bytes"]
                                if m.get("peak_memory_bytes") and d.get("peak_memory_bytes") else None),
            "decode_speedup": res["decode_speedup"],
            "e2e_speedup": res["e2e_speedup"],
            "prefill_speedup": res["prefill_speedup"],
        },
        # bytes per decode step (weights touched + KV read), dense over method: what the bytes allow
        "predicted_decode_speedup": res.get("predicted_decode_speedup"),
        "decode_speedup_of_predicted": res.get("decode_speedup_of_predicted"),
        "cache": res.get("cache"),
        "compiled": res.get("compiled", False),
        "repeats": m["repeats"],
        "order": res.get("order"),
        "device": dev["device"],
        "device_name": dev["name"],
    }
    if res.get("host_sync"):
        row["host_sync"] = res["host_sync"]
    return row


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak(model, variant: Variant, inputs: dict, new_tokens: int, kind: str = "kv", cache: str = "static") -> int:
    """The variant's peak KV bytes (``kv``) or peak allocated device memory (``memory``) in one run."""
    with variant.method.apply(model):
        run = measure.generate_once(model, inputs, new_tokens, cache)
    value = run["kv_cache_bytes"] if kind == "kv" else run["peak_memory_bytes"]
    if value is None:
        raise BenchError("budget.kind=memory needs a CUDA device (peak device memory is not measured on CPU); "
                         "use budget.kind=kv.")
    return int(value)


def _peak_kv(model, variant: Variant, inputs: dict, new_tokens: int, cache: str = "static") -> int:
    return _peak(model, variant, inputs, new_tokens, "kv", cache)


def budget_plan(model, prompts: Prompts, context: dict, variants: list[Variant], cfg: DictConfig, new_tokens: int,
                dev: dict, cache: str = "static") -> dict:
    """The budget and every variant's cost per sequence (and fixed cost, for device memory),
    measured at batch 1 (and 2); fails fast when the budget cannot hold one sequence of some variant."""
    kind = str(cfg.get("kind", "kv"))
    what = "KV" if kind == "kv" else "device memory"
    words = context["extra_words"]
    one = prompts.inputs(words, 1)
    at_one = {v.label: _peak(model, v, one, new_tokens, kind, cache) for v in variants}
    if kind == "memory":
        two = prompts.inputs(words, 2)
        at_two = {v.label: _peak(model, v, two, new_tokens, kind, cache) for v in variants}
        per_sample = {k: max(1, at_two[k] - at_one[k]) for k in at_one}
        fixed = {k: at_one[k] - per_sample[k] for k in at_one}
    else:
        per_sample, fixed = at_one, {k: 0 for k in at_one}
    if cfg.bytes is None:
        ref = int(cfg.reference_batch)
        budget = _peak(model, variants[0], prompts.inputs(words, ref), new_tokens, kind, cache)
        source = f"dense peak {what} at batch {ref}"
    else:
        budget, ref, source = int(float(cfg.bytes)), None, "budget.bytes"
    for v in variants:
        if at_one[v.label] > budget:
            raise BenchError(
                f"{what} budget of {budget} bytes cannot hold one sequence of {v.label!r} ({at_one[v.label]} bytes at "
                f"{context['prompt_tokens']} prompt + {new_tokens} new tokens); raise budget.bytes, or leave it null "
                "to use dense's figure at budget.reference_batch."
            )
    return {
        "kind": kind,
        "bytes": budget,
        "source": source,
        "reference_batch": ref,
        "context_length": context["context_length"],
        "prompt_tokens": context["prompt_tokens"],
        "new_tokens": new_tokens,
        "max_batch_cap": int(cfg.max_batch),
        "device": dev["device"],
        "device_name": dev["name"],
        "cache": cache,
        "complete": False,
        "entries": [
            {"label": v.label, "method": v.config, "per_sample_bytes": per_sample[v.label],
             "fixed_bytes": fixed[v.label],
             **({"per_sample_kv_bytes": per_sample[v.label]} if kind == "kv" else {})}
            for v in variants
        ],
    }


def run_budget(model, prompts: Prompts, context: dict, variants: list[Variant], plan: dict, settings: dict,
               device: torch.device) -> dict:
    budget, cap = plan["bytes"], plan["max_batch_cap"]
    new_tokens = plan.get("new_tokens", settings["new_tokens"])
    kind = plan.get("kind", "kv")
    cache = plan.get("cache", "dynamic")
    words = context["extra_words"]
    timed = {}
    for v, entry in zip(variants, plan["entries"]):
        per, fixed = entry.get("per_sample_bytes", entry.get("per_sample_kv_bytes")), entry.get("fixed_bytes", 0)
        predicted = max(1, (budget - fixed) // per)
        batch, limited_by, steps, used = min(predicted, cap), "budget" if predicted <= cap else "max_batch", 0, None
        while batch >= 1:
            inputs = prompts.inputs(words, batch)
            try:
                used = _peak(model, v, inputs, new_tokens, kind, cache)
            except torch.OutOfMemoryError:
                free_memory(device)
                batch, limited_by, steps, used = batch - 1, "device_memory", steps + 1, None
                continue
            if used <= budget:
                break
            batch, steps = min(batch - 1, max(0, budget - fixed) * batch // max(1, used - fixed)), steps + 1
        if batch < 1 or used is None:
            raise BenchError(f"no batch of {v.label!r} fits the {kind} budget of {budget} bytes on {plan['device']}.")
        entry.update(predicted_max_batch=predicted, max_batch=batch, limited_by=limited_by, steps_down=steps,
                     verified_bytes=used)
        if kind == "kv":
            entry["verified_kv_cache_bytes"] = used
        timed[v.label] = (inputs, v.method)  # the inputs of the verified batch
        del inputs
    summaries = measure.interleaved(
        model, timed, new_tokens=new_tokens, repeats=settings["repeats"], warmup=settings["warmup"], cache=cache,
        compile=settings.get("compile", [False])[0],  # compile=both: the budget is timed eagerly
    )
    dense = summaries[variants[0].label]
    dense_batch = plan["entries"][0]["max_batch"]
    for entry in plan["entries"]:
        s = summaries[entry["label"]]
        used = s["kv_cache_bytes"] if kind == "kv" else s.get("peak_memory_bytes")
        if kind == "kv" and used > budget:  # KV bytes don't depend on timing: this would be a bug
            raise BenchError(f"{entry['label']!r} at batch {entry['max_batch']} used {used} > {budget} bytes.")
        entry.update(
            **_figures(s),
            budget_fraction=None if used is None else used / budget,
            batch_ratio=entry["max_batch"] / dense_batch,
            decode_speedup=s["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
            e2e_speedup=s["e2e_tokens_per_s"] / dense["e2e_tokens_per_s"],
            predicted_decode_speedup=measure.predicted_decode_speedup(dense, s, dense_batch, entry["max_batch"]),
        )
        if entry["predicted_decode_speedup"]:
            entry["decode_speedup_of_predicted"] = entry["decode_speedup"] / entry["predicted_decode_speedup"]
    plan.update(repeats=summaries[variants[0].label]["repeats"], complete=True)
    return plan


def compare_caches(model, prompts: Prompts, context: dict, variants: list[Variant], settings: dict) -> dict:
    """Each variant on the preallocated and on the concatenating cache, in one ABBA set at the
    largest batch: what the copying costs (static over dynamic, higher is better)."""
    batch = max(settings["batch_sizes"])
    inputs = prompts.inputs(context["extra_words"], batch)
    timed = {}
    for v in variants:
        for kind in CACHE_KINDS:
            timed[f"{v.label} {kind}"] = (inputs, v.method, kind)
    summaries = measure.interleaved(model, timed, new_tokens=settings["new_tokens"], repeats=settings["repeats"],
                                    warmup=settings["warmup"])
    entries = []
    for v in variants:
        s, d = summaries[f"{v.label} static"], summaries[f"{v.label} dynamic"]
        entries.append({
            "label": v.label, "static": _figures(s), "dynamic": _figures(d),
            "decode_speedup": s["decode_tokens_per_s"] / d["decode_tokens_per_s"],
            "e2e_speedup": s["e2e_tokens_per_s"] / d["e2e_tokens_per_s"],
        })
        print(f"{v.label:<22} B={batch:<3} static cache over dynamic: decode x{entries[-1]['decode_speedup']:.3f} "
              f"e2e x{entries[-1]['e2e_speedup']:.3f}", flush=True)
    return {"batch_size": batch, "prompt_tokens": context["prompt_tokens"], "new_tokens": settings["new_tokens"],
            "repeats": summaries[f"{variants[0].label} static"]["repeats"], "entries": entries}
