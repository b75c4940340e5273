"""Finding and pairing results: every result.json under a folder (``harness.results.load``), their
protocols, labels and order, the dense rows each one is compared with, and method-against-method
comparisons. Everything here returns numbers or rows; nothing renders."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from harness import compare, headline, metrics, results
from harness.metrics import Metrics
from harness.headline import is_dense
from harness.results import config_key
from lazyattn import METHODS, anchors_of


class NothingToRender(ValueError):
    """The results hold nothing a table or figure shows (one line: what they hold, what renders it)."""


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


def newest_per_label(results: Sequence[dict]) -> list[dict]:
    """One result per (protocol, label): the newest (the others named on stderr), in table order."""
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
        if is_dense(other) and config_key(protocol(other)) == key:
            return rows_of(other)
    return []


def dense_scores(result: dict, results: Sequence[dict], task: str) -> dict | None:
    """Dense's scores of ``task`` on the same protocol: the run's own ``tasks_dense`` or a dense
    point with equal settings (a dense result is its own); None when there is none."""
    if is_dense(result):
        return result["tasks"].get(task)
    own = (result.get("tasks_dense") or {}).get(task)
    if own:
        return own
    key = config_key(protocol(result))
    for other in results:
        if is_dense(other) and config_key(protocol(other)) == key and task in other["tasks"]:
            return other["tasks"][task]
    return None


def headline_of(result: dict, results: Sequence[dict], task: str | None = None) -> dict:
    """``harness.headline.compute`` for a result among ``results``: paired with its own dense
    variant or a dense point of the same protocol, as every table pairs it."""
    task = task or next(iter(result["tasks"]))
    return headline.compute(result, rows_of(result), dense_rows(result, results), dense_scores(result, results, task),
                            task)


def score_groups(results: Sequence[dict], task: str) -> list[str]:
    """The groups ``task`` was scored by in ``results`` (the keys of its per-group scores, such as
    shapes' question types), in the order first seen."""
    cols: list[str] = []
    for r in results:
        for key, value in r["tasks"].get(task, {}).items():
            if isinstance(value, dict) and key not in cols:
                cols.append(key)
    return cols


def metrics_of(result: dict, task: str | None = None) -> Metrics:
    """The metrics ``task`` (the result's first unless given) declared (``harness.metrics.of_result``)."""
    return metrics.of_result(result, task or next(iter(result["tasks"]), ""))


def delta_cell(delta: dict | None, scale: float = 100) -> str:
    """``Δ ± half-width`` of a paired difference; a * marks an interval that excludes 0."""
    if not delta or delta.get("delta") is None:
        return "–"
    lo, hi = delta["delta_ci95"]
    star = "*" if lo > 0 or hi < 0 else ""
    return f"{scale * delta['delta']:+.1f} ± {scale * (hi - lo) / 2:.1f}{star}"


def against_dense_of(result: dict, results: Sequence[dict]) -> dict:
    """``harness.compare.against_dense`` for a result among ``results`` (fidelity over whitespace tokens),
    paired with its own dense variant or a dense point of the same protocol; {} for dense itself or
    a result with no dense rows."""
    method, dense = rows_of(result), dense_rows(result, results)
    if not method or not dense or is_dense(result):
        return {}
    return compare.against_dense(method, dense, metrics_of(result))


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
    return newest_per_label(chosen)


def with_in_run_dense(points: Sequence[dict], task: str) -> list[dict]:
    """``points`` plus, for every protocol that has no dense point, a "Dense (in-run)" row made from
    the ``tasks_dense`` of the first point that scored dense beside itself (``compare_dense=true``)."""
    have = {config_key(protocol(r)) for r in points if is_dense(r)}
    out = list(points)
    for r in points:
        key = config_key(protocol(r))
        if key in have or task not in (r.get("tasks_dense") or {}):
            continue
        have.add(key)
        out.append({**r, "tasks": r["tasks_dense"], "efficiency": None, "_in_run_dense": True,
                    "_timed_beside": r.get("efficiency"),  # the method's timing, dense's numbers in it
                    "method": {"name": "dense", "label": "Dense (in-run)", "sort_key": [], "params": {}, "series": "dense"}})
    return sorted(out, key=_sort_key)


def unpaired(points: Sequence[dict], results: Sequence[dict]) -> list[str]:
    """A note for every method point with no dense rows of its own protocol (its Δ stays blank),
    naming what differs from the dense points there are (model, task settings, limit or seed)."""
    notes = []
    dense = [protocol(r) for r in results if is_dense(r)]
    for r in points:
        if is_dense(r) or dense_rows(r, results):
            continue
        mine = protocol(r)
        differs = sorted({k for d in dense for k in mine if mine[k] != d[k]}) if dense else []
        why = f"the dense points differ in {', '.join(differs)}" if differs else "there is no dense point"
        notes.append(f"note: {label(r)} ({r['_path']}) has no dense baseline of the same protocol ({why}): "
                     "its Δ is left blank; run dense with the same settings (+exp=sweep_dense) or compare_dense=true.")
    return notes


def calibrated_results(results: Sequence[dict]) -> list[dict]:
    """The results whose method recorded a calibration (its dense layer divergences)."""
    return [r for r in results if (r["method"].get("calibration") or {}).get("adjacent_js")]


def anchor_js(result: dict, divergence: Sequence[Sequence[float]]) -> dict[int, float]:
    """The dense model's JS divergence between each lazy layer of ``result`` and its anchor (the
    nearest preceding non-lazy layer), from the pairwise matrix ``divergence``."""
    anchor_of = anchors_of(result["method"]["lazy_layers"], len(divergence))
    return {lazy: divergence[anchor][lazy] for lazy, anchor in anchor_of.items()}


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
    declared = metrics_of(points[a])
    return compare.paired_delta([declared.row_score(x) for x, _ in pairs], [declared.row_score(y) for _, y in pairs])
