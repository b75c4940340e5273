"""The correctness matrix: every model family at a tiny size x every registered method (at the
settings it gives for checks, ``lazyattn.examples_of``, on the families it is defined for) x dtype x
padded or not. Each implementation's logits of a prefill and of teacher-forced decode steps against
``sdpa``'s within ``TOLERANCE``, and the KV cache against the formula its plan gives."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

import lazyattn
from harness.generate import cache_kwarg, conversation, prompt_inputs
from harness.models import families
from harness.results import write_json_atomic
from harness.tasks import shapes
from lazyattn import kv_cache_bytes
from lazyattn.arch import decoder_layers
from lazyattn.cache import new_cache

N_LAYERS = families.TINY_TEXT["layers"]


FAMILIES = families.TINY_SHAPES


# max |logits - sdpa's logits| / max |sdpa's logits|, prefill and every teacher-forced decode step
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}


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


def entries(family_key: str) -> dict[str, dict]:
    """The matrix's methods on family ``family_key`` (a key of ``FAMILIES``): every registered method
    at the settings it gives for checks (``lazyattn.examples_of``), where it is defined for the
    family; entry name -> method spec."""
    family = FAMILIES[family_key][0]
    out = {}
    for name in lazyattn.METHODS:
        for entry, spec in lazyattn.examples_of(name, N_LAYERS, family).items():
            try:
                defined = lazyattn.method_families(lazyattn.build(spec), N_LAYERS)
            except ValueError:  # settings this model cannot take: its cells fail, saying why
                defined = None
            if defined is None or family in defined:
                out[entry] = spec
    return out


def entry_name(entry: str | dict) -> str:
    """A matrix entry's name in cell keys: its entry name, or a spec's method name and settings."""
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


NO_FLASH_KERNEL = ("the flash kernel cannot run this method's attention call (e.g. query/key and value head sizes "
                   "differ); unforced, SDPA runs it with another kernel")


def forced_flash():
    """PyTorch's flash SDPA kernel and nothing else (an error where it cannot run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def relative_error(logits: torch.Tensor, ref: torch.Tensor) -> float:
    """max |logits - ref| / max |ref| (inf when ref is all zero)."""
    scale = ref.abs().max().item()
    diff = (logits - ref).abs().max().item()
    return diff / scale if scale > 0 else float("inf")



def two_prompts(loaded, device, padded: bool) -> dict:
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
    """What each layer's slot holds against what the method's plan says it keeps (``Plan.keeps``):
    keys and values (2 x batch x kv heads x tokens x head dim x bytes), values only, nothing, or
    every value and the text tokens' keys. Pruned layers (from the plan's first pruned layer on) hold
    fewer tokens than the prompt, the layers before it the whole prompt; every decode step adds one
    token to every layer."""
    cfg = model.config.get_text_config(decoder=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    batch, prompt = inputs["input_ids"].shape
    elem = torch.finfo(model.dtype).bits // 8
    per_token = batch * cfg.num_key_value_heads * head_dim * elem  # one of K or V, one layer
    n = len(decoder_layers(model))
    plan = method.plan(n)
    n_image = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    first = n if plan.pruned_from is None else plan.pruned_from
    lengths, want = [], 0
    for i, layer in enumerate(cache.layers):
        length = layer.get_seq_length()
        lengths.append(length)
        keeps, keys = plan.keeps(i), layer.keys
        if keeps == "":
            if keys is not None or layer.values is not None:
                return False, f"layer {i}: a slot that keeps nothing holds tensors"
        elif keeps == "v+text k":
            if keys is None or keys.shape[-2] != length - n_image:
                return False, f"layer {i}: a text-key slot should hold {length - n_image} keys"
            want += per_token * (2 * length - n_image)
        elif (keys is None) != (keeps == "v"):
            return False, f"layer {i}: keys {'missing' if keys is None else 'present'}, the plan keeps {keeps!r}"
        else:
            want += per_token * length * (1 if keeps == "v" else 2)
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
    kept: resumable). ``methods``: entry names of ``entries(family)`` or method specs (default: every
    entry of the family). ``impls`` may name ``sdpa_flash`` (``KERNELS``): it runs on unpadded cells only.
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
            chosen = entries(fam)
            todo = [(m, p) for m in (methods or list(chosen)) for p in (False, True)
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
                    method = lazyattn.build(chosen[name] if isinstance(name, str) else name)
                    ref_loaded = model_for("sdpa")
                    inputs = two_prompts(ref_loaded, device, padded)
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
                            if impl == "sdpa_flash" and "No available kernel" in str(err):
                                # not a wrong number: the flash kernel cannot take this call (visual_scores'
                                # queries and keys are twice the values' head size), and SDPA picks another
                                cell.setdefault("not_applicable", {})[impl] = NO_FLASH_KERNEL
                                continue
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
