"""One experiment, end to end: load, apply the method, score, measure, write, log."""

from __future__ import annotations

import contextlib
import random
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from harness import calibration, figures, measure, tracking
from harness.models import Loaded, load_model
from harness.generate import conversation, evaluate, prompt_inputs
from harness.methods import build_method, lazy_layers_of
from harness.results import SCHEMA_VERSION, SampleLog, config_key, env_info, write_json_atomic
from harness.tasks import LmmsBenchmarks, build_task
from lazyattn import Dense

class RunError(Exception):
    """A problem with the run's settings, reported as one clear line."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("device=cuda but no CUDA device is visible; use device=cpu or device=auto.")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise RunError(f"device must be auto, cpu or cuda, got {name!r}.")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run_key(cfg: DictConfig) -> str:
    """What a finished sample depends on; out_dir, W&B and efficiency settings don't count."""
    keep = {k: cfg[k] for k in ("model", "method", "task", "seed", "limit")}
    return config_key(OmegaConf.to_container(OmegaConf.create(keep), resolve=True))


def efficiency_inputs(loaded: Loaded, task, sample, batch_size: int, device) -> dict:
    """The first sample's first-turn prompt, repeated: equal lengths, so no padding in the timing."""
    history = conversation(sample.questions[:1], [])
    images = [task.image(sample)] * batch_size
    return prompt_inputs(loaded.processor, [history] * batch_size, images, device, loaded.model.dtype)


def run(cfg: DictConfig) -> Path:
    out_dir = Path(cfg.out_dir)
    result_path = out_dir / "result.json"
    if result_path.exists() and cfg.get("skip_finished") and not cfg.overwrite:
        print(f"skipping finished point {out_dir} (skip_finished=true; overwrite=true redoes it)")
        return result_path
    if result_path.exists() and not cfg.overwrite:
        raise RunError(f"{out_dir} already holds a finished run; pass overwrite=true or choose another out_dir=DIR.")
    if int(cfg.batch_size) < 1:
        raise RunError(f"batch_size must be >= 1, got {cfg.batch_size}.")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    seed_everything(int(cfg.seed))
    device = resolve_device(str(cfg.device))
    task = build_task(cfg.task)  # lmms-eval benchmarks: every local dataset is checked here
    benchmarks = isinstance(task, LmmsBenchmarks)
    auto_layers = calibration.wants_calibration(cfg.method)
    if auto_layers and benchmarks:
        raise RunError(
            "method.layers=auto calibrates on the shapes val split; run it with task=shapes, then pass the "
            "chosen layers (result.json method.lazy_layers) as method.layers=[...] here."
        )
    if not auto_layers:
        build_method(cfg.method)  # bad method settings fail before the model loads

    loaded = load_model(cfg.model, device)
    model = loaded.model.to(device)
    method_cfg, calibrated = calibration.resolve(cfg, loaded, task, device) if auto_layers else (cfg.method, None)
    method = build_method(method_cfg)
    lazy_layers = lazy_layers_of(method, loaded.n_layers)  # validates the layer list for this model

    samples = [] if benchmarks else task.samples(cfg.limit)
    log = SampleLog(out_dir, run_key(cfg))
    earlier = log.finished()
    rows: list[dict] = []
    variants = [("method", method)]
    if cfg.compare_dense and method.name != "dense":
        variants.insert(0, ("dense", None))
    scores = {}
    lmms_results = {}  # lmms-eval's own summary per variant, when task.backend=lmms_eval
    turns_of = {key: row.get("turns") for key, row in earlier.items()}
    first_prompt = None  # lmms-eval benchmarks: efficiency is timed on their first request
    for variant, m in variants:
        if benchmarks:
            from harness.lmms.backend import evaluate_benchmarks

            bench = evaluate_benchmarks(
                task, loaded, m or Dense(), cfg.limit, int(cfg.batch_size), device, out_dir / "lmms_eval" / variant
            )
            scores[variant], lmms_results[variant] = bench.scores, bench.summary
            rows.extend({"variant": variant, **row} for row in bench.rows)
            first_prompt = first_prompt or bench.first_prompt
            continue
        done = {sid: row["prediction"] for (v, sid), row in earlier.items() if v == variant}

        def record(sample, prediction, turns, variant=variant):
            turns_of[(variant, sample.id)] = turns
            log.append(_sample_row(variant, task, sample, prediction, turns))

        if task.backend == "lmms_eval":
            from harness.lmms.backend import evaluate_shapes

            predictions, scores[variant], lmms_results[variant] = evaluate_shapes(
                task, loaded, m or Dense(), samples, int(cfg.batch_size), device, out_dir / "lmms_eval" / variant
            )
            for sample, prediction in zip(samples, predictions):
                record(sample, prediction, [prediction])
        else:
            ctx = m.apply(model) if m is not None else contextlib.nullcontext()
            with ctx:
                predictions = evaluate(
                    model, loaded.processor, task, samples, int(cfg.batch_size), device, on_sample=record, done=done
                )
            scores[variant] = task.score(samples, predictions)
        for sample, prediction in zip(samples, predictions):
            rows.append(_sample_row(variant, task, sample, prediction, turns_of.get((variant, sample.id))))

    efficiency = None
    if cfg.efficiency.enabled and benchmarks and first_prompt is None:
        raise RunError("efficiency needs a prompt, but lmms-eval asked no question (empty benchmarks?).")
    if cfg.efficiency.enabled:
        n = int(cfg.efficiency.batch_size)
        if benchmarks:
            history, images = first_prompt
            inputs = prompt_inputs(loaded.processor, [history] * n, list(images) * n, device, loaded.model.dtype)
        else:
            inputs = efficiency_inputs(loaded, task, samples[0], n, device)
        efficiency = measure.compare(
            model,
            inputs,
            lambda: method.apply(model),
            new_tokens=int(cfg.efficiency.new_tokens),
            repeats=int(cfg.efficiency.repeats),
            warmup=int(cfg.efficiency.warmup),
        )

    result = {
        "schema_version": SCHEMA_VERSION,
        "exp": cfg.name,
        "model": {"name": loaded.name, "n_layers": loaded.n_layers, "n_params": loaded.n_params},
        "method": {"name": method.name, "params": method.params(), "lazy_layers": lazy_layers,
                   "calibration": calibrated},
        "tasks": scores["method"] if benchmarks else {task.name: scores["method"]},
        "efficiency": efficiency,
        "env": env_info(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if "dense" in scores:
        result["tasks_dense"] = scores["dense"] if benchmarks else {task.name: scores["dense"]}
    if lmms_results:
        from importlib.metadata import version

        result["lmms_eval"] = {"version": version("lmms_eval"), **lmms_results}
    images = {}
    if calibrated:
        images["layer_divergence"] = figures.layer_divergence_png(
            calibrated["adjacent_js"], lazy_layers, out_dir / "layer_divergence.png", f"{loaded.name}: {task.name} val"
        )
    write_json_atomic(result_path, result)
    log.finish(rows)
    _print_summary(result)
    try:
        tracking.log_run(result, rows, OmegaConf.to_container(cfg.wandb, resolve=True), out_dir, cfg.name, images)
    except Exception as err:  # the result is on disk already; W&B is a copy
        print(f"W&B logging failed ({type(err).__name__}: {err}); {result_path} is complete.", file=sys.stderr)
    return result_path


def _sample_row(variant, task, sample, prediction, turns) -> dict:
    return {
        "variant": variant,
        "id": sample.id,
        "qtype": sample.qtype,
        "questions": sample.questions,
        "answers": sample.answers,
        "turns": turns,
        "prediction": prediction,
        **task.score_sample(sample, prediction),
    }


def _print_summary(result: dict) -> None:
    for name, scores in result["tasks"].items():
        dense = result.get("tasks_dense", {}).get(name, {})
        print(f"task {name}: n={scores['n']}")
        for key, value in scores.items():
            if isinstance(value, dict):
                metric = "f1" if "f1" in value else "acc"
                d = dense.get(key, {}).get(metric)
                print(f"  {key:<10} {metric}: method {value[metric]:.3f}" + (f"  dense {d:.3f}" if d is not None else ""))
        for key, value in scores.items():  # acc for shapes; lmms-eval's own metric names for benchmarks
            if key == "n" or isinstance(value, dict) or not isinstance(value, (int, float)):
                continue
            d = dense.get(key)
            label = "all" if key == "acc" else ""
            print(f"  {label:<10} {key}: method {value:.3f}" + (f"  dense {d:.3f}" if d is not None else ""))
    eff = result["efficiency"]
    if eff:
        for variant in ("dense", "method"):
            e = eff[variant]
            print(
                f"{variant:<6} kv_cache_bytes={e['kv_cache_bytes']} prefill_ms={e['prefill_ms']:.1f} "
                f"decode_tokens_per_s={e['decode_tokens_per_s']:.1f}"
            )
        print(f"kv_reduction={eff['kv_reduction']:.4f} decode_speedup={eff['decode_speedup']:.3f} ({eff['device']})")
