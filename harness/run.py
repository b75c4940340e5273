"""One experiment, end to end, along one path:

    check settings -> build the task (its data checked) -> load the model -> resolve the method
    -> for each variant (dense, then the method): task.evaluate -> measure efficiency
    -> write result.json and samples.jsonl -> log to W&B

Every task implements the protocol of ``harness.tasks``; every method is a ``lazyattn`` method
built from its ``conf/method`` preset by ``lazyattn.build``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

import lazyattn
from harness import compare, figures, headline, measure, metrics, tracking
from harness.config import plain, result_key
from harness.device import setup
from harness.folders import PREEXISTING, output_dir, relative_to_repo, skips_finished, writable_dir
from harness.settings import RunError, check_dtype, check_run
from harness.generate import prompt_inputs
from harness.method import RunMethod
from harness.metrics import Metrics
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


def build_task(cfg: DictConfig):
    """The task a ``task=`` preset names (``harness.tasks.TASKS``, by its ``name``), checked before any model loads."""
    task = tasks.build(cfg)
    task.check()
    return task


def record_against_dense(rows: dict[str, list[dict]], scores: dict, declared: dict[str, Metrics], processor) -> dict:
    """What result.json says of the method against dense on the same samples (``compare.against_dense``,
    each task by the metrics it declares): returns the top-level keys, the workload KV cache
    (``kv_workload``) and, when dense was scored too, ``fidelity`` to dense's outputs (token by token,
    overall and per group: the one task's declared group, or per task when a run scores several);
    writes each method row's own ``fidelity`` into it (samples.jsonl) and the paired differences with
    their 95 % intervals into the task's scores (``delta``, ``delta_ci95``: overall and per group)."""
    method, dense = rows["method"], rows.get("dense")
    out = {"kv_workload": compare.kv_workload(method, dense)}
    if not dense:
        return out
    first = next(iter(scores), None)
    one = declared.get(first) if len(scores) == 1 else None
    group = (one.group if one else None) or ("task" if method and "task" in method[0] else None)
    tokenizer = getattr(processor, "tokenizer", processor)
    versus = compare.against_dense(method, dense, one or metrics.ACCURACY, group=group,
                                   tokenize=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])
    out["fidelity"] = versus["fidelity"]
    for row, fid in versus["per_sample"]:
        row["fidelity"] = fid
    for name, task_scores in scores.items():
        def of_task(variant_rows, name=name):
            return [r for r in variant_rows if r.get("task", first) == name]

        task_group = declared[name].group if one else None
        for key, delta in compare.deltas(of_task(method), of_task(dense), declared[name], task_group).items():
            target = task_scores if key == "all" else task_scores.get(key)
            if isinstance(target, dict):
                target.update({"delta": delta["delta"], "delta_ci95": delta["delta_ci95"]})
    return out


def samples_scored(limit: int | None, task) -> str:
    """The console's n: what will be scored and why (the limit, the whole set, the task's default)."""
    sizes = task.sizes()
    if sizes:
        each = [f"{name} {size if limit is None else min(limit, size)}" for name, size in sizes.items()]
        n = ", ".join(each) if len(sizes) > 1 else each[0].rsplit(" ", 1)[1]
        if limit is None:
            return f"n={n} (every row)"
        return f"n={n} (limit={limit}{' or fewer rows' if any(size < limit for size in sizes.values()) else ''})"
    if limit is not None:
        return f"n={limit} (limit)"
    if task.n is not None:  # the shapes sets' task.n; the lmms-eval benchmarks have none
        return f"n={task.n} (task.n, the task's default)"
    return "n=every sample (no limit)"


def limit_notes(limit: int | None, task) -> list[str]:
    """One line for each set a limit exceeds: it scores fewer samples than asked, said before the run."""
    if limit is None:
        return []
    return [f"note: limit={limit} exceeds the {size} row(s) of {name}: {size} will be scored"
            for name, size in (task.sizes() or {}).items() if size < limit]


def describe_run(cfg: DictConfig, loaded, method_info: dict, method, task) -> list[str]:
    """The console's first lines: model, method label and schedule, task, n and protocol."""
    weights = "RANDOM weights" if loaded.random_weights else "trained weights"
    t = cfg.task
    qtypes = list(t.get("qtypes") or [])
    protocol = [f"split={t.get('split')}"] if t.get("split") else []
    if qtypes:
        protocol.append(f"{len(qtypes)} question types ({', '.join(qtypes)})")
    if t.get("lmms_tasks"):
        protocol.append(f"lmms-eval tasks {', '.join(t.lmms_tasks)}")
    if t.get("multiturn"):
        protocol.append(f"multiturn={t.multiturn}")
    if t.get("min_new_tokens"):
        protocol.append(f"min_new_tokens={t.min_new_tokens}")
    protocol.append(f"seed={cfg.seed}")
    dense = ("dense scored beside it on the same samples" if cfg.compare_dense and method.name != "dense"
             else "no dense in this run")
    return [
        f"model: {loaded.name} ({loaded.n_layers} layers, {loaded.n_params / 1e6:.2f} M parameters, "
        f"{str(loaded.model.dtype).removeprefix('torch.')}, {weights})",
        f"method: {method_info['label']} [{method.name}]: {method.plan(loaded.n_layers).schedule}",
        f"task: {t.name}, {samples_scored(cfg.limit, task)}; {'; '.join(protocol)}; {dense}",
    ]


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
    task = build_task(cfg.task)
    # bad method settings, and a family the method is not defined for, fail before the model loads
    chosen = RunMethod.from_config(cfg.method, cfg.model)
    if chosen.auto:
        task.calibration_prompts(0)  # a task that cannot calibrate says so before the model loads too
    for line in limit_notes(cfg.limit, task):
        print(line, flush=True)
    device = setup(cfg)

    loaded = load_model(cfg.model, device)  # says so on stderr when the weights are random
    # its auto settings chosen, then built, once; its plan validated for this model's depth
    method, method_info = chosen.resolve(cfg, loaded, task, device)
    calibrated = method_info["calibration"]
    for line in describe_run(cfg, loaded, method_info, method, task):
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
    comparison = record_against_dense(rows, evaluations["method"].scores, declared, loaded.processor)
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
    print_summary(result)
    try:
        tracking.log_run(result, rows, plain(cfg.wandb), out_dir, cfg.name, images)
    except Exception as err:  # the result is on disk already; W&B is a copy
        print(f"W&B logging failed ({type(err).__name__}: {err}); {result_path} is complete.", file=sys.stderr)
    return result_path


def _ci(interval) -> str:
    return f"[{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, list):
        return "[" + ", ".join(_num(v, digits) for v in value) + "]"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_summary(result: dict) -> None:
    head = result.get("headline") or {}
    flagged = set(head.get("dense_below_floor") or [])
    tasks_flagged = set(result.get("dense_below_floor_tasks") or [])
    for name, scores in result["tasks"].items():
        dense = result.get("tasks_dense", {}).get(name, {})
        declared = metrics.of_result(result, name)
        print(f"task {name}: n={scores['n']}")
        entries = [(k, v) for k, v in scores.items() if isinstance(v, dict)] + [("all", scores)]
        for key, value in entries:
            judged = declared.judged_by(value)
            metric = judged.name if judged is not None and judged.per_sample else None
            if metric is None:  # a scorer's own aggregates (lmms-eval's POPE, captions): every number it gave
                numbers = {k: v for k, v in value.items() if isinstance(v, (int, float)) and k != "n"}
                print(f"  {key:<10} " + " ".join(f"{k}={v:.3f}" for k, v in numbers.items()))
                continue
            shown = "all (over samples)" if key == "all" else key
            line = f"  {shown:<10} {metric}: method {value[metric]:.3f} {_ci(value.get(metric + '_ci95'))}"
            d = dense.get(metric) if key == "all" else dense.get(key, {}).get(metric)
            if d is not None:
                line += f"  dense {d:.3f}"
            if value.get("delta") is not None:
                line += f"  delta {value['delta']:+.3f} {_ci(value['delta_ci95'])}"
            if key in flagged and name == head.get("task"):
                line += (f"  † dense below {headline.DENSE_FLOOR:.0%}: a type dense cannot do "
                         "(left out of acc_mean_types_capable)")
            if key == "all" and name in tasks_flagged:
                line += (f"  † dense below {headline.DENSE_FLOOR:.0%} on the whole task: one dense cannot do, "
                         "so the delta says nothing about the method")
            print(line)
    for name, scores in result["tasks"].items():
        if "agreement" in scores:  # VLMEvalKit's verdicts beside the harness's own scorer (the shapes sets)
            print(f"task {name}: VLMEvalKit's scoring and the harness's agree on {scores['agreement']:.1%} of samples "
                  f"(harness acc {scores['acc_harness']:.3f})")
    if result.get("fidelity"):
        f = result["fidelity"]
        print(f"fidelity to dense: exact {f['exact_match']:.3f}, prefix agreement {f['prefix_agreement']:.3f}, "
              f"first divergence (median token) {f['first_divergence_median']}")
    if result.get("kv_workload"):
        k = result["kv_workload"]
        line = f"KV, workload (the scored samples, every turn): method {k['method_bytes_mean']:.0f} bytes per sample"
        if k["reduction"] is not None:
            line += f", dense {k['dense_bytes_mean']:.0f}: kv_cut_workload={k['reduction']:.4f}"
        print(line)
    eff = result["efficiency"]
    if eff:
        print(f"timing batch (one synthetic batch: the first prompt x{eff.get('batch_size')}, "
              f"{eff.get('prompt_tokens')} prompt tokens, {eff.get('new_tokens')} new; {eff['device']}; "
              "medians ± IQR, dense and method interleaved):")
        for variant in ("dense", "method"):
            e = eff[variant]
            mem = e.get("peak_memory_bytes")
            print(
                f"  {variant:<6} kv_cache_bytes={e['kv_cache_bytes']} peak_memory_bytes={mem} "
                f"prefill_ms={e['prefill_ms']:.1f}±{e.get('prefill_ms_iqr', 0):.1f} "
                f"decode_tokens_per_s={e['decode_tokens_per_s']:.1f}±{e.get('decode_tokens_per_s_iqr', 0):.1f} "
                f"e2e_tokens_per_s={e.get('e2e_tokens_per_s', float('nan')):.1f}"
            )
        print(
            f"  kv_cut_timing_batch={eff['kv_reduction']:.4f} decode_speedup={eff['decode_speedup']:.3f} "
            f"e2e_speedup={eff.get('e2e_speedup', float('nan')):.3f} prefill_speedup={eff['prefill_speedup']:.3f} "
            "(method over dense, higher is better)"
        )
        if eff.get("predicted_decode_speedup"):
            print(
                f"  predicted decode speed-up from bytes per step (weights touched + KV read; {eff.get('cache', 'dynamic')} "
                f"cache): x{eff['predicted_decode_speedup']:.3f}; achieved {eff['decode_speedup_of_predicted']:.0%} of it"
            )
        if eff.get("host_sync"):
            print(f"  note: {eff['host_sync']}")
        if eff.get("noisy"):
            print(f"  warning: timing is noise ({eff['noise']}): these speed-ups are no finding; time on a quiet "
                  "machine or with more efficiency.repeats")
        elif min(eff["dense"].get("repeats", 1), eff["method"].get("repeats", 1)) < 2:
            print("  note: one timed repeat: the speed-ups carry no spread, so their noise cannot be judged "
                  "(efficiency.repeats=3 or more)")
    if head:
        print(f"headline ({head.get('task')}; result.json 'headline', W&B 'headline/*', the tables; "
              "docs/results.md#headline-numbers):")
        keys = [k for k in headline.KEYS if head.get(k) is not None and k != "timing_noise"]  # said above
        for i in range(0, len(keys), 4):
            print("  " + "  ".join(f"{k}={_num(head[k])}" for k in keys[i:i + 4]))
