"""``python -m harness.report WHAT``: render tables and figures, or compare two methods (``versus``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from harness import longform
from harness.report.index import NothingToRender, collect, versus
from harness.report.tables import (
    benchmark_table, calibration_table, efficiency_table, longform_points, main_table, paper_table, protocol_table,
)
from harness.report.render import write_table
from harness.report.plots import fidelity_figure, layers_figure, longform_figure, pareto_figure


WHAT = ["main", "protocol", "efficiency", "calibration", "layers", "pareto", "fidelity", "longform", "tasks", "paper"]


# Every table's maker (results -> header, rows), by name
TABLES = {"main": main_table, "protocol": protocol_table, "efficiency": efficiency_table,
          "calibration": calibration_table, "tasks": benchmark_table, "paper": paper_table}


def render(what: str, results_dir: Path, out: Path) -> list[Path]:
    """Write ``what`` (one of ``WHAT``, or ``all``) from the results under ``results_dir``. A table or
    figure the results cannot fill is refused (``NothingToRender``, one line: what they hold and what
    renders it), never written empty; ``all`` writes every one that can be filled, names the others
    on stderr, and is refused only when none can."""
    results = collect(results_dir)
    held = sorted({name for r in results for name in r["tasks"]})
    makers = TABLES

    def table(name: str) -> list[Path]:
        header, rows = makers[name](results)
        if not rows:
            raise NothingToRender(
                f"the {name} table has nothing to show from {results_dir} (its results hold the tasks "
                f"{', '.join(held)}; the main, protocol, efficiency and calibration tables show task=shapes "
                "results): python -m harness.report tasks renders any task's.")
        return write_table(name, header, rows, out, str(results_dir))

    def longform_files() -> list[Path]:
        points = longform_points(results)
        if not points:
            raise NothingToRender("no carried-cache point with dialogue or long samples and a dense of its protocol.")
        return [*write_table("longform", *longform.table(points), out, str(results_dir)), longform_figure(results, out)]

    steps = {name: (lambda name=name: table(name)) for name in makers}
    steps |= {"layers": lambda: [layers_figure(results, out)], "pareto": lambda: [pareto_figure(results, out)],
              "fidelity": lambda: [fidelity_figure(results, out)], "longform": longform_files}
    written: list[Path] = []
    skipped = []
    for name in WHAT:
        if what not in (name, "all"):
            continue
        try:
            written += steps[name]()
        except NothingToRender as err:
            if what != "all":
                raise
            skipped.append(f"{name} ({err})")
    for note in skipped:
        print(f"note: report all leaves out {note}", file=sys.stderr)
    if what == "all" and not written:
        raise NothingToRender(f"nothing under {results_dir} can be rendered (its results hold the tasks {', '.join(held)}).")
    return written


def main(argv=None) -> None:
    a = parser().parse_intermixed_args(argv)
    _main(a)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness.report", description="Render paper tables and figures from result.json files.")
    p.add_argument("what", choices=[*WHAT, "all", "versus"])
    p.add_argument("labels", nargs="*", help="versus: the two table labels to compare, A then B (A - B)")
    p.add_argument("--qtype", default=None, help="versus: compare on the samples of this question type only")
    p.add_argument("--results", type=Path, default=Path("results/tiny"))
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--wandb", default=os.environ.get("WANDB_MODE", "disabled"),
                   help="log the figures and tables to W&B: offline | online | disabled (default: $WANDB_MODE or disabled)")
    p.add_argument("--wandb-project", default="lazyattn-harness")
    return p


def _main(a) -> None:
    if a.what == "versus":
        if len(a.labels) != 2:
            raise SystemExit("error: versus takes two table labels, e.g. versus 'Lazy QKV r=0.25 (calibrated)' "
                             "'Lazy r=0.5 (calibrated)'.")
        try:
            d = versus(collect(a.results), *a.labels, qtype=a.qtype)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"error: {err}") from None
        lo, hi = d["delta_ci95"]
        verdict = "the interval excludes 0" if lo > 0 or hi < 0 else "the interval includes 0: no difference shown"
        on = f", {a.qtype} only" if a.qtype else ""
        print(f"{a.labels[0]} - {a.labels[1]}: {100 * d['delta']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}] "
              f"(paired, n={d['n']}{on}; {verdict})")
        return
    try:
        written = render(a.what, a.results, a.out)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    for path in written:
        print(path)
    if a.wandb != "disabled":
        from harness import tracking

        results = collect(a.results)
        rendered = {path.stem for path in written if path.suffix == ".md"}
        made = {name: make(results) for name, make in TABLES.items() if name in rendered}
        tracking.log_report(written, made, {"mode": a.wandb, "project": a.wandb_project, "group": "report",
                                              "dir": str(a.out)})


if __name__ == "__main__":
    main()
