"""W&B logging: each run's result (the same dict as result.json, its ``headline/*`` keys, a
per-type scores table and a samples table) and, at the end of a sweep (Hydra multirun), a summary
run with a table of its points and W&B's own accuracy-vs-KV-cut and throughput-vs-KV-cut charts,
one per model.

Nothing depends on W&B to be read back: result.json is written first, and a W&B failure is
reported without touching it. The mode is offline by default (no account needed); offline runs
stay in ``<dir>/wandb/offline-run-*`` for ``wandb sync``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MODES = ("offline", "disabled", "online")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def _start(wandb_cfg: dict, **init):
    """A W&B run for ``wandb_cfg`` (project, entity, group, mode), or None when disabled."""
    mode = wandb_cfg.get("mode", "offline")
    if mode not in MODES:
        raise ValueError(f"wandb.mode must be one of {MODES}, got {mode!r}.")
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    return wandb.init(
        project=wandb_cfg.get("project"), entity=wandb_cfg.get("entity"), group=wandb_cfg.get("group"),
        mode=mode, reinit="finish_previous", **init,
    )


def headline(result: dict) -> dict[str, Any]:
    """The same keys in every run, whatever the method or task, for cross-run charts:
    ``headline/<key>`` for every key of ``harness.headline.KEYS`` (result.json's ``headline``,
    the numbers the console and the tables show), plus model, method, label and task."""
    from harness import headline as hl

    head = result["headline"]  # the run's own (log_run logs a run as it finishes)
    out = {f"headline/{key}": head.get(key) for key in hl.KEYS}
    out.update({
        "headline/task": head.get("task") or next(iter(result["tasks"]), None),
        "headline/method": result["method"]["name"],
        "headline/label": result["method"].get("label"),
        "headline/model": result["model"]["name"],
    })
    return out


SCORE_COLUMNS = ["task", "type", "metric", "score", "ci95_lo", "ci95_hi", "dense", "delta", "delta_lo", "delta_hi",
                 "dense_below_floor"]


def score_rows(result: dict) -> list[list]:
    """One row per task and group (question type; and ``all``): the score by the metric the task declares
    for it, with its 95 % interval, dense's score, the paired change and its interval, and whether dense is
    below the floor there."""
    from harness import metrics

    flagged = set((result.get("headline") or {}).get("dense_below_floor") or [])
    tasks_flagged = set(result.get("dense_below_floor_tasks") or [])
    rows = []
    for task, scores in result["tasks"].items():
        dense = (result.get("tasks_dense") or {}).get(task) or {}
        declared = metrics.of_result(result, task)
        entries = [(k, v) for k, v in scores.items() if isinstance(v, dict)] + [("all", scores)]
        for key, value in entries:
            judged = declared.judged_by(value)  # the metric the task declares for it (harness.metrics)
            if judged is None:
                continue
            metric = judged.name
            ci = value.get(f"{metric}_ci95") or [None, None]
            d = dense if key == "all" else dense.get(key) or {}
            dci = value.get("delta_ci95") or [None, None]
            rows.append([task, key, metric, value[metric], ci[0], ci[1], d.get(metric), value.get("delta"),
                         dci[0], dci[1], key in flagged or (key == "all" and task in tasks_flagged)])
    return rows


def log_report(files: list[Path], tables: dict[str, tuple[list[str], list[list[str]]]], wandb_cfg: dict) -> None:
    """Log rendered paper figures (PNG) and tables to one W&B run of job type ``report``."""
    run = _start(wandb_cfg, job_type="report", dir=wandb_cfg.get("dir"), name="paper-report")
    if run is None:
        return
    import wandb

    try:
        for path in files:
            if path.suffix == ".png":
                run.log({f"figures/{path.stem}": wandb.Image(str(path))})
        for name, (header, rows) in tables.items():
            run.log({f"tables/{name}": wandb.Table(columns=header, data=rows)})
    finally:
        run.finish()


def log_run(
    result: dict, samples: list[dict], wandb_cfg: dict, out_dir: Path, name: str, images: dict | None = None
) -> str | None:
    """Log to W&B; return the run's local directory (None when disabled). The run is named by its
    table label (``name`` only when there is none), so a sweep's points are told apart, and tagged
    with model, method, task, split, limit and multi-turn protocol, so one comparison can be
    filtered together across sweeps."""
    config = result.get("config") or {}
    task = config.get("task") or {}
    tags = list(wandb_cfg.get("tags") or []) + [
        f"model:{result['model']['name']}",
        f"method:{result['method']['name']}",
        *(f"task:{t}" for t in result["tasks"]),
        f"split:{task.get('split')}",
        f"limit:{config.get('limit')}",
        f"multiturn:{task.get('multiturn')}",
    ]
    label = result["method"].get("label") or name
    run = _start(wandb_cfg, dir=str(out_dir), name=label, tags=tags, config=result["config"])
    if run is None:
        return None
    import wandb

    try:
        run.summary.update(flatten({k: v for k, v in result.items() if k != "config"}))
        run.summary.update(headline(result))
        run.log({"scores": wandb.Table(columns=SCORE_COLUMNS, data=score_rows(result))})
        if samples:
            columns = list(samples[0])
            table = wandb.Table(columns=columns, data=[[str(row.get(c)) for c in columns] for row in samples])
            run.log({"samples": table})
        for key, path in (images or {}).items():
            run.log({key: wandb.Image(str(path))})
        return run.dir
    finally:
        run.finish()


def log_bench(result: dict, wandb_cfg: dict, out_dir: Path, name: str) -> str | None:
    """Log an efficiency benchmark (harness.bench) to W&B: config, the budget section and
    per-point ratios as summary keys, and every row as a table."""
    device = result["device"]
    tags = list(wandb_cfg.get("tags") or []) + ["bench", f"model:{result['model']['name']}", f"device:{device['name']}"]
    run = _start(wandb_cfg, dir=str(out_dir), name=name, tags=tags, config=result["config"])
    if run is None:
        return None
    import wandb

    try:
        summary = {"device": device, "model": result["model"], "env": result["env"]}
        budget = result.get("budget") or {}
        if budget.get("complete"):
            summary["budget"] = {"bytes": budget["bytes"], **{e["label"]: e for e in budget["entries"]}}
        run.summary.update(flatten(summary))
        rows = [flatten(r) for r in result["rows"]]
        if rows:
            columns = list(rows[0])
            run.log({"bench": wandb.Table(columns=columns, data=[[str(r.get(c)) for c in columns] for r in rows])})
        return run.dir
    finally:
        run.finish()


SWEEP_COLUMNS = ["model", "seed", "label", "method", "n", "limit", "multiturn", "acc_mean_types",
                 "acc_mean_types_capable", "dense_below_floor", "acc_samples", "delta_score", "kv_cut_workload",
                 "kv_cut_timing_batch", "decode_speedup_timing_batch", "decode_tokens_per_s_timing_batch",
                 "timing_noisy",
                 "dense_task_below_floor", "path"]


def _scatter(wandb, rows: list[dict], x: str, y: str, title: str):
    """W&B's own scatter chart of ``y`` against ``x`` over ``rows`` (points without both left out)."""
    columns = ["label", x, y]
    data = [[r["label"], r[x], r[y]] for r in rows if r.get(x) is not None and r.get(y) is not None]
    return wandb.plot.scatter(wandb.Table(columns=columns, data=data), x, y, title=title) if data else None


def log_sweep(points: list[dict], wandb_cfg: dict, sweep_dir: Path, name: str) -> str | None:
    """Log a sweep's summary run (job type ``sweep-summary``): the table ``sweep/points`` (one row per
    point, ``SWEEP_COLUMNS``) and, per model, W&B scatter charts of acc_mean_types and
    acc_mean_types_capable against kv_cut_workload, and of decode_speedup_timing_batch against
    kv_cut_timing_batch (each chart names the keys it plots). Returns the run's local directory."""
    models = sorted({p["model"] for p in points})
    tags = list(wandb_cfg.get("tags") or []) + ["sweep-summary", *(f"model:{m}" for m in models)]
    run = _start(wandb_cfg, dir=str(sweep_dir), name=f"sweep {name}", tags=tags, job_type="sweep-summary",
                 config={"sweep_dir": str(sweep_dir), "models": models})
    if run is None:
        return None
    import wandb

    try:
        run.log({"sweep/points": wandb.Table(columns=SWEEP_COLUMNS, data=[[p.get(c) for c in SWEEP_COLUMNS]
                                                                          for p in points])})
        charts = {}
        for model in models:
            mine = [p for p in points if p["model"] == model]
            for x, y, what in (("kv_cut_workload", "acc_mean_types", "accuracy"),
                               ("kv_cut_workload", "acc_mean_types_capable", "accuracy"),
                               ("kv_cut_timing_batch", "decode_speedup_timing_batch", "throughput")):
                chart = _scatter(wandb, mine, x, y, f"{model}: {y} vs {x} ({what})")
                if chart is not None:
                    charts[f"charts/{model}/{y}_vs_{x}"] = chart
        if charts:
            run.log(charts)
        run.summary.update({"sweep/n_points": len(points), "sweep/models": models})
        return run.dir
    finally:
        run.finish()
