"""The figures (``out/figures``), each drawn from numbers a function here returns first."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from harness import compare, figures, headline, longform
from harness.results import config_key
from harness.report.index import (
    NothingToRender, against_dense_of, anchor_js, calibrated_results, headline_of, is_dense, label, main_points,
    multiturn_mode, newest_per_label, protocol, with_in_run_dense,
)
from harness.report.tables import longform_points


def layers_figure(results: Sequence[dict], out: Path) -> Path:
    # the paper's Fig. 2 with the default rule's choice (any calibrated point when there is none)
    calibrated = [r for r in calibrated_results(results) if r["method"]["calibration"].get("select", "pairwise") == "pairwise"
                  and not r["method"]["calibration"].get("max_per_anchor")] or calibrated_results(results)
    if not calibrated:
        raise NothingToRender("no calibrated result (method.layers=auto) found: run +exp=sweep_lazy or +exp=llava_lazy first.")
    # the budget nearest one half: lazy layers stacked on one anchor show their JS to it
    r = min(calibrated, key=lambda r: abs((r["method"]["calibration"].get("ratio") or 0) - 0.5))
    cal = r["method"]["calibration"]
    lazy = r["method"]["lazy_layers"]
    return figures.layer_divergence_png(
        cal["adjacent_js"], lazy, out / "figures" / "layer_divergence.png",
        f"{r['model']['name']}: adjacent-layer JS divergence (mean {sum(cal['adjacent_js']) / len(cal['adjacent_js']):.3f})\n"
        f"orange: lazy at {label(r)}; black: each lazy layer's JS to its anchor",
        anchor_js(r, cal["divergence"]) if cal.get("divergence") else None,
    )


def pareto_figure(results: Sequence[dict], out: Path, task: str = "shapes") -> Path:
    """The figure of ``pareto_points``: one line per series."""
    points, y_key, without = pareto_points(results, task)
    if not any(task in r["tasks"] for r in results):
        raise NothingToRender(f"no {task} results to plot.")
    return figures.pareto_png(points, out / "figures" / "pareto.png",
                              f"{task}: {y_key} vs kv_cut_workload (each line: one method, one protocol)",
                              xlabel="kv_cut_workload: KV cache reduction on the scored samples (%)",
                              ylabel=f"{y_key} (%){without}")


def pareto_points(results: Sequence[dict], task: str = "shapes") -> tuple[dict, str, str]:
    """``acc_mean_types_capable`` (``acc_mean_types`` when dense can do every type) against
    ``kv_cut_workload``, the numbers of the main table's rows, as ``{series: [(x %, y %, label)]}``
    (a series is the method's own, ``method.series``), the y key, and what y leaves out. A point
    without a workload KV cut (no dense of its protocol) is left out and named on stderr, never
    replaced by the timing batch's cut. Points of different protocols (model, task settings, limit,
    seed) are never joined: each series is one method family under one protocol."""
    results = [r for r in results if task in r["tasks"]]
    chosen = with_in_run_dense(main_points(results), task)
    heads = [headline_of(r, results, task) for r in chosen]
    capable = any(h.get("dense_below_floor") for h in heads)
    y_key = "acc_mean_types_capable" if capable else "acc_mean_types"
    protocols = {config_key(protocol(r)) for r in chosen}
    points: dict[str, list[tuple[float, float, str]]] = {}
    for r, head in zip(chosen, heads):
        if head["kv_cut_workload"] is None or head[y_key] is None:
            why = ("no kv_cut_workload (no dense of its protocol)" if head["kv_cut_workload"] is None
                   else f"no {y_key} (dense is below the floor on every type)")
            print(f"note: the Pareto figure leaves out {label(r)} [{r['model']['name']}] ({r['_path']}): {why}.",
                  file=sys.stderr)
            continue
        series = r["method"]["series"]
        if len(protocols) > 1:
            p = protocol(r)
            series += f" [{p['model']}, n={r['tasks'][task]['n']}, limit={p['limit']}, seed={p['seed']}]"
        points.setdefault(series, []).append((100 * head["kv_cut_workload"], 100 * head[y_key], label(r)))
    flagged = sorted({t for h in heads for t in (h.get("dense_below_floor") or [])})
    without = f" (without {', '.join(flagged)}: dense below {headline.DENSE_FLOOR:.0%})" if capable else ""
    return points, y_key, without


def fidelity_figure(results: Sequence[dict], out: Path, qtype: str = "long", max_tokens: int = 120) -> Path:
    """For each method (carried-cache points): of the samples of ``qtype`` whose dense answer has at
    least t tokens, the fraction whose answer agrees with dense's on all of the first t."""
    curves = {}
    longest = max((protocol(r)["task"].get("min_new_tokens") or 0 for r in results), default=0)
    chosen = [r for r in results if multiturn_mode(r) == "carry" and not is_dense(r)
              and (protocol(r)["task"].get("min_new_tokens") or 0) == longest]  # the forced-long sweep if any
    for r in newest_per_label(chosen):
        comp = against_dense_of(r, results)
        per = [f for m, f in comp.get("per_sample", []) if m.get("qtype") == qtype]
        if per:
            curves[label(r)] = compare.agreement_curve(per, max_tokens)
    if not curves:
        raise NothingToRender(f"no carried-cache results with {qtype} samples and a matching dense point.")
    forced = f", no stop before {longest} tokens" if longest else ""
    return figures.agreement_png(curves, out / "figures" / "fidelity.png",
                                 f"{qtype} answers{forced}: agreement with dense as generation grows")


def longform_figure(results: Sequence[dict], out: Path, near: float = 0.25) -> Path:
    """``harness.longform.figure`` of dense and, per figure series, the point whose workload KV cut on
    the main table is nearest ``near`` (the equal-KV comparison), for the first model."""
    points = longform_points(results)
    if not points:
        raise NothingToRender("no carried-cache point with dialogue or long samples and a dense of its protocol.")
    model = points[0][1]
    chosen = {label(r): r for r in with_in_run_dense(main_points(results), "shapes") if r["model"]["name"] == model}
    best: dict[str, tuple[float, str]] = {}
    for r in chosen.values():
        cut = headline_of(r, results)["kv_cut_workload"]
        series = r["method"]["series"]
        if is_dense(r) or cut is None:
            continue
        if series not in best or abs(cut - near) < abs(best[series][0] - near):
            best[series] = (cut, label(r))
    keep = {lab for _, lab in best.values()}
    shown = [p for p in points if p[1] == model and (p[0].startswith("Dense") or p[0] in keep)]
    return longform.figure(shown, out / "figures" / "longform.png",
                           f"{model}: dense and, per method, the point nearest a {near:.0%} workload KV cut")
