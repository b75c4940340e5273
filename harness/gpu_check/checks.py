"""What a CPU can check of the measurement itself: pruned stages run without a mask where none is
needed (and match the explicit mask), and the timing protocol (one position of prefill logits, ABBA
order, IQR and end-to-end figures)."""

from __future__ import annotations

import torch

import lazyattn
from harness import measure
from harness.gpu_check.matrix import FAMILIES, INIT_RANGE, N_LAYERS, entries, forced_run, relative_error, two_prompts
from harness.models import families
from lazyattn.engine import explicit_stage_masks

# The pruned stages' logits without a mask against those with the explicit one: the same relative
# measure, tighter (the same weights and kernel family; only the masking path differs), per dtype
MASK_TOLERANCE = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 2e-2}


def _recording_attention():
    """Register ``gpu_check_recording_sdpa`` (transformers' sdpa, recording each decoder layer's mask)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    seen: list = []

    def recording_sdpa(module, query, key, value, attention_mask, **kwargs):
        if getattr(module, "layer_idx", None) is not None:
            seen.append((module.layer_idx, attention_mask))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("gpu_check_recording_sdpa", recording_sdpa)
    AttentionMaskInterface.register("gpu_check_recording_sdpa", sdpa_mask)
    return seen


def pruning_entries(family_key: str = "llava_llama") -> dict[str, dict]:
    """The matrix entries on ``family_key`` whose plan prunes tokens (``Plan.pruner``): their stages
    are the ones ``mask_check`` checks (an entry the model cannot take fails its matrix cells instead)."""
    out = {}
    for entry, spec in entries(family_key).items():
        try:
            prunes = lazyattn.build(spec).plan(N_LAYERS).pruner is not None
        except ValueError:
            continue
        if prunes:
            out[entry] = spec
    return out


def mask_check(device: torch.device, dtype_name: str = "float32") -> dict:
    """Unpadded pruned stages get no mask (SDPA's is_causal / flash kernel), and their logits
    equal those with the explicit mask (``lazyattn.engine.explicit_stage_masks``) within
    ``MASK_TOLERANCE`` (relative: the two paths may run different SDPA kernels on a GPU); padded
    ones keep a mask. Every registered method whose plan prunes (``pruning_entries``)."""
    seen = _recording_attention()
    family, text, vision = FAMILIES["llava_llama"]
    loaded = families.build_random(family, text, vision, attn_implementation="gpu_check_recording_sdpa",
                                   dtype=getattr(torch, dtype_name), device=device, initializer_range=INIT_RANGE)
    model = loaded.model
    out = {}
    for name, spec in pruning_entries("llava_llama").items():
        method = lazyattn.build(spec)
        first = method.plan(N_LAYERS).pruned_from
        res = {}
        for padded in (False, True):
            inputs = two_prompts(loaded, device, padded)
            seen.clear()
            with method.apply(model):
                logits, _ = forced_run(model, inputs)
            masks = [m for layer, m in seen if layer >= first]
            if padded:
                res["padded_masked"] = bool(masks) and all(m is not None for m in masks)
                continue
            res["unpadded_none"] = bool(masks) and all(m is None for m in masks)
            with explicit_stage_masks(), method.apply(model):
                ref, _ = forced_run(model, inputs)
            res["max_abs_diff_vs_explicit"] = (logits - ref).abs().max().item()
            res["max_rel_diff_vs_explicit"] = relative_error(logits, ref)
        res["ok"] = (res["unpadded_none"] and res["padded_masked"]
                     and res["max_rel_diff_vs_explicit"] <= MASK_TOLERANCE[dtype_name])
        out[name] = res
    return {"ok": all(r["ok"] for r in out.values()), "dtype": dtype_name, "tolerance": MASK_TOLERANCE[dtype_name],
            "metric": "max |no-mask logits - explicit-mask logits| / max |explicit-mask logits|", "methods": out}


def protocol_check(device: torch.device) -> dict:
    """The timed prefill keeps one position of logits; ABBA order; IQR and end-to-end figures."""
    family, text, vision = FAMILIES["llava_llama"]
    loaded = families.build_random(family, text, vision, device=device)
    model = loaded.model
    shapes_seen = []
    handle = model.register_forward_hook(lambda m, a, o: shapes_seen.append(tuple(o.logits.shape)))
    try:
        inputs = two_prompts(loaded, device, padded=False)
        measure.generate_once(model, inputs, 2)
    finally:
        handle.remove()
    prefill_one = shapes_seen[0][1] == 1
    order = measure.abba_order(["dense", "method"], 4)
    lazy = lazyattn.build({"name": "lazy", "ratio": 0.5})
    res = measure.time_against_dense(model, inputs, lazy, new_tokens=2, repeats=3, warmup=0)
    e2e_ok = all(0 < res[s]["e2e_tokens_per_s"] < res[s]["decode_tokens_per_s"] for s in ("dense", "method"))
    iqr_ok = all(f"{t}_iqr" in res[s] for s in ("dense", "method")
                 for t in ("prefill_ms", "decode_tokens_per_s", "e2e_tokens_per_s"))
    return {
        "ok": prefill_one and order == ["dense", "method", "method", "dense"] * 2 and e2e_ok and iqr_ok,
        "prefill_logits_positions": shapes_seen[0][1],
        "order": order,
        "e2e_below_decode": e2e_ok,
        "iqr_present": iqr_ok,
        "repeats_on_cuda": measure.repeats_for("cuda", 3),
        "predicted_decode_speedup": res["predicted_decode_speedup"],
    }
