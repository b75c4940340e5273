"""The summary of a sweep (Hydra multirun), made when its last point ends: one row per point with
its headline numbers (``harness.headline``, paired with a dense point of the same protocol as the
tables pair them), printed as a table and logged to W&B as a summary run with charts
(``harness.tracking.log_sweep``).

``conf/config.yaml`` installs ``SweepSummary`` as a Hydra callback, so every ``python -m harness
-m ...`` ends with it; ``python -m harness.sweep DIR`` makes it again for a finished sweep folder.
Dense baselines are looked for in the sweep folder and in its sibling sweep folders (the layout of
``make sweeps`` and of the default ``sweep_root``: ``<root>/<sweep>/<point>/result.json``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from harness import results
from harness.tracking import SWEEP_COLUMNS as COLUMNS
SHOWN = ["model", "label", "n", "acc_mean_types", "acc_mean_types_capable", "delta_score", "kv_cut_workload",
         "kv_cut_timing_batch", "decode_speedup_timing_batch", "timing_noisy"]


def points(sweep_dir: Path) -> list[dict]:
    """One row (``COLUMNS``) per point under ``sweep_dir``, in the tables' order."""
    from harness import report

    sweep_dir = Path(sweep_dir)
    mine = report.collect(sweep_dir)
    seen = {Path(r["_path"]).resolve() for r in mine}
    baselines = []
    for pattern in ("*/result.json", "*/*/result.json"):
        for path in sorted(sweep_dir.resolve().parent.glob(pattern)):
            if path.resolve() not in seen:
                other = results.load(path)
                if report.is_dense(other):
                    baselines.append(other)
    every = mine + baselines
    out = []
    for r in report.newest_per_label(mine):
        head = report.headline_of(r, every)
        proto = report.protocol(r)
        out.append({
            "model": r["model"]["name"], "seed": proto["seed"], "label": report.label(r),
            "method": r["method"]["name"], "n": r["tasks"][next(iter(r["tasks"]))].get("n"), "limit": proto["limit"],
            "multiturn": proto["task"].get("multiturn"),
            **{k: head.get(k) for k in COLUMNS if k in head},
            "dense_below_floor": None if head.get("dense_below_floor") is None
            else ", ".join(head["dense_below_floor"]) or "none",
            "path": str(Path(r["_path"]).parent),
        })
    return out


def table(rows: list[dict], columns=SHOWN) -> str:
    """``rows`` as a Markdown table of ``columns`` (fractions with 4 digits)."""
    from harness.report import markdown

    def cell(v):
        return "–" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    return markdown(columns, [[cell(r.get(c)) for c in columns] for r in rows])


def summarize(sweep_dir: Path, wandb_cfg: dict, name: str) -> list[dict]:
    """Print the sweep's table and log its W&B summary run; the rows."""
    from harness import tracking

    rows = points(sweep_dir)
    print(f"sweep summary: {len(rows)} point(s) in {sweep_dir} (headline keys: docs/results.md#headline-numbers)")
    print(table(rows), end="")
    where = tracking.log_sweep(rows, wandb_cfg, Path(sweep_dir), name)
    if where:
        print(f"W&B sweep summary run: {Path(where).parent} (wandb sync it; wandb leet inspect --summary --json DIR)")
    return rows


def remove_stray_submitit_folder(sweep_dir: Path) -> None:
    """submitit makes its folder setting literally (``.submitit/%j``) before it puts job ids in the
    name; the jobs' logs go to ``.submitit/<job id>``, so the literal one stays empty: removed."""
    stray = Path(sweep_dir) / ".submitit" / "%j"
    if stray.is_dir() and not any(stray.iterdir()):
        stray.rmdir()


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, ``summarize`` its sweep folder. A failure is one
    line on stderr: the points' results are on disk already."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from omegaconf import OmegaConf

        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            remove_stray_submitit_folder(sweep_dir)
            if not any(sweep_dir.rglob("result.json")):
                return
            wandb_cfg = OmegaConf.to_container(config.wandb, resolve=True)
            summarize(sweep_dir, wandb_cfg, str(config.get("name") or sweep_dir.name))
        except Exception as err:  # noqa: BLE001 - the summary is a copy of what is on disk
            print(f"sweep summary failed ({type(err).__name__}: {err}); the points' result.json files are complete.",
                  file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness.sweep", description="Summarize a finished sweep folder: a table and a W&B summary run.")
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--wandb", default=os.environ.get("WANDB_MODE", "offline"), help="offline | online | disabled")
    p.add_argument("--wandb-project", default="lazyattn-harness")
    p.add_argument("--wandb-group", default=None)
    return p


def main(argv=None) -> None:
    a = parser().parse_args(argv)
    try:
        summarize(a.sweep_dir, {"mode": a.wandb, "project": a.wandb_project, "group": a.wandb_group},
                  a.sweep_dir.name)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
