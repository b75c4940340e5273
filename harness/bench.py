"""The efficiency benchmark: ``python -m harness.bench model=NAME device=cpu|cuda ...``.

For one model, dense and each configured method: prefill latency, decode tokens/s and peak KV
bytes across batch sizes and prompt lengths. Each point times dense and the method interleaved
in this process (``harness.measure.compare``), so a row's ratios come from one run.

Then throughput under a fixed KV memory budget (the paper's claim: more sequences in the same
memory). The budget is dense's peak KV at ``budget.reference_batch`` (or ``budget.bytes``). A
method's peak KV is linear in the batch, so its largest batch is predicted from its KV at batch
1, then verified by running that batch (stepping down while the measured peak exceeds the
budget); every method is then timed at its own largest batch, round-robin with dense at dense's.

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
from harness.config import CONF_DIR, RunError, compose, method_spec, plain, relative_to_repo, setup
from harness.generate import conversation, prompt_inputs
from harness.models import load_model
from harness.results import SCHEMA_VERSION, config_key, device_info, env_info, write_json_atomic
from harness.tasks import shapes
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
    known = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
    if name not in known:
        raise BenchError(f"unknown method preset {name!r} in methods; known: {', '.join(known)} (conf/method/).")
    try:
        cfg = compose([f"method={name}", *(f"method.{p}" for p in dotlist)])
        if calibration.wanted(cfg.method):
            calibration.refuse("the efficiency benchmark")
        method = lazyattn.build(method_spec(cfg.method))
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
    }
    b = cfg.budget
    if b.enabled:
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


def _row(variant: Variant, res: dict, context: dict, dev: dict) -> dict:
    d, m = res["dense"], res["method"]
    return {
        "method": variant.config,
        "label": variant.label,
        "params": variant.method.params(),
        "lazy_layers": variant.lazy_layers,
        "batch_size": res["batch_size"],
        "context_length": context["context_length"],
        "prompt_tokens": res["prompt_tokens"],
        "new_tokens": res["new_tokens"],
        "prefill_ms": m["prefill_ms"],
        "decode_tokens_per_s": m["decode_tokens_per_s"],
        "kv_cache_bytes": m["kv_cache_bytes"],
        "dense": {k: d[k] for k in ("prefill_ms", "decode_tokens_per_s", "kv_cache_bytes")},
        "ratios": {
            "kv_cache_bytes": m["kv_cache_bytes"] / d["kv_cache_bytes"],
            "kv_reduction": res["kv_reduction"],
            "decode_speedup": res["decode_speedup"],
            "prefill_ms": m["prefill_ms"] / d["prefill_ms"],
        },
        "repeats": m["repeats"],
        "device": dev["device"],
        "device_name": dev["name"],
    }


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_kv(model, variant: Variant, inputs: dict, new_tokens: int) -> int:
    with variant.method.apply(model):
        return int(measure.generate_once(model, inputs, new_tokens)["kv_cache_bytes"])


def budget_plan(model, prompts: Prompts, context: dict, variants: list[Variant], cfg: DictConfig, new_tokens: int,
                dev: dict) -> dict:
    """The budget and every variant's KV per sequence, measured at batch 1; fails fast when the
    budget cannot hold a single sequence of some variant."""
    words = context["extra_words"]
    one = prompts.inputs(words, 1)
    per_sample = {v.label: _peak_kv(model, v, one, new_tokens) for v in variants}
    if cfg.bytes is None:
        ref = int(cfg.reference_batch)
        budget = _peak_kv(model, variants[0], prompts.inputs(words, ref), new_tokens)
        source = f"dense peak KV at batch {ref}"
    else:
        budget, ref, source = int(float(cfg.bytes)), None, "budget.bytes"
    for v in variants:
        if per_sample[v.label] > budget:
            raise BenchError(
                f"KV budget of {budget} bytes cannot hold one sequence of {v.label!r} ({per_sample[v.label]} bytes at "
                f"{context['prompt_tokens']} prompt + {new_tokens} new tokens); raise budget.bytes, or leave it null "
                "to use dense's peak KV at budget.reference_batch."
            )
    return {
        "bytes": budget,
        "source": source,
        "reference_batch": ref,
        "context_length": context["context_length"],
        "prompt_tokens": context["prompt_tokens"],
        "new_tokens": new_tokens,
        "max_batch_cap": int(cfg.max_batch),
        "device": dev["device"],
        "device_name": dev["name"],
        "complete": False,
        "entries": [
            {"label": v.label, "method": v.config, "per_sample_kv_bytes": per_sample[v.label]} for v in variants
        ],
    }


def run_budget(model, prompts: Prompts, context: dict, variants: list[Variant], plan: dict, settings: dict,
               device: torch.device) -> dict:
    budget, cap, new_tokens = plan["bytes"], plan["max_batch_cap"], settings["new_tokens"]
    words = context["extra_words"]
    timed = {}
    for v, entry in zip(variants, plan["entries"]):
        predicted = budget // entry["per_sample_kv_bytes"]
        batch, limited_by, steps, kv = min(predicted, cap), "kv_budget" if predicted <= cap else "max_batch", 0, None
        while batch >= 1:
            inputs = prompts.inputs(words, batch)
            try:
                kv = _peak_kv(model, v, inputs, new_tokens)
            except torch.OutOfMemoryError:
                _free(device)
                batch, limited_by, steps, kv = batch - 1, "device_memory", steps + 1, None
                continue
            if kv <= budget:
                break
            batch, steps = min(batch - 1, budget * batch // kv), steps + 1
        if batch < 1 or kv is None:
            raise BenchError(f"no batch of {v.label!r} fits the KV budget of {budget} bytes on {plan['device']}.")
        entry.update(predicted_max_batch=predicted, max_batch=batch, limited_by=limited_by, steps_down=steps,
                     verified_kv_cache_bytes=kv)
        timed[v.label] = (inputs, lambda v=v: v.method.apply(model))  # the inputs of the verified batch
    summaries = measure.interleaved(
        model, timed, new_tokens=new_tokens, repeats=settings["repeats"], warmup=settings["warmup"]
    )
    dense = summaries[variants[0].label]
    dense_batch = plan["entries"][0]["max_batch"]
    for entry in plan["entries"]:
        s = summaries[entry["label"]]
        if s["kv_cache_bytes"] > budget:  # KV bytes don't depend on timing: this would be a bug
            raise BenchError(f"{entry['label']!r} at batch {entry['max_batch']} used {s['kv_cache_bytes']} > {budget} bytes.")
        entry.update(
            kv_cache_bytes=s["kv_cache_bytes"],
            kv_fraction_of_budget=s["kv_cache_bytes"] / budget,
            prefill_ms=s["prefill_ms"],
            decode_tokens_per_s=s["decode_tokens_per_s"],
            batch_ratio=entry["max_batch"] / dense_batch,
            throughput_ratio=s["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
        )
    plan.update(repeats=settings["repeats"], complete=True)
    return plan


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

    loaded = load_model(cfg.model, device)
    model = loaded.model
    dense = Variant(label="dense", config="dense", method=lazyattn.Dense())
    for v in [dense, *variants]:
        try:
            v.lazy_layers = v.method.lazy_layers(loaded.n_layers) if hasattr(v.method, "lazy_layers") else []
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

    def save() -> None:
        result["rows"] = [done[k] for k in ((v.label, b, c["context_length"]) for v, c, b in grid) if k in done]
        write_json_atomic(path, result)

    budget_context = None
    if cfg.budget.enabled and result["budget"] is None:
        target = cfg.budget.context_length if cfg.budget.context_length is not None else settings["context_lengths"][-1]
        budget_context = prompts.fit(target)  # lengths are cached, so a swept context costs nothing again
        variants_b = [dense, *(v for v in variants if v.label != "dense")]
        result["budget"] = budget_plan(model, prompts, budget_context, variants_b, cfg.budget,
                                       settings["new_tokens"], dev)
    save()

    for v, context, batch in grid:
        point = (v.label, batch, context["context_length"])
        if point in done:
            continue
        inputs = prompts.inputs(context["extra_words"], batch)
        res = measure.compare(
            model, inputs, lambda v=v: v.method.apply(model),
            new_tokens=settings["new_tokens"], repeats=settings["repeats"], warmup=settings["warmup"],
        )
        done[point] = _row(v, res, context, dev)
        save()
        del inputs
        _free(device)
        r = done[point]
        print(
            f"{v.label:<22} B={batch:<3} prompt={r['prompt_tokens']:<5} kv x{r['ratios']['kv_cache_bytes']:.4f} "
            f"decode x{r['ratios']['decode_speedup']:.3f} prefill x{r['ratios']['prefill_ms']:.3f}",
            flush=True,
        )

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


def format_table(result: dict) -> str:
    dev = result["device"]
    lines = [
        f"{result['model']['name']} ({result['model']['dtype']}) on {dev['device']} [{dev['name']}]: method vs dense, "
        "same process (ratios method/dense)",
        f"{'method':<24}{'B':>4}{'prompt':>8}{'prefill ms':>12}{'x':>7}{'decode tok/s':>14}{'x':>7}"
        f"{'KV MB':>11}{'x':>8}",
    ]
    for r in result["rows"]:
        x = r["ratios"]
        lines.append(
            f"{r['label']:<24}{r['batch_size']:>4}{r['prompt_tokens']:>8}{r['prefill_ms']:>12.2f}{x['prefill_ms']:>7.3f}"
            f"{r['decode_tokens_per_s']:>14.1f}{x['decode_speedup']:>7.3f}{r['kv_cache_bytes'] / 2**20:>11.3f}"
            f"{x['kv_cache_bytes']:>8.4f}"
        )
    b = result.get("budget")
    if b and b.get("complete"):
        lines += [
            "",
            f"KV budget {b['bytes']} bytes ({b['bytes'] / 2**20:.3f} MB; {b['source']}), prompt {b['prompt_tokens']} + "
            f"{b['new_tokens']} new tokens, on {b['device']} [{b['device_name']}]",
            f"{'method':<24}{'KV/seq MB':>11}{'max B':>7}{'x':>7}{'KV MB':>10}{'decode tok/s':>14}{'x dense':>9}",
        ]
        for e in b["entries"]:
            lines.append(
                f"{e['label']:<24}{e['per_sample_kv_bytes'] / 2**20:>11.4f}{e['max_batch']:>7}{e['batch_ratio']:>7.3f}"
                f"{e['kv_cache_bytes'] / 2**20:>10.3f}{e['decode_tokens_per_s']:>14.1f}{e['throughput_ratio']:>9.3f}"
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
    main()
