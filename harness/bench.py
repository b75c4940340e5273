"""The efficiency benchmark: ``python -m harness.bench model=NAME device=cpu|cuda ...``.

For one model, dense and each configured method: prefill latency, decode and end-to-end
tokens/s (batch x new tokens over prefill + decode), peak KV bytes and peak device memory (CUDA
only) across batch sizes and prompt lengths. Each point times dense and the method in ABBA
order in this process (``harness.measure.compare``), so a row's speed-ups come from one run.
Every speed-up is method over dense, higher is better.

Then throughput under a fixed memory budget (the paper's claim: more sequences in the same
memory). ``budget.kind`` says what is budgeted: ``kv`` the KV cache bytes (the paper's measure;
any device), ``memory`` the peak allocated device memory (weights, activations and cache; CUDA
only). The budget is dense's figure at ``budget.reference_batch`` (or ``budget.bytes``). A
method's figure is linear in the batch (through zero for KV; with a fixed part, the weights,
for device memory, so that one is measured at batch 1 and 2), so its largest batch is predicted,
then verified by running that batch (stepping down while the measured peak exceeds the budget);
every method is then timed at its own largest batch, in ABBA order with dense at dense's.

``out_dir/bench.json`` is rewritten atomically after every point, so an interrupted bench keeps
what finished; running the same command with the same ``out_dir`` resumes it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig

import lazyattn
from harness import calibration, measure, tracking
from harness.config import RunError, check_command_line, compose, method_presets, plain, relative_to_repo, setup
from harness.generate import conversation, prompt_inputs
from harness.models import load_model
from harness.results import SCHEMA_VERSION, config_key, device_info, env_info, write_json_atomic
from harness.tasks import shapes
from lazyattn.cache import CACHE_KINDS
RESULT = "bench.json"
QUESTION = "describe the image ."
# Extra words that lengthen the prompt; all in the tiny tokenizer's vocabulary.
FILLER = tuple(shapes.words("a red circle at the top left , a blue square at the bottom right ."))
# Settings that don't change the numbers don't change whether earlier points can be resumed.
KEY_EXCLUDE = ("out_dir", "overwrite", "wandb", "threads")


class BenchError(RunError):
    """A problem with the benchmark's settings, reported as one clear line."""


# ---------------------------------------------------------------------------------------------
# Methods: "PRESET key=value ..." or {config: PRESET, overrides: {...}}, composed like `method=PRESET`


@dataclasses.dataclass
class Variant:
    label: str
    config: str
    method: Any
    lazy_layers: list[int] = dataclasses.field(default_factory=list)


def _dotlist(d: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in d.items():
        if isinstance(value, dict):
            out += _dotlist(value, f"{prefix}{key}.")
        else:
            text = json.dumps(value, separators=(",", ":")) if isinstance(value, (list, type(None))) else value
            out.append(f"{prefix}{key}={text}")
    return out


def parse_entry(entry: Any) -> tuple[str, list[str]]:
    """(preset name, ``key=value`` overrides of it) of one ``methods`` entry."""
    entry = plain(entry)
    if isinstance(entry, str) and entry.split():
        name, *dotlist = entry.split()
    elif isinstance(entry, dict) and "config" in entry and set(entry) <= {"config", "overrides"}:
        raw = entry.get("overrides") or {}
        if not isinstance(raw, dict):
            raise BenchError(f"method entry {entry!r}: overrides must be a mapping like {{ratio: 0.5}}.")
        name, dotlist = str(entry["config"]), _dotlist(raw)
    else:
        raise BenchError(f"method entry {entry!r} must be a string 'PRESET key=value ...' or {{config: PRESET, overrides: {{...}}}}.")
    bad = [p for p in dotlist if "=" not in p]
    if bad:
        raise BenchError(f"method entry {entry!r}: overrides must be key=value, got {bad}.")
    return name, dotlist


def make_variant(entry: Any) -> Variant:
    """The method of one entry, composed from its conf/method preset exactly as `method=PRESET
    method.key=value` would be, and built by lazyattn.build."""
    name, dotlist = parse_entry(entry)
    label = " ".join([name, *dotlist])
    if any(p.split("=", 1)[0] == "name" for p in dotlist):
        raise BenchError(f"method entry {label!r}: the method's name comes from its preset; don't override it.")
    known = method_presets()
    if name not in known:
        raise BenchError(f"unknown method preset {name!r} in methods; known: {', '.join(known)} (conf/method/).")
    try:
        cfg = compose([f"method={name}", *(f"method.{p}" for p in dotlist)])
        method = calibration.build_fixed(cfg.method, "the efficiency benchmark")
    except ConfigCompositionException as err:  # "Could not override 'method.ratoi'."
        raise BenchError(f"method entry {label!r}: {str(err).splitlines()[0]} (not a key of conf/method/{name}.yaml)") from err
    except ValueError as err:
        raise BenchError(f"method entry {label!r}: {err}") from err
    return Variant(label=label, config=name, method=method)


# ---------------------------------------------------------------------------------------------
# Prompts of a given length: the image plus the question, lengthened with extra words


class Prompts:
    def __init__(self, loaded, device: torch.device) -> None:
        self.processor = loaded.processor
        self.dtype = loaded.model.dtype
        self.device = device
        self.image = shapes.load_split("val", 1)[0].image(224)
        self._lengths: dict[int, int] = {}

    @staticmethod
    def text(extra_words: int) -> str:
        return " ".join([FILLER[i % len(FILLER)] for i in range(extra_words)] + [QUESTION])

    def inputs(self, extra_words: int, batch_size: int, device=None) -> dict:
        history = conversation([self.text(extra_words)], [])
        inputs = prompt_inputs(
            self.processor, [history] * batch_size, [self.image] * batch_size, device or self.device, self.dtype
        )
        assert bool(inputs["attention_mask"].all()), "benchmark prompts must not be padded"
        return inputs

    def length(self, extra_words: int) -> int:
        if extra_words not in self._lengths:
            self._lengths[extra_words] = int(self.inputs(extra_words, 1, "cpu")["input_ids"].shape[1])
        return self._lengths[extra_words]

    def fit(self, target: int | None) -> dict:
        """The most extra words whose prompt has at most ``target`` tokens (exactly, whenever each
        word is a token, as with the tiny tokenizer)."""
        base = self.length(0)
        if target is None:
            return {"context_length": None, "prompt_tokens": base, "extra_words": 0}
        if target < base:
            raise BenchError(
                f"context length {target} is shorter than the unpadded prompt ({base} tokens: the image and "
                f"{QUESTION!r}); use lengths >= {base}, or null for the unpadded prompt."
            )
        words = target - base
        if self.length(words) > target:
            lo, hi = 0, words  # largest word count whose prompt still fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if self.length(mid) <= target else (lo, mid - 1)
            words = lo
        return {"context_length": target, "prompt_tokens": self.length(words), "extra_words": words}


# ---------------------------------------------------------------------------------------------


def _int(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BenchError(f"{what} must be an integer >= {minimum}, got {value!r}.")
    return value


def check_settings(cfg: DictConfig) -> dict:
    batch_sizes = plain(cfg.batch_sizes)
    contexts = plain(cfg.context_lengths)
    if not isinstance(batch_sizes, list) or not batch_sizes:
        raise BenchError(f"batch_sizes must be a non-empty list like [1,4,8], got {batch_sizes!r}.")
    if not isinstance(contexts, list) or not contexts:
        raise BenchError(f"context_lengths must be a non-empty list like [null,256,512], got {cfg.context_lengths!r}.")
    for b in batch_sizes:
        _int(b, "every batch size", 1)
    for c in contexts:
        if c is not None:
            _int(c, "every context length (or null)", 1)
    if len(set(batch_sizes)) != len(batch_sizes) or len(set(contexts)) != len(contexts):
        raise BenchError("batch_sizes and context_lengths must not repeat a value.")
    if not cfg.methods:
        raise BenchError("methods is empty; list at least one, e.g. methods=['lazy ratio=0.5'].")
    settings = {
        "batch_sizes": batch_sizes,
        "context_lengths": contexts,
        "new_tokens": _int(cfg.new_tokens, "new_tokens", 1),
        "repeats": _int(cfg.repeats, "repeats", 1),
        "warmup": _int(cfg.warmup, "warmup", 0),
        "cache": str(cfg.get("cache", "static")),
        "compile": bool(cfg.get("compile", False)),
    }
    from harness.config import check_cache

    check_cache(settings["cache"])
    b = cfg.budget
    if b.enabled:
        kind = b.get("kind", "kv")
        if kind not in ("kv", "memory"):
            raise BenchError(f"budget.kind must be kv (KV cache bytes) or memory (peak device memory), got {kind!r}.")
        if b.get("new_tokens") is not None:
            _int(b.new_tokens, "budget.new_tokens (or null)", 1)
        if b.bytes is not None:
            whole = isinstance(b.bytes, float) and b.bytes.is_integer()  # 8e9 on the command line is a float
            settings["budget_bytes"] = _int(int(b.bytes) if whole else b.bytes, "budget.bytes (or null)", 1)
        else:
            _int(b.reference_batch, "budget.reference_batch", 1)
        _int(b.max_batch, "budget.max_batch", 1)
        if b.context_length is not None:
            _int(b.context_length, "budget.context_length (or null)", 1)
    return settings


def bench_key(cfg: DictConfig) -> str:
    data = {k: v for k, v in plain(cfg).items() if k not in KEY_EXCLUDE}
    return config_key(data)


def previous_result(path: Path, key: str, overwrite: bool) -> dict | None:
    """The unfinished bench to resume, if any; refuses to clobber a finished or different one."""
    if overwrite or not path.exists():
        return None
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise BenchError(f"{path} is not valid JSON; pass overwrite=true or choose another out_dir=DIR.") from None
    if previous.get("status") == "complete":
        raise BenchError(f"{path.parent} already holds a finished bench; pass overwrite=true or choose another out_dir=DIR.")
    if previous.get("bench_key") != key:
        raise BenchError(
            f"{path.parent} holds an unfinished bench with other settings; run it with its own settings to resume, "
            "or pass overwrite=true, or choose another out_dir=DIR."
        )
    return previous


TIMINGS = ("prefill_ms", "decode_tokens_per_s", "e2e_tokens_per_s")


def _figures(summary: dict) -> dict:
    """A variant's figures as a row keeps them: medians with their IQRs, KV, memory, bandwidth."""
    keys = [k for t in TIMINGS for k in (t, f"{t}_iqr")] + [
        "kv_cache_bytes", "peak_memory_bytes", "decode_step_bytes", "decode_weight_bytes", "decode_kv_read_bytes",
        "decode_bandwidth_bytes_per_s", "bandwidth_utilisation"]
    return {k: summary.get(k) for k in keys}


def _row(variant: Variant, res: dict, context: dict, dev: dict) -> dict:
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


def _free(device: torch.device) -> None:
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
                _free(device)
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
        timed[v.label] = (inputs, lambda v=v: v.method.apply(model))  # the inputs of the verified batch
        del inputs
    summaries = measure.interleaved(
        model, timed, new_tokens=new_tokens, repeats=settings["repeats"], warmup=settings["warmup"], cache=cache,
        compile=settings.get("compile", False),
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
            timed[f"{v.label} {kind}"] = (inputs, lambda v=v: v.method.apply(model), kind)
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


def run_bench(cfg: DictConfig) -> Path:
    out_dir = Path(cfg.out_dir)
    path = out_dir / RESULT
    settings = check_settings(cfg)
    variants = [make_variant(e) for e in cfg.methods]
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise BenchError(f"methods lists an entry twice: {labels}.")
    key = bench_key(cfg)
    previous = previous_result(path, key, bool(cfg.overwrite))
    device = setup(cfg)
    if cfg.budget.enabled and cfg.budget.get("kind", "kv") == "memory" and device.type != "cuda":
        raise BenchError("budget.kind=memory needs a CUDA device (peak device memory is not measured on "
                         f"{device.type}); use budget.kind=kv.")

    loaded = load_model(cfg.model, device)
    model = loaded.model
    dense = Variant(label="dense", config="dense", method=lazyattn.Dense())
    for v in [dense, *variants]:
        try:
            v.lazy_layers = list(v.method.plan(loaded.n_layers).lazy_layers)
        except ValueError as err:
            raise BenchError(f"method entry {v.label!r}: {err}") from err
    dev = device_info(device)
    prompts = Prompts(loaded, device)
    contexts = [prompts.fit(c) for c in settings["context_lengths"]]

    result = {
        "schema_version": SCHEMA_VERSION,
        "kind": "bench",
        "status": "running",
        "bench_key": key,
        "device": dev,
        "model": {
            "name": loaded.name,
            "n_layers": loaded.n_layers,
            "n_params": loaded.n_params,
            "dtype": str(model.dtype).removeprefix("torch."),
            "attn_implementation": model.config._attn_implementation,
        },
        "methods": [
            {"label": v.label, "method": v.config, "params": v.method.params(), "lazy_layers": v.lazy_layers}
            for v in variants
        ],
        "contexts": contexts,
        "rows": [],
        "budget": None,
        "env": env_info(),
        "config": relative_to_repo(plain(cfg)),
    }
    done = {}
    if previous:
        done = {(r["label"], r["batch_size"], r["context_length"]): r for r in previous.get("rows", [])}
        if (previous.get("budget") or {}).get("complete"):
            result["budget"] = previous["budget"]
        print(f"resuming {path}: {len(done)} finished point(s) kept")
    grid = [(v, c, b) for v in variants for c in contexts for b in settings["batch_sizes"]]

    if previous and previous.get("caches"):
        result["caches"] = previous["caches"]

    def save() -> None:
        result["rows"] = [done[k] for k in ((v.label, b, c["context_length"]) for v, c, b in grid) if k in done]
        write_json_atomic(path, result)

    budget_context = None
    if cfg.budget.enabled and result["budget"] is None:
        target = cfg.budget.context_length if cfg.budget.context_length is not None else settings["context_lengths"][-1]
        budget_context = prompts.fit(target)  # lengths are cached, so a swept context costs nothing again
        variants_b = [dense, *(v for v in variants if v.label != "dense")]
        budget_tokens = cfg.budget.get("new_tokens") or settings["new_tokens"]
        result["budget"] = budget_plan(model, prompts, budget_context, variants_b, cfg.budget, budget_tokens, dev,
                                       settings["cache"])
    save()

    for v, context, batch in grid:
        point = (v.label, batch, context["context_length"])
        if point in done:
            continue
        inputs = prompts.inputs(context["extra_words"], batch)
        res = measure.compare(
            model, inputs, lambda v=v: v.method.apply(model),
            new_tokens=settings["new_tokens"], repeats=settings["repeats"], warmup=settings["warmup"], method=v.method,
            cache=settings["cache"], compile=settings["compile"],
        )
        done[point] = _row(v, res, context, dev)
        save()
        del inputs
        _free(device)
        r = done[point]
        x = r["ratios"]
        print(
            f"{v.label:<22} B={batch:<3} prompt={r['prompt_tokens']:<5} new={r['new_tokens']:<4} "
            f"kv x{x['kv_fraction']:.4f} decode x{x['decode_speedup']:.3f} (predicted x{r['predicted_decode_speedup'] or 0:.3f}) "
            f"e2e x{x['e2e_speedup']:.3f} prefill x{x['prefill_speedup']:.3f} (speed-ups: method over dense)",
            flush=True,
        )

    if cfg.get("compare_caches") and result.get("caches") is None:
        result["caches"] = compare_caches(model, prompts, contexts[-1], [dense, *variants[:1]], settings)
        save()

    if budget_context is not None:
        result["budget"] = run_budget(model, prompts, budget_context, variants_b, result["budget"], settings, device)
    result["status"] = "complete"
    save()
    print(format_table(result))
    try:
        tracking.log_bench(result, plain(cfg.wandb), out_dir, str(cfg.name))
    except Exception as err:  # the result is on disk already; W&B is a copy
        print(f"W&B logging failed ({type(err).__name__}: {err}); {path} is complete.", file=sys.stderr)
    return path


def _mb(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _x(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def format_table(result: dict) -> str:
    """The rows and the budget as text. Every "x" is a speed-up of the method over dense (higher
    is better), except KV (method / dense bytes); "±" is the IQR over repeats."""
    dev = result["device"]
    lines = [
        f"{result['model']['name']} ({result['model']['dtype']}) on {dev['device']} [{dev['name']}], "
        f"{(result.get('config') or {}).get('cache', 'dynamic')} KV cache: method vs dense, "
        "same process, ABBA order; x = speed-up over dense (higher is better), KV x = method/dense bytes; "
        "pred x = decode speed-up the bytes per step allow (weights touched + KV read), of pred = achieved share",
        f"{'method':<24}{'B':>4}{'prompt':>7}{'new':>5}{'prefill ms':>16}{'x':>7}{'decode tok/s':>18}{'x':>7}"
        f"{'e2e tok/s':>11}{'x':>7}{'KV MB':>10}{'KV x':>8}{'mem MB':>9}{'pred x':>8}{'of pred':>8}",
    ]
    for r in result["rows"]:
        x = r["ratios"]
        pred, frac = r.get("predicted_decode_speedup"), r.get("decode_speedup_of_predicted")
        prefill = f"{r['prefill_ms']:.1f}±{r.get('prefill_ms_iqr') or 0:.1f}"
        decode = f"{r['decode_tokens_per_s']:.1f}±{r.get('decode_tokens_per_s_iqr') or 0:.1f}"
        lines.append(
            f"{r['label']:<24}{r['batch_size']:>4}{r['prompt_tokens']:>7}{r['new_tokens']:>5}{prefill:>16}"
            f"{x['prefill_speedup']:>7.3f}{decode:>18}{x['decode_speedup']:>7.3f}{r['e2e_tokens_per_s']:>11.1f}"
            f"{x['e2e_speedup']:>7.3f}{r['kv_cache_bytes'] / 2**20:>10.2f}{x['kv_fraction']:>8.4f}"
            f"{_mb(r.get('peak_memory_bytes')):>9}{_x(pred):>8}{_pct(frac):>8}"
        )
    if any(r.get("host_sync") for r in result["rows"]):
        lines.append("note: " + next(r["host_sync"] for r in result["rows"] if r.get("host_sync")))
    c = result.get("caches")
    if c:
        lines += ["", f"preallocated (static) vs concatenating (dynamic) KV cache at batch {c['batch_size']}, prompt "
                  f"{c['prompt_tokens']} + {c['new_tokens']} new tokens (x = static over dynamic)",
                  f"{'method':<24}{'static decode':>15}{'dynamic decode':>16}{'x':>7}{'static e2e':>12}{'dynamic e2e':>13}{'x':>7}"]
        for e in c["entries"]:
            lines.append(f"{e['label']:<24}{e['static']['decode_tokens_per_s']:>15.1f}{e['dynamic']['decode_tokens_per_s']:>16.1f}"
                         f"{e['decode_speedup']:>7.3f}{e['static']['e2e_tokens_per_s']:>12.1f}"
                         f"{e['dynamic']['e2e_tokens_per_s']:>13.1f}{e['e2e_speedup']:>7.3f}")
    b = result.get("budget")
    if b and b.get("complete"):
        what = "KV" if b.get("kind", "kv") == "kv" else "device memory"
        lines += [
            "",
            f"{what} budget {b['bytes']} bytes ({b['bytes'] / 2**20:.1f} MB; {b['source']}), prompt {b['prompt_tokens']} + "
            f"{b['new_tokens']} new tokens, on {b['device']} [{b['device_name']}]",
            f"{'method':<24}{'MB/seq':>9}{'max B':>7}{'x':>7}{'KV MB':>10}{'mem MB':>9}{'decode tok/s':>14}{'x':>7}"
            f"{'e2e tok/s':>11}{'x':>7}{'pred x':>8}{'of pred':>8}",
        ]
        for e in b["entries"]:
            per = e.get("per_sample_bytes", e.get("per_sample_kv_bytes"))
            lines.append(
                f"{e['label']:<24}{per / 2**20:>9.2f}{e['max_batch']:>7}{e['batch_ratio']:>7.3f}"
                f"{e['kv_cache_bytes'] / 2**20:>10.1f}{_mb(e.get('peak_memory_bytes')):>9}"
                f"{e['decode_tokens_per_s']:>14.1f}{e.get('decode_speedup', e.get('throughput_ratio', 0)):>7.3f}"
                f"{(e.get('e2e_tokens_per_s') or 0):>11.1f}{(e.get('e2e_speedup') or 0):>7.3f}"
                f"{_x(e.get('predicted_decode_speedup')):>8}{_pct(e.get('decode_speedup_of_predicted')):>8}"
            )
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    try:
        path = run_bench(cfg)
    except (RunError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(path)


if __name__ == "__main__":
    check_command_line("bench")
    main()
