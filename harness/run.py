"""One experiment, end to end, along one path:

    check settings -> build the task (its data checked) -> load the model -> resolve the method
    -> for each variant (dense, then the method): task.evaluate -> measure efficiency
    -> write result.json and samples.jsonl -> log to W&B

Every task implements the protocol of ``harness.tasks``; every method is a ``lazyattn`` method
built from its ``conf/method`` preset by ``lazyattn.build``. What the run says on the console is
``harness.console``'s; what it records of the method against dense, ``harness.compare``'s.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

import lazyattn
from harness import compare, console, figures, headline, measure, metrics, tracking
from harness.config import plain, result_key
from harness.device import setup
from harness.folders import PREEXISTING, output_dir, relative_to_repo, skips_finished, writable_dir
from harness.settings import RunError, check_dtype, check_run
from harness.generate import prompt_inputs
from harness.method import RunMethod
from harness.models import load_model
from harness.results import SCHEMA_VERSION, RunLock, RunLocked, SampleLog, check_unlocked, env_info, write_json_atomic
from harness import tasks


def preflight(cfg: DictConfig, multirun: bool = False) -> None:
    """What can be refused before Hydra writes anything (its ``.hydra`` folder and log go into the
    run's folder): a folder that cannot be written, a finished out_dir, the run-level settings, the
    method's settings and a local checkpoint's files. Each a RunError or ValueError of one line."""
    if multirun:
        writable_dir(Path(str(cfg.sweep_root)), "sweep_root")
        return
    if cfg.get("out_dir"):
        out_dir = Path(str(cfg.out_dir))
        PREEXISTING[str(out_dir)] = out_dir.exists()
        writable_dir(out_dir, "out_dir")
        if (out_dir / "result.json").exists() and not cfg.overwrite and not cfg.get("skip_finished"):
            raise RunError(f"{out_dir} already holds a finished run; pass overwrite=true or choose another out_dir=DIR.")
        try:  # a live run in this folder: refused before Hydra writes its .hydra/ over the other's
            check_unlocked(out_dir)
        except RunLocked as err:
            raise RunError(str(err)) from None
    else:
        writable_dir(Path(str(cfg.runs_root)), "runs_root")
    check_run(cfg)
    if str(cfg.model.get("kind")) == "hf":  # the checkpoint first: check_dtype reads its config.json
        from harness.models.local import check_checkpoint

        check_checkpoint(cfg.model.get("path"), cfg.model.get("model_type"))
    check_dtype(cfg)
    RunMethod.from_config(cfg.method, cfg.model)


def run(cfg: DictConfig) -> Path:
    out_dir = output_dir(cfg)
    result_path = out_dir / "result.json"
    if result_path.exists() and skips_finished(cfg):
        why = "skip_finished=true" if cfg.get("skip_finished") else "a sweep skips its finished points"
        print(f"skipping finished point {out_dir} ({why}; overwrite=true redoes it)")
        return result_path
    if result_path.exists() and not cfg.overwrite:
        raise RunError(f"{out_dir} already holds a finished run; pass overwrite=true or choose another out_dir=DIR.")
    lock = RunLock(out_dir)
    try:
        lock.acquire()
    except RunLocked as err:
        raise RunError(str(err)) from None
    if lock.took_over is not None:
        t = lock.took_over
        print(f"took over a stale lock in {out_dir} (host {t.get('host')}, pid {t.get('pid')}, since "
              f"{t.get('since')}: that process is gone)", file=sys.stderr)
    try:  # released however the run ends: finished, refused, interrupted
        return _run(cfg, out_dir, result_path)
    finally:
        lock.release()


def _run(cfg: DictConfig, out_dir: Path, result_path: Path) -> Path:
    check_run(cfg)
    task = tasks.build(cfg.task)
    # bad method settings, and a family the method is not defined for, fail before the model loads
    chosen = RunMethod.from_config(cfg.method, cfg.model)
    if chosen.auto:
        task.calibration_prompts(0)  # a task that cannot calibrate says so before the model loads too
    device = setup(cfg)

    loaded = load_model(cfg.model, device)  # says so on stderr when the weights are random
    # its auto settings chosen, then built, once; its plan validated for this model's depth
    method, method_info = chosen.resolve(cfg, loaded, task, device)
    calibrated = method_info["calibration"]
    for line in console.first_lines(cfg, loaded, method_info, method, task):  # and a note for each limit passed
        print(line, flush=True)

    variants = {"method": method}
    if cfg.compare_dense and method.name != "dense":
        variants = {"dense": lazyattn.Dense(), **variants}
    log = SampleLog(out_dir, result_key(cfg))
    earlier = {v: log.finished(v) for v in variants}  # rows an interrupted run with these settings finished
    if any(earlier.values()):
        print(f"resuming {out_dir}: {sum(map(len, earlier.values()))} finished sample(s) from an interrupted run "
              "are kept")
    evaluations = {}
    for variant, m in variants.items():
        evaluations[variant] = task.evaluate(
            loaded, m, limit=cfg.limit, batch_size=int(cfg.batch_size), device=device,
            work_dir=out_dir / task.work_name / variant, finished=earlier[variant],
            on_row=lambda row, variant=variant: log.append({"variant": variant, **row}),
            cache=str(cfg.cache),
        )
        for row in evaluations[variant].rows:  # the row contract (harness.metrics.ROW), said in one line
            metrics.check_row(row)

    efficiency = None
    if cfg.efficiency.enabled:
        if evaluations["method"].efficiency_prompt is None:
            raise RunError("efficiency needs a prompt, but the task asked no question; pass efficiency.enabled=false.")
        history, images = evaluations["method"].efficiency_prompt
        n = int(cfg.efficiency.batch_size)
        inputs = prompt_inputs(loaded.processor, [history] * n, list(images) * n, device, loaded.model.dtype)
        efficiency = measure.time_against_dense(
            loaded.model, inputs, method, new_tokens=int(cfg.efficiency.new_tokens),
            repeats=int(cfg.efficiency.repeats), warmup=int(cfg.efficiency.warmup),
            cache=str(cfg.cache),
        )

    rows = {v: e.rows for v, e in evaluations.items()}
    declared = {name: task.metrics_for(name) for name in evaluations["method"].scores}
    comparison = compare.record_against_dense(rows, evaluations["method"].scores, declared, loaded.processor)
    result = {
        "schema_version": SCHEMA_VERSION,
        "exp": cfg.name,
        "model": {"name": loaded.name, "n_layers": loaded.n_layers, "n_params": loaded.n_params,
                  "random_weights": loaded.random_weights},
        "method": method_info,
        "headline": None,  # below: harness.headline, the numbers console, W&B and tables share
        "tasks": evaluations["method"].scores,
        "metrics": {name: m.to_json() for name, m in declared.items()},  # each task's declaration (harness.metrics)
        "efficiency": efficiency,
        **comparison,
        "env": env_info(),
        "config": relative_to_repo(plain(cfg)),
    }
    if "dense" in evaluations:
        result["tasks_dense"] = evaluations["dense"].scores
        # every task, not only the headline's: a dataset dense cannot do makes its delta meaningless
        result["dense_below_floor_tasks"] = [name for name, scores in result["tasks_dense"].items()
                                             if declared[name].task_below(scores, headline.DENSE_FLOOR)]
    first_task = next(iter(result["tasks"]), None)

    def of_first(variant_rows):  # the headline is the first task's: a run over several scores each apart
        return None if variant_rows is None else [r for r in variant_rows if r.get("task", first_task) == first_task]

    result["headline"] = {
        "task": first_task,
        **headline.compute(result, of_first(rows["method"]), of_first(rows.get("dense")),
                           (result.get("tasks_dense") or {}).get(first_task)),
    }
    summaries = {v: e.summary for v, e in evaluations.items() if e.summary is not None}
    if summaries:  # a backend's own numbers, under its name, with its version
        from importlib.metadata import version

        key, package = task.summary_key
        result[key] = {"version": version(package), **summaries}
    images = {}
    if calibrated and "adjacent_js" in calibrated:
        images["layer_divergence"] = figures.layer_divergence_png(
            calibrated["adjacent_js"], method_info["lazy_layers"], out_dir / "layer_divergence.png",
            f"{loaded.name}: {task.name} val",
        )
    rows = [{"variant": v, **row} for v, variant_rows in rows.items() for row in variant_rows]
    write_json_atomic(result_path, result)
    log.finish(rows)
    console.print_summary(result)
    try:
        tracking.log_run(result, rows, plain(cfg.wandb), out_dir, cfg.name, images)
    except Exception as err:  # the result is on disk already; W&B is a copy
        print(f"W&B logging failed ({type(err).__name__}: {err}); {result_path} is complete.", file=sys.stderr)
    return result_path
