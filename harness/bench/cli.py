"""``python -m harness.bench``: run every point (``run_bench``), write bench.json after each, log to W&B."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import lazyattn
from harness import measure, tracking
from harness.config import CONF_DIR, plain
from harness.device import setup
from harness.folders import relative_to_repo
from harness.settings import RunError
from harness.models import load_model
from harness.results import SCHEMA_VERSION, device_info, env_info, write_json_atomic
from harness.bench.constants import RESULT
from harness.bench.variants import (
    BenchError, Variant, bench_key, check_settings, make_variant, previous_result,
)
from harness.bench.prompts import Prompts
from harness.bench.budget import budget_plan, compare_caches, free_memory, run_budget, timing_row
from harness.bench.tables import format_table, terms_line


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
        done = {(r["label"], r["batch_size"], r["context_length"], bool(r.get("compiled"))): r
                for r in previous.get("rows", [])}
        if (previous.get("budget") or {}).get("complete"):
            result["budget"] = previous["budget"]
        print(f"resuming {path}: {len(done)} finished point(s) kept")
    grid = [(v, c, b, compiled) for compiled in settings["compile"] for v in variants for c in contexts
            for b in settings["batch_sizes"]]

    if previous and previous.get("caches"):
        result["caches"] = previous["caches"]

    def save() -> None:
        result["rows"] = [done[k] for k in ((v.label, b, c["context_length"], x) for v, c, b, x in grid) if k in done]
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

    for v, context, batch, compiled in grid:
        point = (v.label, batch, context["context_length"], compiled)
        if point in done:
            continue
        inputs = prompts.inputs(context["extra_words"], batch)
        res = measure.time_against_dense(
            model, inputs, v.method,
            new_tokens=settings["new_tokens"], repeats=settings["repeats"],
            warmup=max(1, settings["warmup"]) if compiled else settings["warmup"],  # compiling is not decoding
            cache=settings["cache"], compile=compiled,
        )
        done[point] = timing_row(v, res, context, dev)
        save()
        del inputs
        free_memory(device)
        r = done[point]
        x = r["ratios"]
        print(
            f"{v.label + (' compiled' if compiled else ''):<22} B={batch:<3} prompt={r['prompt_tokens']:<5} new={r['new_tokens']:<4} "
            f"kv x{x['kv_fraction']:.4f} decode x{x['decode_speedup']:.3f} (predicted x{r['predicted_decode_speedup'] or 0:.3f}) "
            f"e2e x{x['e2e_speedup']:.3f} prefill x{x['prefill_speedup']:.3f} (speed-ups: method over dense)",
            flush=True,
        )
        if r.get("decode_read_terms") and r["dense"].get("decode_read_terms"):
            print(f"{'':<22} predicted = dense / method bytes a step: {terms_line(r['dense']['decode_read_terms'])} / "
                  f"{terms_line(r['decode_read_terms'])}", flush=True)

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


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench")
def main(cfg: DictConfig) -> None:
    try:
        path = run_bench(cfg)
    except (RunError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(path)

