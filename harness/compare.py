"""A method against dense on the same samples: intervals, paired differences, fidelity, workload KV.

Every function works on per-sample rows (what ``samples.jsonl`` holds), so a run that scored
dense beside its method and the report that pairs two sweep points compute the same numbers.

- ``wilson``: 95 % Wilson score interval of a proportion (accuracy: each sample right or wrong).
- ``bootstrap``: 95 % percentile bootstrap interval of a mean (F1 scores), seeded.
- ``paired_delta``: method minus dense on the same samples, with a 95 % paired bootstrap interval
  (samples resampled together); identical predictions give exactly 0 with a zero-width interval.
- ``deltas``, ``score_delta``: paired differences of the metrics a task declares (``harness.metrics``).
- ``fidelity``: whether the method's generated tokens equal dense's, how long their common prefix
  is relative to dense's output, and where they first diverge (token counts over all turns).
- ``kv_workload``: the mean over samples of each sample's peak KV cache bytes.
- ``against_dense``: all of the above for one method against dense, the one builder of that comparison.
- ``record_against_dense``: what a run's result.json says of its method against the dense it scored beside it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

import numpy as np

from harness.metrics import ACCURACY, Metric, Metrics

Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 2000


def wilson(successes: float, n: int) -> list[float]:
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return [lo, hi]


def bootstrap(values: Sequence[float], seed: int = 0) -> list[float]:
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return [0.0, 0.0]
    idx = np.random.default_rng(seed).integers(0, len(x), size=(BOOTSTRAP_RESAMPLES, len(x)))
    means = x[idx].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def interval(values: Sequence[float]) -> list[float]:
    """Wilson for 0/1 values (accuracy), bootstrap otherwise (F1)."""
    if all(v in (0.0, 1.0) for v in values):
        return wilson(sum(values), len(values))
    return bootstrap(values)


def ci95(metric: Metric, values: Sequence[float]) -> list[float] | None:
    """The 95 % interval of ``metric``'s per-sample ``values`` as the metric declares it (``Metric.interval``:
    Wilson, bootstrap, ``auto``: Wilson for 0/1 values, bootstrap otherwise), or None where it declares none."""
    if metric.interval == "wilson":
        return wilson(sum(values), len(values))
    if metric.interval == "bootstrap":
        return bootstrap(values)
    if metric.interval == "auto":
        return interval(values)
    return None


def paired_delta(method: Sequence[float], dense: Sequence[float], seed: int = 0) -> dict:
    diff = np.asarray(method, dtype=float) - np.asarray(dense, dtype=float)
    if len(diff) == 0:
        return {"delta": None, "delta_ci95": None, "n": 0}
    lo, hi = bootstrap(diff, seed)
    return {"delta": float(diff.mean()), "delta_ci95": [lo, hi], "n": int(len(diff))}


def paired(method_rows: Sequence[dict], dense_rows: Sequence[dict]) -> list[tuple[dict, dict]]:
    """Method and dense rows of the same samples (by id), in the method's order."""
    dense = {r["id"]: r for r in dense_rows}
    return [(m, dense[m["id"]]) for m in method_rows if m["id"] in dense]


def common_metric(rows: Sequence[dict], metrics: Metrics) -> Metric | None:
    """The metric a set of rows is judged by together: the first declared per-sample one every row holds
    (shapes: F1 for a group of descriptions, accuracy over every sample); None when there is none."""
    for metric in metrics.metrics:
        if metric.per_sample and rows and all(isinstance(r.get(metric.name), (int, float)) for r in rows):
            return metric
    return None


def deltas(method_rows: Sequence[dict], dense_rows: Sequence[dict], metrics: Metrics,
           group: str | None = None) -> dict:
    """Paired differences overall (``all``) and per ``group`` (the task's declared group unless given),
    each of the metric its rows are judged by together (``common_metric``: accuracy over all of
    shapes' samples, F1 for its descriptions); a set of rows without one is left out."""
    pairs = paired(method_rows, dense_rows)
    group = group or metrics.group
    out = {}
    for key in ["all", *(dict.fromkeys(m.get(group) for m, _ in pairs) if group else [])]:
        sub = pairs if key == "all" else [(m, d) for m, d in pairs if m.get(group) == key]
        metric = common_metric([r for pair in sub for r in pair], metrics)
        if metric is not None:
            out[key] = {"metric": metric.name, **paired_delta([m[metric.name] for m, _ in sub],
                                                                [d[metric.name] for _, d in sub])}
    return out


def score_delta(method_rows: Sequence[dict], dense_rows: Sequence[dict], metrics: Metrics) -> dict | None:
    """The paired change of the per-sample score: each pair by the first declared per-sample metric its
    method row holds (shapes: F1 for a description, accuracy otherwise), when dense's row holds it too;
    None where a pair has no such score (an lmms-eval benchmark scored by its own aggregate only)."""
    pairs = paired(method_rows, dense_rows)
    judged = [metrics.judged_by(m, per_sample=True) for m, _ in pairs]
    if not pairs or any(j is None or j.name not in d for j, (_, d) in zip(judged, pairs)):
        return None
    return paired_delta([m[j.name] for j, (m, _) in zip(judged, pairs)], [d[j.name] for j, (_, d) in zip(judged, pairs)])


def words(text: str) -> list[str]:
    return text.split()


def sample_fidelity(method_tokens: Sequence, dense_tokens: Sequence) -> dict:
    common = 0
    for a, b in zip(method_tokens, dense_tokens):
        if a != b:
            break
        common += 1
    exact = list(method_tokens) == list(dense_tokens)
    return {
        "exact": exact,
        "prefix_agreement": 1.0 if not dense_tokens else common / len(dense_tokens),
        "first_divergence": None if exact else common,
        "dense_tokens": len(dense_tokens),
    }


def transcript(row: dict, tokenize: Callable[[str], list]) -> list:
    turns = row.get("turns") or [row["prediction"]]
    return [token for turn in turns for token in tokenize(turn)]


def fidelity(method_rows: Sequence[dict], dense_rows: Sequence[dict], tokenize: Callable[[str], list] = words,
             group: str | None = "qtype") -> tuple[dict, list[dict]]:
    """Summary (overall and per group) and per-sample fidelity of the method's outputs to dense's."""
    pairs = paired(method_rows, dense_rows)
    per = [sample_fidelity(transcript(m, tokenize), transcript(d, tokenize)) for m, d in pairs]

    def summary(items: list[dict]) -> dict:
        diverged = [f["first_divergence"] for f in items if f["first_divergence"] is not None]
        return {
            "n": len(items),
            "exact_match": sum(f["exact"] for f in items) / len(items) if items else None,
            "prefix_agreement": sum(f["prefix_agreement"] for f in items) / len(items) if items else None,
            "first_divergence_median": statistics.median(diverged) if diverged else None,
        }

    out = summary(per)
    for key in dict.fromkeys(m.get(group) for m, _ in pairs) if group else []:
        out[key] = summary([f for (m, _), f in zip(pairs, per) if m.get(group) == key])
    return out, per


def agreement_curve(per_sample: Sequence[dict], max_tokens: int) -> list[float | None]:
    """For t = 1 .. max_tokens: of the samples whose dense output has at least t tokens, the
    fraction whose method output agrees with dense on all of the first t."""
    curve = []
    for t in range(1, max_tokens + 1):
        eligible = [f for f in per_sample if f["dense_tokens"] >= t]
        agree = [f for f in eligible if f["first_divergence"] is None or f["first_divergence"] >= t]
        curve.append(len(agree) / len(eligible) if eligible else None)
    return curve


def peak_kv(row: dict) -> int | None:
    sizes = row.get("kv_bytes")
    return max(sizes) if sizes else None


def kv_workload(method_rows: Sequence[dict], dense_rows: Sequence[dict] | None = None) -> dict | None:
    """Mean peak KV bytes per sample of the method (and of dense on the same samples)."""
    method = [peak_kv(r) for r in method_rows]
    if not method or any(v is None for v in method):
        return None
    out = {"method_bytes_mean": sum(method) / len(method), "dense_bytes_mean": None, "reduction": None}
    if dense_rows:
        pairs = paired(method_rows, dense_rows)
        dense = [peak_kv(d) for _, d in pairs]
        if pairs and all(v is not None for v in dense):
            out["dense_bytes_mean"] = sum(dense) / len(dense)
            out["reduction"] = 1.0 - sum(peak_kv(m) for m, _ in pairs) / sum(dense)
    return out


def against_dense(method_rows: Sequence[dict], dense_rows: Sequence[dict] | None, metrics: Metrics,
                  group: str | None = None, tokenize: Callable[[str], list] = words) -> dict:
    """The method against dense on the same samples (paired by id), the one comparison result.json, the
    headline and every table read: ``n`` pairs; ``score``, the paired change of the per-sample score
    (``score_delta``); ``deltas``, overall and per group (``deltas``); ``fidelity`` (summary, overall and
    per group) and ``per_sample`` (a (method row, its fidelity) per pair); ``kv``, the workload KV
    (``kv_workload``: the method's alone when there is no dense). ``group``: the task's declared one
    unless given."""
    dense_rows = list(dense_rows or [])
    group = group or metrics.group
    pairs = paired(method_rows, dense_rows)
    fid, per_sample = fidelity(method_rows, dense_rows, tokenize, group) if pairs else ({}, [])
    return {
        "n": len(pairs),
        "score": score_delta(method_rows, dense_rows, metrics),
        "deltas": deltas(method_rows, dense_rows, metrics, group) if pairs else {},
        "fidelity": fid,
        "per_sample": [(m, f) for (m, _), f in zip(pairs, per_sample)],
        "kv": kv_workload(method_rows, dense_rows) if method_rows else None,
    }


def record_against_dense(rows: dict[str, list[dict]], scores: dict, declared: dict[str, Metrics], processor) -> dict:
    """What result.json says of the method against dense on the same samples (``against_dense``,
    each task by the metrics it declares): returns the top-level keys, the workload KV cache
    (``kv_workload``) and, when dense was scored too, ``fidelity`` to dense's outputs (token by token,
    overall and per group: the one task's declared group, or per task when a run scores several);
    writes each method row's own ``fidelity`` into it (samples.jsonl) and the paired differences with
    their 95 % intervals into the task's scores (``delta``, ``delta_ci95``: overall and per group)."""
    method, dense = rows["method"], rows.get("dense")
    out = {"kv_workload": kv_workload(method, dense)}
    if not dense:
        return out
    first = next(iter(scores), None)
    one = declared.get(first) if len(scores) == 1 else None
    group = (one.group if one else None) or ("task" if method and "task" in method[0] else None)
    tokenizer = getattr(processor, "tokenizer", processor)
    versus = against_dense(method, dense, one or ACCURACY, group=group,
                                   tokenize=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])
    out["fidelity"] = versus["fidelity"]
    for row, fid in versus["per_sample"]:
        row["fidelity"] = fid
    for name, task_scores in scores.items():
        def of_task(variant_rows, name=name):
            return [r for r in variant_rows if r.get("task", first) == name]

        task_group = declared[name].group if one else None
        for key, delta in deltas(of_task(method), of_task(dense), declared[name], task_group).items():
            target = task_scores if key == "all" else task_scores.get(key)
            if isinstance(target, dict):
                target.update({"delta": delta["delta"], "delta_ci95": delta["delta_ci95"]})
    return out
