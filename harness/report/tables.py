"""The paper's tables as (header, rows) of strings, computed from ``harness.report.index``'s numbers."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

from harness import headline, longform
from harness.metrics import Metric
from harness import measure
from harness.measure import SPEEDUPS, ratio_spread  # one definition, shared with the noise verdict
from harness.report.index import (
    NothingToRender, against_dense_of, anchor_js, calibrated_results, delta_cell, dense_rows, headline_of, is_dense,
    label, main_points, metrics_of, newest_per_label, protocol, rows_of, score_groups, unpaired, with_in_run_dense,
)


FLAG = "†"


FLAG_NOTE = (f"{FLAG} dense scores below {headline.DENSE_FLOOR:.0%} on this question type (a type dense cannot do): it "
             f"counts in `Avg` (acc_mean_types) and is left out of `Avg w/o {FLAG}` (acc_mean_types_capable).")


TASK_FLAG = "§"
TASK_FLAG_NOTE = (f"{TASK_FLAG} dense scores below {headline.DENSE_FLOOR:.0%} on the whole task (one dense cannot do): "
                  "the row's Δ says nothing about the method.")
NOISE_FLAG = "‡"
NOISE_FLAG_NOTE = (f"{NOISE_FLAG} timing is noise (result.json headline.timing_noisy): a speed-up's spread wider than "
                   f"{measure.NOISE_FRACTION:.0%} of it, or over {measure.ACHIEVED_MAX:.0%} of the bytes prediction "
                   "achieved; not a finding.")


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
    cols = score_groups(chosen, task)
    heads = [headline_of(r, results, task) for r in chosen]
    flagged = {t for h in heads for t in (h.get("dense_below_floor") or [])}
    seeds = len({protocol(r)["seed"] for r in chosen}) > 1
    header = ["Method", "Model", *(["Seed"] if seeds else []), "n",
              *[c + _metric_suffix(chosen, task, c) + (f" {FLAG}" if c in flagged else "") for c in cols],
              "Avg", *([f"Avg w/o {FLAG}"] if flagged else []),
              "Δ Avg", "KV cut workload", "= dense"]
    rows = []
    for note in unpaired(chosen, results):
        print(note, file=sys.stderr)
    for r, head in zip(chosen, heads):
        scores = r["tasks"][task]
        declared = metrics_of(r, task)
        values = [declared.score(scores[c]) if c in scores else None for c in cols]
        dense = is_dense(r)
        cut = "0 %" if dense else ("–" if head["kv_cut_workload"] is None else f"{100 * head['kv_cut_workload']:.1f} %")
        same = "" if dense else ("–" if head["exact_match"] is None else f"{100 * head['exact_match']:.0f} %")
        delta = "" if dense else delta_cell({"delta": head["delta_score"], "delta_ci95": head["delta_score_ci95"]})
        if head.get("dense_task_below_floor") and not dense:
            delta = f"{delta} {TASK_FLAG}"
        rows.append([label(r), r["model"]["name"], *([str(protocol(r)["seed"])] if seeds else []), str(scores["n"]),
                     *[headline.percent(v) for v in values], headline.percent(head["acc_mean_types"]),
                     *([headline.percent(head["acc_mean_types_capable"])] if flagged else []), delta, cut, same])
    return header, rows


def _metric_suffix(points: Sequence[dict], task: str, column: str) -> str:
    """" F1" after a column judged by another metric than the task's score over samples (shapes'
    describe and long), from the task's declaration; "" otherwise."""
    for r in points:
        scores, declared = r["tasks"][task], metrics_of(r, task)
        metric, overall = declared.judged_by(scores.get(column)), declared.judged_by(scores)
        if metric is not None:
            return "" if overall is None or metric.name == overall.name else f" {metric.title or metric.name}"
    return ""


def benchmark_table(results: Sequence[dict], columns: Sequence[str] | None = None,
                    titles: Mapping[str, str] | None = None,
                    columns_metrics: Mapping[str, Metric] | None = None) -> tuple[list[str], list[list[str]]]:
    """Tasks (benchmarks, datasets) as columns, each by the metric its scores are judged by (the first
    declared one they hold, ``harness.metrics``: a benchmark's protocol's; printed on its own scale),
    methods as rows, with the timing batch's KV cut and decode throughput (tokens/s and speed-up over dense, ‡ where timing is
    noise). ``columns``: the tasks to show, in order (default: every task of ``results``, in the order
    they appear), ``titles`` their names (default: the task and its metric), ``columns_metrics`` the
    metric of a column where it is not the one its scores are judged by. Every result that holds
    one of them is a row, newest per label and protocol; a dense scored beside a method
    (``compare_dense=true``) is a "Dense (in-run)" row."""
    if columns is None:
        columns = list(dict.fromkeys(name for r in results for name in r["tasks"]))
    chosen = newest_per_label([r for r in results if any(c in r["tasks"] for c in columns)])
    present = [c for c in columns if any(c in r["tasks"] for r in chosen)]
    dense_task = next((c for c in present if any(c in (r.get("tasks_dense") or {}) for r in chosen)), None)
    if dense_task is not None:
        chosen = with_in_run_dense(chosen, dense_task)

    def judged(name: str):  # the metric the task's scores are judged by (a benchmark's: its protocol's)
        return next((m for r in chosen if (m := metrics_of(r, name).judged_by(r["tasks"].get(name)))), None)

    metric_of = {name: m for name in present if (m := (columns_metrics or {}).get(name) or judged(name))}
    present = [c for c in present if c in metric_of]
    if not present:
        return ["Method", "Model"], []

    def title(name: str) -> str:
        if titles and name in titles:
            return titles[name]
        return f"{name} {metric_of[name].title or metric_of[name].name}"

    header = ["Method", "Model", *[title(c) for c in present], "KV cut timing batch", "Decode tok/s", "Decode ×"]
    rows = []
    for r in chosen:
        cells = []
        for name in present:
            value = (r["tasks"].get(name) or {}).get(metric_of[name].name)  # never another metric in its place
            cells.append(metric_of[name].shown(value if isinstance(value, (int, float)) else None))
        head = headline.compute(r, task=present[0]) if r.get("efficiency") else {}
        noise = f" {NOISE_FLAG}" if head.get("timing_noisy") else ""
        cut, tps, speedup = (head.get(k) for k in ("kv_cut_timing_batch", "decode_tokens_per_s_timing_batch",
                                                     "decode_speedup_timing_batch"))
        if r.get("_in_run_dense") and r.get("_timed_beside"):  # dense timed beside the method, in its run
            cut, tps = 0.0, r["_timed_beside"]["dense"].get("decode_tokens_per_s")
        rows.append([label(r), r["model"]["name"], *cells, "–" if cut is None else f"{100 * cut:.1f} %",
                     "–" if tps is None else f"{tps:.0f}", "–" if speedup is None else f"{speedup:.2f}{noise}"])
    return header, rows


def paper_table(results: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """The paper's table from ``task=paper`` results: its benchmarks as columns in its order, each under
    its protocol's metric (``harness.lmms.benchmarks.PAPER_COLUMNS``: POPE as its subsets' mean F1),
    methods as rows, with KV cut and throughput (``benchmark_table``). The paper's benchmarks the
    results lack are named on stderr; results with none of them are refused (``NothingToRender``)."""
    from harness.lmms.benchmarks import PAPER_COLUMNS, column_title, declared

    present = [c for c in PAPER_COLUMNS if any(c in r["tasks"] for r in results)]
    if not present:
        held = sorted({name for r in results for name in r["tasks"]})
        raise NothingToRender(f"no task=paper results (none of {', '.join(PAPER_COLUMNS)}); these hold "
                              f"{', '.join(held)}: python -m harness.report tasks renders them.")
    missing = [c for c in PAPER_COLUMNS if c not in present]
    if missing:
        print(f"note: the paper table has no results for {', '.join(missing)}: their columns are left out.",
              file=sys.stderr)
    return benchmark_table(results, present, {c: column_title(c) for c in present},
                           {c: declared(c).metrics[0] for c in present})


def table_notes(header: Sequence[str], rows: Sequence[Sequence[str]] = ()) -> list[str]:
    """The footnotes a table's marks call for: † a type dense cannot do (in the header), § a task dense
    cannot do and ‡ noisy timing (in the cells)."""
    marks = ((FLAG, FLAG_NOTE), (TASK_FLAG, TASK_FLAG_NOTE), (NOISE_FLAG, NOISE_FLAG_NOTE))
    cells = [*header, *(cell for row in rows for cell in row)]  # the column names keep their names
    return [note for mark, note in marks if any(mark in str(c) for c in cells)]


def protocol_table(results: Sequence[dict], task: str = "shapes") -> tuple[list[str], list[list[str]]]:
    """Carried cache against re-encoding: each method's paired change against dense (points, ± half
    of the 95 % interval, * when it excludes 0) on the multi-turn types under both protocols, and,
    from the forced-long-generation points, how often and how far the long answers agree with dense
    and the KV cut on that workload (generated tokens dominate it)."""
    results = [r for r in results if task in r["tasks"]]

    def points(keep) -> dict[tuple[str, str], dict]:
        return {(label(r), r["model"]["name"]): r for r in newest_per_label([r for r in results if keep(protocol(r)["task"])])}

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
        if is_dense(r):
            continue
        comps = {key: against_dense_of(group[name], results) if name in group else {}
                 for key, group in (("carry", carry), ("reencode", reencode), ("forced", forced))}
        cells = [name[0], name[1]]
        for qtype in ("multiturn", "dialogue"):
            for key in ("carry", "reencode"):
                cells.append(delta_cell((comps[key].get("deltas") or {}).get(qtype)))
        long = (comps["forced"].get("fidelity") or {}).get("long") or {}
        cells.append("–" if long.get("exact_match") is None else f"{100 * long['exact_match']:.0f} %")
        cells.append("–" if long.get("prefix_agreement") is None else f"{100 * long['prefix_agreement']:.0f} %")
        cells.append("–" if long.get("first_divergence_median") is None else f"{long['first_divergence_median']:g}")
        cut = (comps["forced"].get("kv") or {}).get("reduction")
        cells.append("–" if cut is None else f"{100 * cut:.1f} %")
        rows.append(cells)
    return header, rows




DRIFT = 0.10  # dense timed against itself beyond this: the machine was not steady


def speedup_cell(eff: dict, speedup: str, measure_key: str) -> str:
    """A speed-up of ``eff`` (a result's efficiency) as a table cell, ``1.50 ± 0.23`` with its spread
    (``ratio_spread`` of the timings under ``measure_key``) where measured, ``–`` where absent."""
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
        if not is_dense(r) or not eff:
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
    chosen = [r for r in main_points(results) if r.get("efficiency")]
    noisy = [r["efficiency"].get("noisy") for r in chosen]  # the measurement's verdict (older results: results.load)
    header = ["Method", "Model", "KV MB", "KV cut timing batch", "Mem GB", "Prefill ms", "Decode tok/s", "E2E tok/s",
              "Decode ×", "E2E ×", "Prefill ×", "Device"]
    rows = []
    for warning in timing_drift(chosen):
        print(warning, file=sys.stderr)
    for r, noise in zip(chosen, noisy):
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
            *[speedup_cell(eff, speedup, key) + (f" {NOISE_FLAG}" if noise else "") for speedup, key in SPEEDUPS],
            f"{eff['device']} b={eff['batch_size']} L={eff['prompt_tokens']}",
        ])
    return header, rows


def calibration_table(results: Sequence[dict], task: str = "shapes") -> tuple[list[str], list[list[str]]]:
    """Lazy layers chosen by each rule (uniform, pairwise calibration, anchor calibration, with a
    cap) for each budget, on the main protocol (the default reading, share=qk scope=all): the layers,
    the mean and the largest JS divergence of a lazy layer's attention to its anchor's on the dense
    model (from any calibrated point's pairwise matrix), the paired change against dense and its
    exact match to dense."""
    lazy = [r for r in main_points(results) if r["method"]["name"] == "lazy"
            and r["method"]["params"].get("share", "qk") == "qk" and r["method"]["params"].get("scope", "all") == "all"]
    matrices = [(r["method"]["calibration"]["divergence"], r["model"]["name"]) for r in calibrated_results(lazy)
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
        comp = against_dense_of(r, results)
        exact = (comp.get("fidelity") or {}).get("exact_match")
        rows.append([
            r["model"]["name"], f"{budget(r):g}", rule(r), " ".join(map(str, r["method"]["lazy_layers"])),
            "–" if not js else f"{sum(js.values()) / len(js):.3f}",
            "–" if not js else f"{max(js.values()):.3f}",
            delta_cell(comp.get("score")),
            "–" if exact is None else f"{100 * exact:.0f} %",
        ])
    return header, rows


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
