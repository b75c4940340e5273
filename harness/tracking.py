"""W&B logging of a finished result: the same dict as result.json, plus a samples table.

Nothing depends on W&B to be read back: result.json is written first, and a W&B failure is
reported without touching it. The mode is offline by default (no account needed).
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
    """The same few keys in every run, whatever the method or task, for cross-run charts:
    ``headline/acc`` (first task), ``headline/kv_reduction``, ``headline/decode_speedup``, ..."""
    first = next(iter(result["tasks"].values()), {})
    eff = result.get("efficiency") or {}
    method = eff.get("method") or {}
    return {
        "headline/acc": first.get("acc"),
        "headline/kv_reduction": eff.get("kv_reduction"),
        "headline/decode_speedup": eff.get("decode_speedup"),
        "headline/prefill_speedup": eff.get("prefill_speedup"),
        "headline/kv_cache_bytes": method.get("kv_cache_bytes"),
        "headline/decode_tokens_per_s": method.get("decode_tokens_per_s"),
        "headline/method": result["method"]["name"],
        "headline/model": result["model"]["name"],
    }


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
