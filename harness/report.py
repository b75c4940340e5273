"""Paper tables and figures, rendered from result.json files only (they rebuild without a model).

    python -m harness.report main       --results results/tiny --out results   # accuracy table
    python -m harness.report efficiency --results results/tiny --out results   # KV / latency table
    python -m harness.report layers     --results results/tiny --out results   # layer divergence figure
    python -m harness.report pareto     --results results/tiny --out results   # accuracy vs KV reduction
    python -m harness.report all        --results results/tiny --out results

Tables are written as Markdown and LaTeX to ``out/tables``, figures as PNG to ``out/figures``.
Rows are ordered as the methods are registered (``lazyattn.METHODS``: dense, Lazy Attention,
FastV, SparseVLM, combinations), each by its own setting; every label comes from the run that
made the result. A point measured twice (same label) keeps the newest result.
"""

from __future__ import annotations

import argparse
import json
import sys
import os
from collections.abc import Sequence
from pathlib import Path

from harness import compare, figures, headline, longform
from harness import results
from harness.results import config_key
from lazyattn import METHODS, anchors_of


def collect(results_dir: str | Path) -> list[dict]:
    """Every finished result under ``results_dir`` (recursively), with its path."""
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} does not exist: run the sweeps first (make sweeps, or make tables RUN=1) or pass --results DIR."
        )
    out = [results.load(path) for path in sorted(root.rglob("result.json"))]
    if not out:
        raise FileNotFoundError(f"no result.json under {root}: run the sweeps first (make sweeps).")
    return out


def label(result: dict) -> str:
    """The row label a run gave its method (``method.label`` in result.json)."""
    return result["method"]["label"]


def _sort_key(result: dict):
    """Registry order of the method (dense, lazy, fastv, sparsevlm, compositions), then the
    method's own setting order (``method.sort_key``), then the label."""
    name = result["method"]["name"]
    rank = list(METHODS).index(name) if name in METHODS else len(METHODS)
    return (result["model"]["name"], rank, result["method"]["sort_key"], label(result))


def protocol(result: dict) -> dict:
    """What must match for two results to be compared sample by sample: model, data, protocol."""
    task = dict((result.get("config") or {}).get("task") or {})
    config = result.get("config") or {}
    return {"model": result["model"]["name"], "task": task, "limit": config.get("limit"), "seed": config.get("seed")}


def multiturn_mode(result: dict) -> str:
    return protocol(result)["task"]["multiturn"]


def _unique(results: Sequence[dict]) -> list[dict]:
    """One result per (protocol, label): the newest; the others are named on stderr."""
    newest: dict[str, dict] = {}
    for r in results:
        key = config_key({"protocol": protocol(r), "label": label(r)})
        if key in newest:
            old, new = sorted([newest[key], r], key=lambda x: x["env"].get("time", ""))
            print(f"note: {label(r)} appears twice with the same settings; kept {new['_path']}, "
                  f"not {old['_path']}", file=sys.stderr)
            r = new
        newest[key] = r
    return sorted(newest.values(), key=_sort_key)


def rows_of(result: dict, variant: str = "method") -> list[dict]:
    if result.get("_in_run_dense") and variant == "method":  # the "Dense (in-run)" row: the run's dense variant
        variant = "dense"
    path = Path(result["_path"]).parent / "samples.jsonl"
    if not path.exists():
        return []
    return [row for row in map(json.loads, path.read_text().splitlines()) if row.get("variant") == variant]


def dense_rows(result: dict, results: Sequence[dict]) -> list[dict]:
    """Dense's rows on the same samples under the same protocol: the run's own dense variant
    (compare_dense=true) or a dense point with equal settings; [] when there is none."""
    own = rows_of(result, "dense")
    if own:
        return own
    key = config_key(protocol(result))
    for other in results:
        if other["method"]["name"] == "dense" and config_key(protocol(other)) == key:
            return rows_of(other)
    return []


def dense_scores(result: dict, results: Sequence[dict], task: str) -> dict | None:
    """Dense's scores of ``task`` on the same protocol: the run's own ``tasks_dense`` or a dense
    point with equal settings (a dense result is its own); None when there is none."""
    if result["method"]["name"] == "dense":
        return result["tasks"].get(task)
    own = (result.get("tasks_dense") or {}).get(task)
    if own:
        return own
    key = config_key(protocol(result))
    for other in results:
        if other["method"]["name"] == "dense" and config_key(protocol(other)) == key and task in other["tasks"]:
            return other["tasks"][task]
    return None


def headline_of(result: dict, results: Sequence[dict], task: str | None = None) -> dict:
    """``harness.headline.compute`` for a result among ``results``: paired with its own dense
    variant or a dense point of the same protocol, as every table pairs it."""
    task = task or next(iter(result["tasks"]))
    return headline.compute(result, rows_of(result), dense_rows(result, results), dense_scores(result, results, task),
                            task)


def _task_columns(results: Sequence[dict], task: str) -> list[str]:
    cols: list[str] = []
    for r in results:
        for key, value in r["tasks"].get(task, {}).items():
            if isinstance(value, dict) and key not in cols:
                cols.append(key)
    return cols


def _metric(scores: dict) -> float:
    return scores["f1"] if "f1" in scores else scores["acc"]


def primary(row: dict) -> float:
    return row[compare.metric_of(row)]


def _pm(delta: dict | None, scale: float = 100) -> str:
    """``Δ ± half-width`` of a paired difference; a * marks an interval that excludes 0."""
    if not delta or delta.get("delta") is None:
        return "–"
    lo, hi = delta["delta_ci95"]
    star = "*" if lo > 0 or hi < 0 else ""
    return f"{scale * delta['delta']:+.1f} ± {scale * (hi - lo) / 2:.1f}{star}"


def comparison(result: dict, results: Sequence[dict]) -> dict:
    """The result against dense on the same samples: paired differences (per group and of the
    per-sample score over all samples), fidelity (whitespace tokens) and workload KV."""
    method, dense = rows_of(result), dense_rows(result, results)
    if not method or not dense or result["method"]["name"] == "dense":
        return {}
    pairs = compare.paired(method, dense)
    fid, per_sample = compare.fidelity(method, dense)
    return {
        "n": len(pairs),
        "all": compare.paired_delta([primary(m) for m, _ in pairs], [primary(d) for _, d in pairs]),
        "by_qtype": compare.deltas(method, dense),
        "fidelity": fid,
        "per_sample": [(m, f) for (m, _), f in zip(pairs, per_sample)],
        "kv": compare.kv_workload(method, dense),
    }


def main_points(results: Sequence[dict], notes: bool = False) -> list[dict]:
    """The points of the main comparison: the carried-cache protocol (when there is one) on the
    widest set of question types, one per label and protocol. With ``notes``, every point left out
    is named on stderr with the reason."""
    carry = [r for r in results if multiturn_mode(r) == "carry"] or list(results)
    widest = max((len(protocol(r)["task"].get("qtypes") or []) for r in carry), default=0)
    chosen = [r for r in carry if len(protocol(r)["task"].get("qtypes") or []) == widest]
    if notes:
        for r in results:
            if any(r is c for c in chosen):
                continue
            t = protocol(r)["task"]
            why = (f"multiturn={t['multiturn']}, not carry" if multiturn_mode(r) != "carry" and len(carry) < len(results)
                   else f"its question types ({', '.join(t.get('qtypes') or [])}) are not the widest set ({widest} types)")
            extra = f", min_new_tokens={t['min_new_tokens']}" if t.get("min_new_tokens") else ""
            qtypes = t.get("qtypes") or []
            shown = "multiturn" in qtypes or ("long" in qtypes and t.get("min_new_tokens"))
            print(f"note: main table leaves out {label(r)} [{r['model']['name']}] ({r['_path']}): {why}{extra}"
                  + ("; it is in the protocol table." if shown else "."), file=sys.stderr)
    return _unique(chosen)


def with_in_run_dense(points: Sequence[dict], task: str) -> list[dict]:
    """``points`` plus, for every protocol that has no dense point, a "Dense (in-run)" row made from
    the ``tasks_dense`` of the first point that scored dense beside itself (``compare_dense=true``)."""
    have = {config_key(protocol(r)) for r in points if r["method"]["name"] == "dense"}
    out = list(points)
    for r in points:
        key = config_key(protocol(r))
        if key in have or task not in (r.get("tasks_dense") or {}):
            continue
        have.add(key)
        out.append({**r, "tasks": r["tasks_dense"], "efficiency": None, "_in_run_dense": True,
                    "method": {"name": "dense", "label": "Dense (in-run)", "sort_key": [], "params": {}, "series": "dense"}})
    return sorted(out, key=_sort_key)


def unpaired(points: Sequence[dict], results: Sequence[dict]) -> list[str]:
    """A note for every method point with no dense rows of its own protocol (its Δ stays blank),
    naming what differs from the dense points there are (model, task settings, limit or seed)."""
    notes = []
    dense = [protocol(r) for r in results if r["method"]["name"] == "dense"]
    for r in points:
        if r["method"]["name"] == "dense" or dense_rows(r, results):
            continue
        mine = protocol(r)
        differs = sorted({k for d in dense for k in mine if mine[k] != d[k]}) if dense else []
        why = f"the dense points differ in {', '.join(differs)}" if differs else "there is no dense point"
        notes.append(f"note: {label(r)} ({r['_path']}) has no dense baseline of the same protocol ({why}): "
                     "its Δ is left blank; run dense with the same settings (+exp=sweep_dense) or compare_dense=true.")
    return notes


FLAG = "†"
FLAG_NOTE = (f"{FLAG} dense scores below {headline.DENSE_FLOOR:.0%} on this question type (a type dense cannot do): it "
             f"counts in `Avg` (acc_mean_types) and is left out of `Avg w/o {FLAG}` (acc_mean_types_capable).")


def main_table(results: Sequence[dict], task: str = "shapes") -> tuple[list[str], list[list[str]]]:
    """Score (%) per question type (describe and long: F1); ``Avg`` (``acc_mean_types``: the mean
    over question types) and, when dense is below ``headline.DENSE_FLOOR`` on a type (marked †),
    ``Avg w/o †`` (``acc_mean_types_capable``); ``Δ Avg`` (``delta_score``: the paired change of the
    per-sample score against dense, ± half of the 95 % interval, * when the interval excludes 0);
    ``KV cut`` (``kv_cut_workload``) and how often the method's output equals dense's. Every
    number is ``harness.headline``'s, the one result.json, the console and W&B show. A Model
    column always, a Seed column when the points have more than one seed. Rows use the
    carried-cache protocol when there is one; the points left out are named on stderr."""
    results = [r for r in results if task in r["tasks"]]
    chosen = with_in_run_dense(main_points(results, notes=True), task)
    cols = _task_columns(chosen, task)
    heads = [headline_of(r, results, task) for r in chosen]
    flagged = {t for h in heads for t in (h.get("dense_below_floor") or [])}
    seeds = len({protocol(r)["seed"] for r in chosen}) > 1
    header = ["Method", "Model", *(["Seed"] if seeds else []), "n",
              *[c + (" F1" if c in ("describe", "long") else "") + (f" {FLAG}" if c in flagged else "") for c in cols],
              "Avg", *([f"Avg w/o {FLAG}"] if flagged else []), "Δ Avg", "KV cut workload", "= dense"]
    rows = []
    for note in unpaired(chosen, results):
        print(note, file=sys.stderr)
    for r, head in zip(chosen, heads):
        scores = r["tasks"][task]
        values = [headline.primary(scores[c]) if c in scores else None for c in cols]
        dense = r["method"]["name"] == "dense"
        cut = "0 %" if dense else ("–" if head["kv_cut_workload"] is None else f"{100 * head['kv_cut_workload']:.1f} %")
        same = "" if dense else ("–" if head["exact_match"] is None else f"{100 * head['exact_match']:.0f} %")
        delta = "" if dense else _pm({"delta": head["delta_score"], "delta_ci95": head["delta_score_ci95"]})
        rows.append([label(r), r["model"]["name"], *([str(protocol(r)["seed"])] if seeds else []), str(scores["n"]),
                     *[headline.percent(v) for v in values], headline.percent(head["acc_mean_types"]),
                     *([headline.percent(head["acc_mean_types_capable"])] if flagged else []), delta, cut, same])
    return header, rows


def table_notes(header: Sequence[str]) -> list[str]:
    """The footnotes a table's header calls for (the † of a type dense cannot do)."""
    return [FLAG_NOTE] if any(FLAG in h for h in header) else []


def protocol_table(results: Sequence[dict], task: str = "shapes") -> tuple[list[str], list[list[str]]]:
    """Carried cache against re-encoding: each method's paired change against dense (points, ± half
    of the 95 % interval, * when it excludes 0) on the multi-turn types under both protocols, and,
    from the forced-long-generation points, how often and how far the long answers agree with dense
    and the KV cut on that workload (generated tokens dominate it)."""
    results = [r for r in results if task in r["tasks"]]

    def points(keep) -> dict[tuple[str, str], dict]:
        return {(label(r), r["model"]["name"]): r for r in _unique([r for r in results if keep(protocol(r)["task"])])}

    def has(t, qtype):
        return qtype in (t.get("qtypes") or [])

    carry = points(lambda t: t["multiturn"] == "carry" and has(t, "multiturn") and not t.get("min_new_tokens"))
    reencode = points(lambda t: t["multiturn"] == "reencode" and has(t, "multiturn"))
    forced = points(lambda t: has(t, "long") and (t.get("min_new_tokens") or 0) > 0)
    header = ["Method", "Model", "multiturn carry", "multiturn re-encode", "dialogue carry", "dialogue re-encode",
              "long = dense", "long prefix agr.", "long 1st divergence", "long KV cut"]
    rows = []
    for name in dict.fromkeys([*carry, *reencode, *forced]):
        r = carry.get(name) or reencode.get(name) or forced.get(name)
        if r["method"]["name"] == "dense":
            continue
        comps = {key: comparison(group[name], results) if name in group else {}
                 for key, group in (("carry", carry), ("reencode", reencode), ("forced", forced))}
        cells = [name[0], name[1]]
        for qtype in ("multiturn", "dialogue"):
            for key in ("carry", "reencode"):
                cells.append(_pm((comps[key].get("by_qtype") or {}).get(qtype)))
        long = (comps["forced"].get("fidelity") or {}).get("long") or {}
        cells.append("–" if long.get("exact_match") is None else f"{100 * long['exact_match']:.0f} %")
        cells.append("–" if long.get("prefix_agreement") is None else f"{100 * long['prefix_agreement']:.0f} %")
        cells.append("–" if long.get("first_divergence_median") is None else f"{long['first_divergence_median']:g}")
        cut = (comps["forced"].get("kv") or {}).get("reduction")
        cells.append("–" if cut is None else f"{100 * cut:.1f} %")
        rows.append(cells)
    return header, rows


SPEEDUPS = (("decode_speedup", "decode_tokens_per_s"), ("e2e_speedup", "e2e_tokens_per_s"),
            ("prefill_speedup", "prefill_ms"))
DRIFT = 0.10  # dense timed against itself beyond this: the machine was not steady


def ratio_spread(eff: dict, speedup: str, measure_key: str) -> float | None:
    """The spread of an in-process speed-up: the ratio times the sum of the two medians' relative
    half-IQRs (method and dense, over the interleaved repeats); None when the IQRs were not kept."""
    m, d = eff["method"], eff.get("dense") or {}
    if eff.get(speedup) is None or m.get(f"{measure_key}_iqr") is None or d.get(f"{measure_key}_iqr") is None:
        return None
    rel = m[f"{measure_key}_iqr"] / (2 * m[measure_key]) + d[f"{measure_key}_iqr"] / (2 * d[measure_key])
    return eff[speedup] * rel


def _x(eff: dict, speedup: str, measure_key: str) -> str:
    if eff.get(speedup) is None:
        return "–"
    spread = ratio_spread(eff, speedup, measure_key)
    return f"{eff[speedup]:.2f}" + ("" if spread is None else f" ± {spread:.2f}")


def timing_drift(results: Sequence[dict]) -> list[str]:
    """Warnings for every dense point whose dense-against-dense speed-ups (the same model timed
    twice, interleaved, in one process) are off 1 by more than ``DRIFT`` and their spread: on such
    a machine, method ratios of that size mean nothing."""
    out = []
    for r in results:
        eff = r.get("efficiency")
        if r["method"]["name"] != "dense" or not eff:
            continue
        for speedup, measure_key in SPEEDUPS:
            value = eff.get(speedup)
            spread = ratio_spread(eff, speedup, measure_key) or 0.0
            if value is not None and abs(value - 1) > max(DRIFT, spread):
                out.append(f"warning: {r['_path']}: dense timed against itself gave {speedup} {value:.2f} "
                           f"(± {spread:.2f}); the machine was not steady, ratios within that are noise.")
    return out


def efficiency_table(results: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """KV MB, device memory, prefill ms, decode and end-to-end tokens/s of each method, and its
    speed-ups over dense measured in the same run (method over dense, higher is better), each with
    its spread (``ratio_spread``). Absolute numbers come from each point's own process; compare
    methods by the in-process ratios. A dense point timed against itself that drifts by more than
    10 % is named on stderr (``timing_drift``). Results written before end-to-end throughput and
    device memory were measured show "–" there."""
    header = ["Method", "Model", "KV MB", "KV cut timing batch", "Mem GB", "Prefill ms", "Decode tok/s", "E2E tok/s",
              "Decode ×", "E2E ×", "Prefill ×", "Device"]
    rows = []
    chosen = [r for r in main_points(results) if r.get("efficiency")]
    for warning in timing_drift(chosen):
        print(warning, file=sys.stderr)
    for r in chosen:
        eff = r["efficiency"]
        m = eff["method"]
        mem = m.get("peak_memory_bytes")
        e2e = m.get("e2e_tokens_per_s")
        rows.append([
            label(r),
            r["model"]["name"],
            f"{m['kv_cache_bytes'] / 2**20:.3f}",
            f"{100 * eff['kv_reduction']:.1f} %",
            "–" if mem is None else f"{mem / 2**30:.2f}",
            f"{m['prefill_ms']:.1f}",
            f"{m['decode_tokens_per_s']:.0f}",
            "–" if e2e is None else f"{e2e:.0f}",
            *[_x(eff, speedup, key) for speedup, key in SPEEDUPS],
            f"{eff['device']} b={eff['batch_size']} L={eff['prompt_tokens']}",
        ])
    return header, rows


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def latex(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(text: str) -> str:
        return (text.replace("%", r"\%").replace("_", r"\_").replace("Δ", r"$\Delta$").replace("×", r"$\times$")
                .replace("†", r"$^\dagger$"))

    lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule", " & ".join(map(esc, header)) + r" \\", r"\midrule"]
    lines += [" & ".join(map(esc, row)) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_table(name: str, header, rows, out: Path, source: str) -> list[Path]:
    folder = out / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    md, tex = folder / f"{name}.md", folder / f"{name}.tex"
    notes = table_notes(header)
    md.write_text(f"<!-- rendered by `python -m harness.report` from {source}; do not edit -->\n" + markdown(header, rows)
                  + "".join(f"\n{n}\n" for n in notes))
    tex.write_text(f"% rendered by `python -m harness.report` from {source}\n" + latex(header, rows)
                   + "".join(f"% {n}\n" for n in notes))
    return [md, tex]


def _calibrated(results: Sequence[dict]) -> list[dict]:
    return [r for r in results if (r["method"].get("calibration") or {}).get("adjacent_js")]


def anchor_js(result: dict, divergence: Sequence[Sequence[float]]) -> dict[int, float]:
    """The dense model's JS divergence between each lazy layer of ``result`` and its anchor (the
    nearest preceding non-lazy layer), from the pairwise matrix ``divergence``."""
    anchor_of = anchors_of(result["method"]["lazy_layers"], len(divergence))
    return {lazy: divergence[anchor][lazy] for lazy, anchor in anchor_of.items()}


def layers_figure(results: Sequence[dict], out: Path) -> Path:
    # the paper's Fig. 2 with the default rule's choice (any calibrated point when there is none)
    calibrated = [r for r in _calibrated(results) if r["method"]["calibration"].get("select", "pairwise") == "pairwise"
                  and not r["method"]["calibration"].get("max_per_anchor")] or _calibrated(results)
    if not calibrated:
        raise ValueError("no calibrated result (method.layers=auto) found: run +exp=sweep_lazy or +exp=llava_lazy first.")
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


def calibration_table(results: Sequence[dict], task: str = "shapes") -> tuple[list[str], list[list[str]]]:
    """Lazy layers chosen by each rule (uniform, pairwise calibration, anchor calibration, with a
    cap) for each budget, on the main protocol (the default reading, share=qk scope=all): the layers,
    the mean and the largest JS divergence of a lazy layer's attention to its anchor's on the dense
    model (from any calibrated point's pairwise matrix), the paired change against dense and its
    exact match to dense."""
    lazy = [r for r in main_points(results) if r["method"]["name"] == "lazy"
            and r["method"]["params"].get("share", "qk") == "qk" and r["method"]["params"].get("scope", "all") == "all"]
    matrices = [(r["method"]["calibration"]["divergence"], r["model"]["name"]) for r in _calibrated(lazy)
                if r["method"]["calibration"].get("divergence")]
    header = ["Model", "Budget", "Rule", "Lazy layers", "mean JS to anchor", "max JS to anchor", "Δ Avg", "= dense"]
    rows = []

    def rule(r):
        cal = r["method"].get("calibration")
        if not cal:
            return "uniform" if r["method"]["params"].get("layers") is None else "explicit"
        how = "anchor" if cal.get("select") == "anchor" else "pairwise"
        return how + (f", <={cal['max_per_anchor']}/anchor" if cal.get("max_per_anchor") else "")

    def budget(r):
        return (r["method"].get("calibration") or {}).get("ratio") or r["method"]["params"].get("ratio") or 0

    for r in sorted(lazy, key=lambda r: (r["model"]["name"], budget(r), rule(r))):
        mine = [m for m, x in matrices if x == r["model"]["name"]]
        js = anchor_js(r, mine[0]) if mine else {}
        comp = comparison(r, results)
        exact = (comp.get("fidelity") or {}).get("exact_match")
        rows.append([
            r["model"]["name"], f"{budget(r):g}", rule(r), " ".join(map(str, r["method"]["lazy_layers"])),
            "–" if not js else f"{sum(js.values()) / len(js):.3f}",
            "–" if not js else f"{max(js.values()):.3f}",
            _pm(comp.get("all")),
            "–" if exact is None else f"{100 * exact:.0f} %",
        ])
    return header, rows


def pareto_figure(results: Sequence[dict], out: Path, task: str = "shapes") -> Path:
    """The figure of ``pareto_points``: one line per series."""
    points, y_key, without = pareto_points(results, task)
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
    chosen = [r for r in results if multiturn_mode(r) == "carry" and r["method"]["name"] != "dense"
              and (protocol(r)["task"].get("min_new_tokens") or 0) == longest]  # the forced-long sweep if any
    for r in _unique(chosen):
        comp = comparison(r, results)
        per = [f for m, f in comp.get("per_sample", []) if m.get("qtype") == qtype]
        if per:
            curves[label(r)] = compare.agreement_curve(per, max_tokens)
    if not curves:
        raise ValueError(f"no carried-cache results with {qtype} samples and a matching dense point.")
    forced = f", no stop before {longest} tokens" if longest else ""
    return figures.agreement_png(curves, out / "figures" / "fidelity.png",
                                 f"{qtype} answers{forced}: agreement with dense as generation grows")


def longform_points(results: Sequence[dict], task: str = "shapes") -> list[tuple[str, str, dict]]:
    """``(label, model, harness.longform.numbers)`` of every main-table point (carried cache) that has
    dialogue or long samples and a dense of its protocol, dense first per model."""
    out = []
    for r in with_in_run_dense(main_points(results), task):
        method, dense = rows_of(r), dense_rows(r, results)
        if not dense or not any(m.get("qtype") in ("dialogue", "long") for m in method):
            continue
        out.append((label(r), r["model"]["name"], longform.numbers(method, dense)))
    return out


def longform_figure(results: Sequence[dict], out: Path, near: float = 0.25) -> Path:
    """``harness.longform.figure`` of dense and, per figure series, the point whose workload KV cut on
    the main table is nearest ``near`` (the equal-KV comparison), for the first model."""
    points = longform_points(results)
    if not points:
        raise ValueError("no carried-cache point with dialogue or long samples and a dense of its protocol.")
    model = points[0][1]
    chosen = {label(r): r for r in with_in_run_dense(main_points(results), "shapes") if r["model"]["name"] == model}
    best: dict[str, tuple[float, str]] = {}
    for r in chosen.values():
        cut = headline_of(r, results)["kv_cut_workload"]
        series = r["method"]["series"]
        if r["method"]["name"] == "dense" or cut is None:
            continue
        if series not in best or abs(cut - near) < abs(best[series][0] - near):
            best[series] = (cut, label(r))
    keep = {lab for _, lab in best.values()}
    shown = [p for p in points if p[1] == model and (p[0].startswith("Dense") or p[0] in keep)]
    return longform.figure(shown, out / "figures" / "longform.png",
                           f"{model}: dense and, per method, the point nearest a {near:.0%} workload KV cut")


def versus(results: Sequence[dict], a: str, b: str, qtype: str | None = None) -> dict:
    """Method ``a`` against method ``b`` (table labels), sample by sample on the samples both scored
    under the same protocol (only those of ``qtype`` if given): the paired change of the per-sample
    score, ``a - b``, with its 95 % interval (for claims such as "qkv beats qk at equal KV", which no
    dense comparison settles)."""
    points = {label(r): r for r in main_points(results)}
    missing = [x for x in (a, b) if x not in points]
    if missing:
        raise ValueError(f"no main-protocol point labelled {missing}; labels: {', '.join(points)}.")
    if config_key(protocol(points[a])) != config_key(protocol(points[b])):
        raise ValueError(f"{a!r} and {b!r} were run under different protocols (model, task, limit or seed).")
    pairs = [(x, y) for x, y in compare.paired(rows_of(points[a]), rows_of(points[b]))
             if qtype is None or x.get("qtype") == qtype]
    if not pairs:
        raise ValueError(f"{a!r} and {b!r} share no {qtype or ''} samples.")
    return compare.paired_delta([primary(x) for x, _ in pairs], [primary(y) for _, y in pairs])


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
    p = argparse.ArgumentParser(description="Render paper tables and figures from result.json files.")
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
