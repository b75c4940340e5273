"""One timed point of a timing phase: the profile's model (``load_profile_model``), its variants as
bench entries (``bench_variants``; the pruning phase's from the registry, ``pruning_variants``) and
``time_point``, every variant in one ABBA set. torch, Hydra and the harness load inside the functions."""

from __future__ import annotations

import time

from harness.gpu_plan.plan import COMPILED_VARIANTS, CPU, MODEL_7B, PRUNING_VARIANTS, TIMED_FAMILY, TIMED_LAYERS


def load_profile_model(profile: str, threads: int | None = None):
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


def bench_variants(entries: list[str], profile: str = "gpu"):
    """Dense, then each bench entry of ``entries`` (the CPU profile's stand-ins where it has one)."""
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
            "device_name": device_name(inputs_device(model))}


def inputs_device(model):
    return next(model.parameters()).device


def device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
