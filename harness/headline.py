"""The headline numbers of a result: one definition each, used by the console, ``result.json``'s
``headline``, W&B (``headline/<key>``) and the report's tables and figures alike.

Accuracy and KV numbers are fractions (0-1) here, in ``result.json`` and in W&B; tables print
them as percentages. Two KV cuts exist and are never mixed: the workload's (the mean per-sample
peak KV cache over the scored samples, every turn and generated token) and the timing batch's
(one synthetic batch, the first prompt repeated, timed by ``harness.measure``). Throughput is
measured on the timing batch only.

A question type on which dense itself scores below ``DENSE_FLOOR`` is one dense cannot do (the
tiny model's ``long``: F1 0): it stays in ``acc_mean_types`` but is left out of
``acc_mean_types_capable`` and flagged wherever it is shown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from harness import compare, metrics as declared
from harness.measure import ACHIEVED_MAX, NOISE_FRACTION  # the timing's own verdict's thresholds
from harness.metrics import Metrics

DENSE_FLOOR = 0.10  # dense below this on a question type, or on a whole task: one dense cannot do

# key -> what it is; the order is the order of the console's headline block and of W&B's keys.
KEYS: dict[str, str] = {
    "acc_mean_types": "mean over question types (the task's groups) of each type's score, by the metric it is judged "
                      "by (harness.metrics: F1 for describe and long, accuracy otherwise)",
    "acc_mean_types_capable": f"acc_mean_types over the types dense scores at least {DENSE_FLOOR:.0%} on "
                              "(dense_below_floor left out; null without dense)",
    "dense_below_floor": f"the question types dense scores below {DENSE_FLOOR:.0%} on (null without dense)",
    "dense_task_below_floor": f"whether dense scores below {DENSE_FLOOR:.0%} on the whole task (its primary "
                              "score over samples): a task dense cannot do, on which a delta means nothing "
                              "(null without dense)",
    "acc_samples": "the task's score over samples by its declared metric (shapes: accuracy, every sample right or "
                   "wrong, describe and long by exact match)",
    "delta_score": "method minus dense on the same samples: the mean change of the per-sample score (each sample "
                   "by the metric it is judged by: F1 for describe and long), paired",
    "delta_score_ci95": "its 95 % paired-bootstrap interval",
    "exact_match": "fraction of samples whose generated tokens equal dense's",
    "kv_cut_workload": "1 - method / dense mean per-sample peak KV bytes on the scored samples",
    "kv_bytes_workload": "the method's mean per-sample peak KV bytes on the scored samples",
    "kv_cut_timing_batch": "1 - method / dense peak KV bytes of the synthetic timing batch",
    "kv_bytes_timing_batch": "the method's peak KV bytes of the timing batch",
    "decode_speedup_timing_batch": "method / dense decode tokens/s on the timing batch (interleaved, one process)",
    "prefill_speedup_timing_batch": "dense / method prefill ms on the timing batch",
    "e2e_speedup_timing_batch": "method / dense end-to-end tokens/s on the timing batch",
    "decode_tokens_per_s_timing_batch": "the method's decode tokens/s on the timing batch",
    "timing_noisy": f"whether the timing batch's speed-ups are noise: a spread wider than {NOISE_FRACTION:.0%} of a "
                    f"speed-up, or over {ACHIEVED_MAX:.0%} of the bytes prediction achieved (null without timing)",
    "timing_noise": "why timing_noisy is true, one line (null otherwise)",
}


def is_dense(result: dict) -> bool:
    """Whether ``result`` is a dense point (method ``dense``, or the "Dense (in-run)" row made from a
    run's own dense variant): the baseline the other results of its protocol are paired with."""
    return result["method"]["name"] == "dense"


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def compute(result: Mapping, method_rows: Sequence[dict] | None = None, dense_rows: Sequence[dict] | None = None,
            dense_scores: Mapping | None = None, task: str | None = None) -> dict[str, Any]:
    """The headline of ``result`` (its first task unless ``task``). ``method_rows`` and
    ``dense_rows`` are the per-sample rows of the method and of dense on the same protocol (the
    run's own dense variant or a dense point), ``dense_scores`` dense's scores of the task; a
    dense result is its own baseline. Keys that cannot be computed are None."""
    task = task or next(iter(result["tasks"]), None)
    scores = result["tasks"].get(task, {}) if task else {}
    dense_run = is_dense(result)
    metrics = declared.of_result(result, task) if task else declared.ACCURACY
    if dense_run:
        dense_scores = dense_scores or scores
    per_type = metrics.groups(scores)
    flagged = metrics.below(dense_scores, DENSE_FLOOR)  # the types dense cannot do (None: dense unknown)
    out: dict[str, Any] = dict.fromkeys(KEYS)
    out["acc_mean_types"] = _mean(list(per_type.values()))
    if flagged is not None:
        out["dense_below_floor"] = flagged
        out["acc_mean_types_capable"] = _mean([v for t, v in per_type.items() if t not in flagged])
    out["dense_task_below_floor"] = metrics.task_below(dense_scores, DENSE_FLOOR)
    out["acc_samples"] = metrics.score(scores)
    dense_rows = [] if dense_run else list(dense_rows or [])
    versus = compare.against_dense(list(method_rows or []), dense_rows, metrics)
    if versus["score"] is not None:
        out["delta_score"], out["delta_score_ci95"] = versus["score"]["delta"], versus["score"]["delta_ci95"]
        out["exact_match"] = versus["fidelity"].get("exact_match")
    kv = versus["kv"]
    if kv:
        out["kv_bytes_workload"] = kv["method_bytes_mean"]
        out["kv_cut_workload"] = 0.0 if dense_run else kv["reduction"]
    eff = result.get("efficiency") or {}
    if eff:
        m = eff.get("method") or {}
        out["kv_cut_timing_batch"] = eff.get("kv_reduction")
        out["kv_bytes_timing_batch"] = m.get("kv_cache_bytes")
        out["decode_speedup_timing_batch"] = eff.get("decode_speedup")
        out["prefill_speedup_timing_batch"] = eff.get("prefill_speedup")
        out["e2e_speedup_timing_batch"] = eff.get("e2e_speedup")
        out["decode_tokens_per_s_timing_batch"] = m.get("decode_tokens_per_s")
        # the measurement's own verdict (harness.measure; results.load gives older results theirs)
        out["timing_noisy"], out["timing_noise"] = eff.get("noisy"), eff.get("noise")
    return out


def percent(value: float | None, digits: int = 1) -> str:
    """A fraction as the tables print it (``12.5``), "–" when unknown."""
    return "–" if value is None else f"{100 * value:.{digits}f}"
