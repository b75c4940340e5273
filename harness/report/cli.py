"""``python -m harness.report WHAT``: render tables and figures, or compare two methods (``versus``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from harness import longform
from harness.report.index import collect, versus
from harness.report.tables import calibration_table, efficiency_table, longform_points, main_table, protocol_table
from harness.report.render import write_table
from harness.report.plots import fidelity_figure, layers_figure, longform_figure, pareto_figure


def render(what: str, results_dir: Path, out: Path) -> list[Path]:
    results = collect(results_dir)
    written: list[Path] = []
    if what in ("main", "all"):
        written += write_table("main", *main_table(results), out, str(results_dir))
    if what in ("protocol", "all"):
        written += write_table("protocol", *protocol_table(results), out, str(results_dir))
    if what in ("efficiency", "all"):
        written += write_table("efficiency", *efficiency_table(results), out, str(results_dir))
    if what in ("calibration", "all"):
        written += write_table("calibration", *calibration_table(results), out, str(results_dir))
    if what in ("layers", "all"):
        written.append(layers_figure(results, out))
    if what in ("pareto", "all"):
        written.append(pareto_figure(results, out))
    if what in ("fidelity", "all"):
        written.append(fidelity_figure(results, out))
    if what in ("longform", "all"):
        written += write_table("longform", *longform.table(longform_points(results)), out, str(results_dir))
        written.append(longform_figure(results, out))
    return written


def main(argv=None) -> None:
    a = parser().parse_intermixed_args(argv)
    _main(a)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness.report", description="Render paper tables and figures from result.json files.")
    p.add_argument("what", choices=["main", "protocol", "efficiency", "calibration", "layers", "pareto", "fidelity",
                                    "longform", "all", "versus"])
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
        tables = {"main": main_table(results), "protocol": protocol_table(results),
                  "efficiency": efficiency_table(results), "calibration": calibration_table(results)}
        tracking.log_report(written, tables, {"mode": a.wandb, "project": a.wandb_project, "group": "report",
                                              "dir": str(a.out)})


if __name__ == "__main__":
    main()
