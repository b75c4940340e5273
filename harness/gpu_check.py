"""Ready for the first GPU: ``python -m harness.gpu_check`` (``make gpu-check``).

On a CUDA machine, with no downloads (docs/gpu.md):

1. correctness: every model family at a tiny size (LLaVA-Llama, LLaVA-Qwen2, LLaVA-Mistral,
   LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL) x every method (dense, lazy and its qkv and visual readings,
   fastv, sparsevlm, vtw, lazy_fastv, lazy_vtw),
   in float16 and bfloat16: the logits of a prefill and of teacher-forced decode steps under
   ``eager`` and ``flash_attention_2`` (when flash-attn is importable) agree with ``sdpa`` within
   ``TOLERANCE`` (max |a - b| over max |sdpa|), and the KV cache holds what the formula says;
2. throughput at real scale: ``model=llava15_7b_random`` (float16) through ``harness.bench``:
   batch x context grid, dense vs Lazy 0.5 / 0.7, FastV, SparseVLM, Lazy+FastV, decode-only and
   end-to-end, KV bytes and device memory, then the fixed device-memory budget (dense's peak at
   batch 8) at a long context; a second bench times long generations (512 new tokens at batch 8)
   with the budget at the unpadded prompt;
3. writes ``results/gpu/<device>/``: ``correctness.json``, ``bench/bench.json``,
   ``bench_long/bench.json``, ``README.md`` (tables rendered with ``harness.report.markdown``),
   and prints one summary table. Everything is saved as it finishes, so a run that is cut off
   keeps what finished and the next run continues.

Without CUDA it runs what a CPU can check (the pruned stages' masks, the timing protocol, and
the correctness matrix for sdpa vs eager in float32), writes ``cpu_checks.json`` under ``--out``
(default ``runs/gpu_check/cpu``), prints one line saying it needs a GPU, and exits 0 when the
checks pass (1 when one fails).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import lazyattn
from harness import measure
from harness.generate import conversation, prompt_inputs
from harness.models import families
from harness.results import env_info, write_json_atomic
from harness.tasks import shapes
from lazyattn import kv_cache_bytes
from lazyattn.arch import decoder_layers

N_LAYERS = families.TINY_TEXT["layers"]
FAMILIES = families.TINY_SHAPES
METHODS = ("dense", "lazy", "lazy_qkv", "lazy_visual", "lazy_visual_scores", "fastv", "sparsevlm", "vtw", "lazy_fastv", "lazy_vtw")
# max |logits - sdpa's logits| / max |sdpa's logits|, prefill and every teacher-forced decode step
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
# The pruned stages' logits without a mask against those with the explicit one: the same relative
# measure, tighter (the same weights and kernel family; only the masking path differs), per dtype
MASK_TOLERANCE = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 2e-2}
# What each compared implementation runs; "sdpa_flash" is the sdpa model inside
# torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION): PyTorch's own flash kernel, forced, on
# the unpadded cells only (flash takes no explicit mask), so flash is checked on a real flash kernel
# even where the flash-attn package cannot be installed.
KERNELS = {
    "sdpa": "torch SDPA, kernel chosen by PyTorch (the reference)",
    "eager": "transformers' eager attention (matmul + softmax)",
    "sdpa_flash": "torch SDPA forced to SDPBackend.FLASH_ATTENTION (unpadded cells)",
    "flash_attention_2": "the flash-attn package (transformers' flash_attention_2)",
}
DECODE_STEPS = 3
INIT_RANGE = 0.1  # larger than the default 0.02, so that the attention pattern matters to the logits
BENCH_METHODS = ["lazy ratio=0.5", "lazy ratio=0.7", "lazy ratio=0.35 share=qkv", "fastv ratio=0.5",
                 "sparsevlm budget=128", "vtw k=16", "lazy_fastv"]


def method_spec(name: str | dict, family: str) -> dict:
    """The settings of matrix entry ``name`` (a name of this table), or ``name`` itself when it is
    already a method spec (``{"name": ..., settings}``: any registered method)."""
    if isinstance(name, dict):
        return dict(name)
    spec = {
        "dense": {"name": "dense"},
        "lazy": {"name": "lazy", "ratio": 0.5},
        "fastv": {"name": "fastv", "k": 2, "ratio": 0.5},
        "sparsevlm": {"name": "sparsevlm", "budget": 128},
        "lazy_fastv": {"name": "lazy_fastv", "lazy": {"ratio": 0.5}, "fastv": {"k": 2, "ratio": 0.5}},
        "lazy_qkv": {"name": "lazy", "ratio": 0.5, "share": "qkv"},
        "lazy_visual": {"name": "lazy", "ratio": 0.5, "scope": "visual"},
        "lazy_visual_scores": {"name": "lazy", "ratio": 0.5, "scope": "visual_scores"},
        "vtw": {"name": "vtw", "k": 3},
        "lazy_vtw": {"name": "lazy_vtw", "lazy": {"ratio": 0.5, "share": "qkv"}, "vtw": {"k": 3}},
    }[name]
    if name == "sparsevlm" and family.startswith("qwen"):  # M-RoPE positions: no re-indexing, no merging
        spec = {**spec, "positions": "original", "recycle": 0}
    return spec


def entry_name(entry: str | dict) -> str:
    """A matrix entry's name in cell keys: the table's name, or a spec's method name and settings."""
    if isinstance(entry, str):
        return entry
    return " ".join([entry["name"], *(f"{k}={v}" for k, v in entry.items() if k != "name")])


def flash_available() -> bool:
    """flash-attn 2 usable by transformers (``find_spec("flash_attn")`` is fooled by flash-attn-4's
    ``flash_attn.cute`` namespace package, which has no ``flash_attn_func``)."""
    if not torch.cuda.is_available():
        return False
    try:
        from transformers.utils import is_flash_attn_2_available

        return bool(is_flash_attn_2_available())
    except Exception:  # an odd install must not stop the check
        return False


def forced_flash():
    """PyTorch's flash SDPA kernel and nothing else (an error where it cannot run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def relative_error(logits: torch.Tensor, ref: torch.Tensor) -> float:
    """max |logits - ref| / max |ref| (inf when ref is all zero)."""
    scale = ref.abs().max().item()
    diff = (logits - ref).abs().max().item()
    return diff / scale if scale > 0 else float("inf")


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _inputs(loaded, device, padded: bool) -> dict:
    """Two prompts on the same image: left-padded (different questions) or not (the same one)."""
    sample = shapes.load_split("test", 1)[0]
    questions = [sample.questions[0], sample.questions[0] + (" answer in one word" if padded else "")]
    histories = [conversation([q], []) for q in questions]
    return prompt_inputs(loaded.processor, histories, [sample.image(64)] * 2, device, loaded.model.dtype)


@torch.inference_mode()
def forced_run(model, inputs: dict, steps: int = DECODE_STEPS):
    """Prefill logits (last position) and the logits of ``steps`` teacher-forced decode steps fed
    the prompt's last tokens (so every variant sees the same tokens): (steps + 1, B, V) and the cache
    (the preallocated one every run uses). Teacher forcing is why this is not the answering loop."""
    from harness.generate import cache_kwarg
    from lazyattn.cache import new_cache

    cache = new_cache("static", model.config, steps)
    cache_arg = cache_kwarg(model)
    mask = inputs["attention_mask"]
    padded = not bool(mask.all())
    out = model(**inputs, **{cache_arg: cache}, use_cache=True, logits_to_keep=1)
    logits = [out.logits[:, -1].float()]
    feed = inputs["input_ids"][:, -steps:]
    rope_deltas = getattr(getattr(model, "model", None), "rope_deltas", None)  # Qwen2-VL / Qwen2.5-VL
    for t in range(steps):
        extra = {}
        if padded:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            if rope_deltas is not None:  # with a mask, Qwen would place the whole sequence: give the M-RoPE ids
                pos = (mask.long().cumsum(-1) - 1)[:, -1:]
                extra["position_ids"] = pos[None].expand(3, -1, -1) + rope_deltas.to(pos.device)[None]
        out = model(input_ids=feed[:, t : t + 1], attention_mask=mask if padded else None, **{cache_arg: cache},
                    use_cache=True, **extra)
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits), cache


def kv_formula(model, method, cache, inputs: dict, steps: int) -> tuple[bool, str]:
    """Dense: 2 x layers x batch x kv heads x tokens x head dim x bytes. Lazy layers hold values
    only (``share=qkv``: nothing; ``scope=visual``: every value and the text tokens' keys). Pruned
    layers (from the first pruned layer on) hold fewer tokens than the prompt, the layers before
    it the whole prompt; every decode step adds one token to every layer."""
    cfg = model.config.get_text_config(decoder=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    batch, prompt = inputs["input_ids"].shape
    elem = torch.finfo(model.dtype).bits // 8
    per_token = batch * cfg.num_key_value_heads * head_dim * elem  # one of K or V, one layer
    n = len(decoder_layers(model))
    plan = method.plan(n)
    lazy, share, scope = set(plan.lazy_layers), plan.share, plan.scope
    n_image = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    first = n if plan.pruned_from is None else plan.pruned_from
    lengths, want = [], 0
    for i, layer in enumerate(cache.layers):
        length = layer.get_seq_length()
        lengths.append(length)
        keys = getattr(layer, "keys", None)
        if i in lazy and share == "qkv":
            if keys is not None or getattr(layer, "values", None) is not None:
                return False, f"layer {i}: a qkv lazy layer holds tensors"
        elif i in lazy and scope in ("visual", "visual_scores"):
            if keys is None or keys.shape[-2] != length - n_image:
                return False, f"layer {i}: a visual lazy layer should hold {length - n_image} keys"
            want += per_token * (2 * length - n_image)
        elif (keys is None) != (i in lazy):
            return False, f"layer {i}: keys {'missing' if keys is None else 'present'}, lazy={i in lazy}"
        else:
            want += per_token * length * (1 if i in lazy else 2)
    full = prompt + steps
    if any(length != full for length in lengths[:first]):
        return False, f"layers before {first} hold {lengths[:first]} tokens, want {full}"
    if any(length >= full for length in lengths[first:]):
        return False, f"pruned layers {first}.. hold {lengths[first:]} tokens, want fewer than {full}"
    got = kv_cache_bytes(cache)
    return got == want, f"{got} bytes, formula {want}"


def correctness(device: torch.device, dtypes: list[str], impls: list[str], path: Path | None = None,
                families_: list[str] | None = None, methods: list[str | dict] | None = None, *,
                previous: dict | None = None, save: Callable[[dict], None] | None = None,
                stop_at: float | None = None) -> dict:
    """The matrix family x method x dtype x padded, each impl against sdpa; saved to ``path`` (and
    passed to ``save``) after every cell (cells already there, in ``path`` or ``previous``, are
    kept: resumable). ``impls`` may name ``sdpa_flash`` (``KERNELS``): it runs on unpadded cells only.
    Models are built inside each cell's ``try``, one per implementation, so a model that cannot be
    built fails its cells, not the matrix. Stops before a new cell once ``time.time()`` passes
    ``stop_at`` (``matrix["stopped"]``)."""
    if previous is None:
        previous = json.loads(path.read_text()) if path is not None and path.exists() else {}
    cells = {c["key"]: c for c in previous.get("cells", [])}
    matrix = {"device": str(device), "impls": impls, "dtypes": dtypes, "tolerance": TOLERANCE,
              "kernels": {i: KERNELS.get(i, i) for i in impls},
              "metric": "max |logits - sdpa logits| / max |sdpa logits| over the prefill and "
                        f"{DECODE_STEPS} teacher-forced decode steps", "cells": [], "stopped": False}
    model_impls = ["sdpa", *[i for i in impls if i not in ("sdpa", "sdpa_flash")]]

    def saved() -> None:
        matrix["cells"] = list(cells.values())
        if path is not None:
            write_json_atomic(path, matrix)
        if save is not None:
            save(matrix)

    for fam in families_ or list(FAMILIES):
        family, text, vision = FAMILIES[fam]
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            todo = [(m, p) for m in (methods or METHODS) for p in (False, True)
                    if f"{fam}/{entry_name(m)}/{dtype_name}/{'padded' if p else 'unpadded'}" not in cells]
            if not todo:
                continue
            models: dict = {}

            def model_for(impl: str):
                if impl not in models:
                    try:
                        models[impl] = families.build_random(family, text, vision, attn_implementation=impl,
                                                             dtype=dtype, device=device, initializer_range=INIT_RANGE)
                    except Exception as err:  # remembered: every cell of this group reports it
                        models[impl] = err
                if isinstance(models[impl], Exception):
                    raise models[impl]
                return models[impl]

            for name, padded in todo:
                if stop_at is not None and time.time() > stop_at:
                    matrix["stopped"] = True
                    break
                key = f"{fam}/{entry_name(name)}/{dtype_name}/{'padded' if padded else 'unpadded'}"
                cell = {"key": key, "family": fam, "method": entry_name(name), "dtype": dtype_name, "padded": padded,
                        "errors": {}, "impl_errors": {}}
                try:
                    method = lazyattn.build(method_spec(name, family))
                    ref_loaded = model_for("sdpa")
                    inputs = _inputs(ref_loaded, device, padded)
                    with method.apply(ref_loaded.model):
                        ref, ref_cache = forced_run(ref_loaded.model, inputs)
                    cell["finite"] = bool(torch.isfinite(ref).all())
                    cell["kv_ok"], cell["kv"] = kv_formula(ref_loaded.model, method, ref_cache, inputs, DECODE_STEPS)
                    del ref_cache
                    for impl in impls:
                        if impl == "sdpa" or (impl == "sdpa_flash" and padded):
                            continue
                        try:  # one implementation failing keeps the others' numbers
                            loaded = ref_loaded if impl == "sdpa_flash" else model_for(impl)
                            kernel = forced_flash() if impl == "sdpa_flash" else contextlib.nullcontext()
                            with kernel, method.apply(loaded.model):
                                logits, _ = forced_run(loaded.model, inputs)
                            cell["errors"][impl] = relative_error(logits, ref)
                        except Exception as err:
                            cell["impl_errors"][impl] = f"{type(err).__name__}: {str(err)[:300]}"
                    cell["ok"] = (cell["finite"] and cell["kv_ok"] and not cell["impl_errors"]
                                  and all(e <= TOLERANCE[dtype_name] for e in cell["errors"].values()))
                except Exception as err:  # one broken cell must not hide the others
                    cell.update(ok=False, error=f"{type(err).__name__}: {str(err)[:300]}")
                cells[key] = cell
                saved()
            del models
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if matrix["stopped"]:
                break
        if matrix["stopped"]:
            break
    matrix["cells"] = list(cells.values())
    matrix["passed"] = sum(c["ok"] for c in matrix["cells"])
    matrix["total"] = len(matrix["cells"])
    saved()
    return matrix


# ---- the CPU-checkable measurement fixes ------------------------------------------------------


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


def mask_check(device: torch.device, dtype_name: str = "float32") -> dict:
    """Unpadded pruned stages get no mask (SDPA's is_causal / flash kernel), and their logits
    equal those with the explicit mask within ``MASK_TOLERANCE`` (relative: the two paths may run
    different SDPA kernels on a GPU); padded ones keep a mask."""
    from lazyattn import engine

    seen = _recording_attention()
    family, text, vision = FAMILIES["llava_llama"]
    loaded = families.build_random(family, text, vision, attn_implementation="gpu_check_recording_sdpa",
                                   dtype=getattr(torch, dtype_name), device=device, initializer_range=INIT_RANGE)
    model = loaded.model
    original = engine._stage_mask

    def explicit(impl, real, q_len, dtype, unpadded=None):
        cols = torch.arange(real.shape[1], device=real.device)
        rows = torch.arange(q_len, device=real.device) + (real.shape[1] - q_len)
        return (cols[None, :] <= rows[:, None])[None, None] & real[:, None, None, :]

    out = {}
    for name in ("fastv", "sparsevlm", "lazy_fastv"):
        method = lazyattn.build(method_spec(name, family))
        first = method.plan(N_LAYERS).pruned_from
        res = {}
        for padded in (False, True):
            inputs = _inputs(loaded, device, padded)
            seen.clear()
            with method.apply(model):
                logits, _ = forced_run(model, inputs)
            masks = [m for layer, m in seen if layer >= first]
            if padded:
                res["padded_masked"] = bool(masks) and all(m is not None for m in masks)
                continue
            res["unpadded_none"] = bool(masks) and all(m is None for m in masks)
            engine._stage_mask = explicit
            try:
                with method.apply(model):
                    ref, _ = forced_run(model, inputs)
            finally:
                engine._stage_mask = original
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
        inputs = _inputs(loaded, device, padded=False)
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


# ---- the throughput benchmark on LLaVA-1.5-7B shapes --------------------------------------------


def bench_configs(out: Path, quick: bool) -> list[tuple[str, list[str]]]:
    """(folder, harness.bench overrides) of the two benches."""
    common = ["model=llava15_7b_random", "device=cuda", "wandb.mode=disabled", "warmup=1", "repeats=5",
              "budget.kind=memory", "budget.reference_batch=8", f"methods={json.dumps(BENCH_METHODS)}"]
    if quick:
        return [("bench", [*common, "batch_sizes=[1,8]", "context_lengths=[null]", "new_tokens=128",
                           "budget.context_length=null", f"out_dir={out / 'bench'}"])]
    return [
        ("bench", [*common, "batch_sizes=[1,8,32]", "context_lengths=[null,2048]", "new_tokens=128",
                   "budget.context_length=2048", f"out_dir={out / 'bench'}"]),
        ("bench_long", [*common, "batch_sizes=[8]", "context_lengths=[null]", "new_tokens=512",
                        "budget.context_length=null", "budget.new_tokens=128", f"out_dir={out / 'bench_long'}"]),
    ]


def run_benches(out: Path, quick: bool) -> list[dict]:
    from hydra import compose, initialize_config_dir

    from harness import bench
    from harness.config import CONF_DIR

    results = []
    for folder, overrides in bench_configs(out, quick):
        path = out / folder / bench.RESULT
        if path.exists() and json.loads(path.read_text()).get("status") == "complete":
            print(f"{path}: finished earlier, kept", flush=True)
        else:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(config_name="bench", overrides=overrides)
            bench.run_bench(cfg)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        results.append(json.loads(path.read_text()))
    return results


# ---- reporting --------------------------------------------------------------------------------


def _x(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def bench_table(benches: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["Method", "B", "Prompt", "New", "Decode tok/s", "Decode ×", "E2E tok/s", "E2E ×", "Prefill ×",
              "KV ×", "Mem GB", "BW util", "Predicted ×"]
    rows = []
    for result in benches:
        for r in result["rows"]:
            x, pred = r["ratios"], r.get("predicted_decode_speedup")
            mem = r.get("peak_memory_bytes")
            bw = r.get("bandwidth_utilisation")
            rows.append([
                r["label"], str(r["batch_size"]), str(r["prompt_tokens"]), str(r["new_tokens"]),
                f"{r['decode_tokens_per_s']:.0f} ± {r.get('decode_tokens_per_s_iqr') or 0:.0f}", _x(x["decode_speedup"]),
                f"{r['e2e_tokens_per_s']:.0f} ± {r.get('e2e_tokens_per_s_iqr') or 0:.0f}", _x(x["e2e_speedup"]),
                _x(x["prefill_speedup"]), f"{x['kv_fraction']:.3f}", "–" if mem is None else f"{mem / 2**30:.1f}",
                "–" if bw is None else f"{100 * bw:.0f} %",
                _x(pred),
            ])
    return header, rows


def budget_table(benches: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["Budget", "Method", "Max B", "Batch ×", "Decode tok/s", "Decode ×", "E2E tok/s", "E2E ×", "Mem GB"]
    rows = []
    for result in benches:
        b = result.get("budget") or {}
        if not b.get("complete"):
            continue
        what = f"{b.get('kind', 'kv')} {b['bytes'] / 2**30:.1f} GB, prompt {b['prompt_tokens']} + {b['new_tokens']}"
        for e in b["entries"]:
            mem = e.get("peak_memory_bytes")
            rows.append([what, e["label"], str(e["max_batch"]), _x(e["batch_ratio"]),
                         f"{e['decode_tokens_per_s']:.0f}", _x(e.get("decode_speedup")),
                         f"{e.get('e2e_tokens_per_s') or 0:.0f}", _x(e.get("e2e_speedup")),
                         "–" if mem is None else f"{mem / 2**30:.1f}"])
    return header, rows


def correctness_table(matrix: dict) -> tuple[list[str], list[list[str]]]:
    impls = [i for i in matrix["impls"] if i != "sdpa"]
    header = ["Family", "Method", "dtype", "Padded", *[f"{i} vs sdpa" for i in impls], "KV formula", "OK"]
    rows = []
    for c in matrix["cells"]:
        errs = c.get("errors", {})
        rows.append([c["family"], c["method"], c["dtype"], "yes" if c["padded"] else "no",
                     *[f"{errs[i]:.1e}" if i in errs else "error" if i in c.get("impl_errors", {}) else "–"
                       for i in impls],
                     "ok" if c.get("kv_ok") else c.get("kv", c.get("error", "–")), "ok" if c["ok"] else "FAIL"])
    return header, rows


def write_readme(out: Path, matrix: dict, benches: list[dict]) -> Path:
    from harness.report import markdown

    device = benches[0]["device"]["name"] if benches else matrix["device"]
    parts = [
        f"# GPU check on {device}",
        "",
        "<!-- rendered by `python -m harness.gpu_check`; do not edit -->",
        "Speed-ups (×) are the method over dense, higher is better; KV × is method / dense bytes; "
        "± is the IQR over repeats (ABBA order). Predicted ×: the decode speed-up the bytes per step "
        "allow (decoder weights touched plus the KV each layer read, dense over the method). BW util: bytes a decode step reads over its time, against the "
        "device's peak bandwidth.",
        "",
        "## Throughput (model=llava15_7b_random, float16, random weights)",
        "",
        markdown(*bench_table(benches)),
        "## Fixed budget",
        "",
        markdown(*budget_table(benches)),
        f"## Correctness ({matrix['passed']} / {matrix['total']} cells pass; tolerance {matrix['tolerance']})",
        "",
        markdown(*correctness_table(matrix)),
    ]
    path = out / "README.md"
    path.write_text("\n".join(parts))
    return path


def summary(matrix: dict, benches: list[dict]) -> str:
    header, rows = bench_table(benches)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = [f"correctness: {matrix['passed']} / {matrix['total']} cells pass (impls {matrix['impls']}, "
             f"dtypes {matrix['dtypes']})"]
    lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


# ---- entry point ------------------------------------------------------------------------------


def cpu_checks(out: Path, threads: int = 1) -> tuple[bool, dict]:
    """The CPU-checkable parts, on ``threads`` CPU threads (tiny models: one thread is fastest,
    and does not fight a busy machine's other jobs)."""
    device = torch.device("cpu")
    start = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        checks = {"mask": mask_check(device), "timing_protocol": protocol_check(device)}
        checks["correctness"] = correctness(device, ["float32"], ["sdpa", "eager"])
    finally:
        torch.set_num_threads(before)
    checks["seconds"] = time.perf_counter() - start
    checks["env"] = env_info()
    ok = checks["mask"]["ok"] and checks["timing_protocol"]["ok"] and checks["correctness"]["passed"] == checks[
        "correctness"]["total"]
    checks["ok"] = ok
    write_json_atomic(out / "cpu_checks.json", checks)
    return ok, checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="results folder (default results/gpu/<device>, or runs/gpu_check/cpu)")
    p.add_argument("--quick", action="store_true", help="a smaller bench grid (batch 1 and 8, the unpadded prompt)")
    p.add_argument("--skip-bench", action="store_true", help="correctness only")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        out = Path(args.out or "runs/gpu_check/cpu")
        ok, checks = cpu_checks(out)
        c = checks["correctness"]
        print(
            f"gpu-check needs a CUDA GPU (flash/fp16/bf16 correctness, LLaVA-1.5-7B throughput); ran the CPU checks "
            f"instead in {checks['seconds']:.0f} s: masks {'ok' if checks['mask']['ok'] else 'FAILED'}, timing protocol "
            f"{'ok' if checks['timing_protocol']['ok'] else 'FAILED'}, sdpa vs eager fp32 {c['passed']}/{c['total']} "
            f"cells ok -> {out / 'cpu_checks.json'}"
        )
        return 0 if ok else 1

    device = torch.device("cuda")
    out = Path(args.out or Path("results/gpu") / device_slug(device))
    out.mkdir(parents=True, exist_ok=True)
    impls = (["flash_attention_2"] if flash_available() else []) + ["sdpa", "eager", "sdpa_flash"]
    if not flash_available():
        print("flash-attn is not importable: the correctness matrix covers sdpa and eager only (docs/gpu.md: install)")
    checks = {"mask": mask_check(device), "timing_protocol": protocol_check(device)}
    write_json_atomic(out / "protocol_checks.json", checks)
    matrix = correctness(device, ["float16", "bfloat16"], impls, out / "correctness.json")
    print(f"correctness: {matrix['passed']} / {matrix['total']} cells pass -> {out / 'correctness.json'}", flush=True)
    benches = [] if args.skip_bench else run_benches(out, args.quick)
    readme = write_readme(out, matrix, benches)
    print(summary(matrix, benches))
    print(f"wrote {readme}")
    ok = checks["mask"]["ok"] and checks["timing_protocol"]["ok"] and matrix["passed"] == matrix["total"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
