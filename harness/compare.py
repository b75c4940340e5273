"""A method against dense on the same samples: intervals, paired differences, fidelity, workload KV.

Every function works on per-sample rows (what ``samples.jsonl`` holds), so a run that scored
dense beside its method and the report that pairs two sweep points compute the same numbers.

- ``wilson``: 95 % Wilson score interval of a proportion (accuracy: each sample right or wrong).
- ``bootstrap``: 95 % percentile bootstrap interval of a mean (F1 scores), seeded.
- ``paired_delta``: method minus dense on the same samples, with a 95 % paired bootstrap interval
  (samples resampled together); identical predictions give exactly 0 with a zero-width interval.
- ``fidelity``: whether the method's generated tokens equal dense's, how long their common prefix
  is relative to dense's output, and where they first diverge (token counts over all turns).
- ``kv_workload``: the mean over samples of each sample's peak KV cache bytes.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

import numpy as np

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


def paired_delta(method: Sequence[float], dense: Sequence[float], seed: int = 0) -> dict:
    diff = np.asarray(method, dtype=float) - np.asarray(dense, dtype=float)
    if len(diff) == 0:
        return {"delta": None, "delta_ci95": None, "n": 0}
    lo, hi = bootstrap(diff, seed)
    return {"delta": float(diff.mean()), "delta_ci95": [lo, hi], "n": int(len(diff))}


def metric_of(row: dict) -> str:
    """The score a row is judged by: F1 for descriptions, accuracy otherwise."""
    return "f1" if "f1" in row else "acc"


def paired(method_rows: Sequence[dict], dense_rows: Sequence[dict]) -> list[tuple[dict, dict]]:
    """Method and dense rows of the same samples (by id), in the method's order."""
    dense = {r["id"]: r for r in dense_rows}
    return [(m, dense[m["id"]]) for m in method_rows if m["id"] in dense]


def deltas(method_rows: Sequence[dict], dense_rows: Sequence[dict], group: str = "qtype") -> dict:
    """Paired differences overall (``all``, accuracy of every sample) and per ``group``."""
    pairs = paired(method_rows, dense_rows)
    out = {"all": paired_delta([m["acc"] for m, _ in pairs], [d["acc"] for _, d in pairs])}
    for key in dict.fromkeys(m.get(group) for m, _ in pairs):
        sub = [(m, d) for m, d in pairs if m.get(group) == key]
        metric = metric_of(sub[0][0])
        out[key] = {"metric": metric, **paired_delta([m[metric] for m, _ in sub], [d[metric] for _, d in sub])}
    return out


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
             group: str = "qtype") -> tuple[dict, list[dict]]:
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
    for key in dict.fromkeys(m.get(group) for m, _ in pairs):
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
