"""The metric contract and the row contract: what a task's scores are, and what one scored sample holds.

A task declares its metrics (``Metrics``, returned by ``task.metrics_for(name)`` for each key of
result.json's ``tasks``), as lm-evaluation-harness's ``metric_list`` does: each ``Metric`` has a
name (its key in a row and in the scores), whether higher is better, how samples aggregate and how
its 95 % interval is computed. The metrics are listed in precedence: an entry (one sample's row, a
group's scores, the task's scores over all samples) is judged by the first of them it holds
(``Metrics.judged_by``). The shapes task declares ``f1`` then ``acc``: a description is judged by
F1, every other question and the task over all samples by accuracy.

The run records each task's declaration in result.json (``metrics``), so the headline, the
comparisons with dense, the console, W&B and the report's tables read them from the result alone,
whatever task made it (a registered one included); results written before they were recorded get
them from ``harness.results.load``.

This module imports no model code (the report reads it without torch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

MEAN = "mean"  # the mean of the per-sample values (each row holds the metric): paired deltas are defined

# What one row holds (``Evaluation.rows``, one per sample; samples.jsonl adds ``variant``). The one
# statement of it: ``check_row`` holds a task's rows to it, every reader relies on nothing else.
ROW: dict[str, str] = {
    "id": "required: the sample's id, unique within the run (a run over several tasks: '<task>/<index>'); dense "
          "and the method are paired by it",
    "prediction": "required: the model's answer (of the last turn)",
    "task": "the result.json `tasks` key the sample is scored under; absent: the run's first task",
    "<metric>": "a value of each declared metric aggregated by `mean` (0/1 for accuracy); metrics the scorer "
                "aggregates itself (POPE's F1, CIDEr) have none",
    "<group>": "the task's group (Metrics.group: shapes `qtype`, VLMEvalKit `category`): paired deltas, "
               "fidelity and the tables' columns per group",
    "turns": "every turn's answer (multi-turn samples), or null: fidelity to dense compares all of them",
    "kv_bytes": "the KV cache bytes after each turn, or null: the workload KV cut (`kv_cut_workload`)",
    "target": "the reference answer, when the task has one to show",
    "fidelity": "written by the run: this sample's agreement with dense (exact, prefix, first divergence)",
    "variant": "samples.jsonl only: `dense` or `method`",
}
REQUIRED = ("id", "prediction")


@dataclasses.dataclass(frozen=True)
class Metric:
    """One score a task reports.

    ``aggregation``: ``mean`` (the harness averages the rows' values; paired deltas against dense
    are defined) or the name of the scorer's own aggregate over the whole set (``pope_f1``,
    ``cider``, ...: the row holds no value of it). ``interval``: ``wilson`` (0/1 values), ``bootstrap``
    (values in [0, 1]), ``auto`` (Wilson when every value is 0 or 1, bootstrap otherwise) or None (none computed; lmms-eval's own ``<name>_stderr`` may be in the scores).
    ``scale``: what the tables multiply the value by (100: a fraction printed as a percentage; 1: the
    scorer's own units, e.g. MME's points, MMBench's percentage). ``title``: the tables' name for it."""

    name: str
    higher_is_better: bool = True
    aggregation: str = MEAN
    interval: str | None = "wilson"
    scale: float = 100.0
    title: str | None = None

    def __post_init__(self):
        if self.interval not in ("wilson", "bootstrap", "auto", None):
            raise ValueError(f"Metric {self.name}: interval must be 'wilson', 'bootstrap', 'auto' or None, "
                             f"got {self.interval!r}.")
        if self.interval is not None and self.aggregation != MEAN:
            raise ValueError(f"Metric {self.name}: an interval needs per-sample values (aggregation 'mean').")

    @property
    def per_sample(self) -> bool:
        return self.aggregation == MEAN

    def aggregate(self, values: Sequence[float]) -> float:
        if not self.per_sample:
            raise ValueError(f"{self.name} is aggregated by its scorer ({self.aggregation}), not from rows.")
        return sum(values) / len(values) if values else 0.0

    def shown(self, value: float | None, digits: int = 1) -> str:
        """The value as the tables print it (``scale`` applied), "–" when unknown."""
        return "–" if value is None else f"{self.scale * value:.{digits}f}"


@dataclasses.dataclass(frozen=True)
class Metrics:
    """A task's declared metrics, in precedence, and the row key it groups samples by (or None)."""

    metrics: tuple[Metric, ...]
    group: str | None = None

    def __post_init__(self):
        if not self.metrics:
            raise ValueError("a task declares at least one metric.")

    def judged_by(self, entry: Mapping | None, per_sample: bool = False) -> Metric | None:
        """The metric ``entry`` (a row, a group's or a task's scores) is judged by: the first declared one
        it holds a number of (of those aggregated by ``mean`` only, with ``per_sample``: a row's own score);
        None when it holds none."""
        for metric in self.metrics:
            if per_sample and not metric.per_sample:
                continue
            value = (entry or {}).get(metric.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return metric
        return None

    def score(self, entry: Mapping | None) -> float | None:
        """``entry``'s value of the metric it is judged by (None when it holds none)."""
        metric = self.judged_by(entry)
        return None if metric is None else float(entry[metric.name])

    def row_score(self, row: Mapping) -> float | None:
        """A row's own score: its value of the first declared per-sample metric it holds (None: none)."""
        metric = self.judged_by(row, per_sample=True)
        return None if metric is None else float(row[metric.name])

    def groups(self, scores: Mapping | None) -> dict[str, float]:
        """Each group's score (``score``) in a task's scores (its sub-dicts with ``n``); {} without groups."""
        out = {}
        for key, value in (scores or {}).items():
            if isinstance(value, Mapping) and "n" in value and self.score(value) is not None:
                out[key] = self.score(value)
        return out

    def below(self, scores: Mapping | None, floor: float) -> list[str] | None:
        """The groups of ``scores`` whose score (``groups``) is below ``floor``; None without scores."""
        return None if not scores else [g for g, v in self.groups(scores).items() if v < floor]

    def task_below(self, scores: Mapping | None, floor: float) -> bool | None:
        """Whether the task's score over samples (``score``) is below ``floor``; None without one, or when
        its metric is not a fraction (``Metric.scale`` 1: MME's points, MMBench's percentage)."""
        metric = self.judged_by(scores) if scores else None
        if metric is None or metric.scale != 100:
            return None
        return float(scores[metric.name]) < floor

    def to_json(self) -> dict[str, Any]:
        return {"metrics": [dataclasses.asdict(m) for m in self.metrics], "group": self.group}

    @classmethod
    def from_json(cls, data: Mapping) -> "Metrics":
        return cls(tuple(Metric(**m) for m in data["metrics"]), data.get("group"))


def check_row(row: Mapping) -> Mapping:
    """``row`` when it holds what ``ROW`` requires; a ValueError of one line naming what is missing otherwise."""
    missing = [key for key in REQUIRED if key not in row]
    if missing:
        raise ValueError(f"a task's row lacks {', '.join(missing)} (harness.metrics.ROW): {str(dict(row))[:200]}")
    return row


ACCURACY = Metrics((Metric("acc", title="Acc"),))  # a task that declares nothing: accuracy per sample
# The built-in shapes benchmark: descriptions (describe, long) by F1, everything else by accuracy.
SHAPES = Metrics((Metric("f1", interval="auto", title="F1"), Metric("acc", title="Acc")), group="qtype")


def inferred(name: str, scores: Mapping) -> Metrics:
    """The declaration of the scores ``name`` written before results recorded one: the shapes task's
    (``shapes``), accuracy where the scores hold it (VLMEvalKit's datasets), else their numeric keys as
    they come (``harness.results.load`` gives an lmms-eval benchmark's its own first)."""
    if name == "shapes":
        return SHAPES
    if "acc" in scores:
        return ACCURACY
    numeric = [k for k, v in scores.items() if k != "n" and "stderr" not in k and isinstance(v, (int, float))
               and not isinstance(v, bool)]
    return Metrics(tuple(Metric(k, aggregation="scorer", interval=None) for k in numeric)) if numeric else ACCURACY


def of_result(result: Mapping, task: str) -> Metrics:
    """The declaration of ``task``'s scores in ``result`` (recorded by the run; inferred for older results)."""
    declared = (result.get("metrics") or {}).get(task)
    if declared:
        return Metrics.from_json(declared)
    return inferred(task, (result.get("tasks") or {}).get(task) or {})
