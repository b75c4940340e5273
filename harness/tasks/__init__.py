"""Tasks: what a run asks the model and how it is scored.

Every task implements one protocol (``Task``), so ``harness.run`` has a single path whatever the
backend; the runner reads nothing else of a task::

    task.check()                                    # data present, settings valid: before any model loads
    task.sizes()                                    # each set's rows, when known before the data load
    task.n                                          # samples scored without a limit (None: every sample)
    task.calibration_prompts(n)                     # prompts for method.layers=auto (never the scored split)
    task.evaluate(loaded, method, limit=..., cache=..., ...)   # -> Evaluation(scores, rows, efficiency_prompt)
    task.work_name                                  # <out_dir>/<work_name>/<variant>/: a backend's own files
    task.summary_key                                # (result.json key, package) of a backend's own numbers
    task.metrics_for(name)                          # the metrics of result.json tasks.<name> (harness.metrics)

``BaseTask`` holds the defaults (no ``n``, accuracy, no backend summary, no calibration), so a task
defines only what differs. ``Evaluation.scores`` maps a result.json task name to ``{"n": N,
"<metric>": value, "<group>": {...}}``; each row is what ``harness.metrics.ROW`` says.

``TASKS`` is the one registry: a ``conf/task`` preset's ``name`` picks a builder, which reads the
preset (its ``backend`` among them) and imports an optional backend only when asked for it;
``register`` adds a task from code alone, its preset included (docs/tasks.md, "Adding a task").
Implementations: ``ShapesTask`` here (the built-in shapes benchmark: it builds
``harness.generate.Conversation``s, ``harness.generate.answer`` answers them, it scores each
answer once), in ``harness.lmms.backend`` the same benchmark asked through lmms-eval and the real
benchmarks that lmms-eval scores, and in ``harness.vlmeval.backend`` VLMEvalKit's datasets.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from harness import compare
from harness.metrics import ACCURACY, SHAPES, Metrics
from harness.config import plain
from harness.registry import Registry
from harness.generate import MULTITURN_MODES, Answer, Conversation, answer, conversation
from harness.tasks import shapes

Prompt = tuple[list[dict], list]  # (chat history with image placeholders, its images)


@dataclasses.dataclass
class Evaluation:
    scores: dict[str, dict[str, Any]]  # task name -> scores
    rows: list[dict]  # one per sample: id, what was asked, the prediction, its per-sample scores
    efficiency_prompt: Prompt | None  # the prompt the efficiency measurement repeats (equal lengths: no padding)
    summary: dict | None = None  # a backend's own results (lmms-eval's), kept in result.json


class Task(Protocol):
    """Everything ``harness.run`` reads of a task (``BaseTask`` gives the defaults)."""

    name: str  # the preset's name (its registry entry)
    n: int | None  # samples scored when limit is null; None: every sample the data hold
    work_name: str  # <out_dir>/<work_name>/<variant>/: where evaluate may write a backend's own files
    summary_key: tuple[str, str] | None  # (result.json key, package whose version goes with it) of Evaluation.summary

    def check(self) -> None:
        """Data present and settings valid, before any model loads; a ValueError of one line otherwise."""

    def sizes(self) -> dict[str, int] | None:
        """How many samples each of the task's sets holds (a limit above it scores fewer), or None
        where that is unbounded or unknown before the data loads."""

    def calibration_prompts(self, n: int) -> list[Prompt]:
        """``n`` prompts for calibration (never the scored split); raise where the task cannot calibrate."""

    def metrics_for(self, name: str) -> Metrics:
        """The metrics of the scores under ``name`` in ``Evaluation.scores`` (``harness.metrics``)."""

    def evaluate(
        self,
        loaded,
        method,
        *,
        limit: int | None,
        batch_size: int,
        device,
        work_dir: Path,
        finished: Mapping[str, dict],
        on_row: Callable[[dict], None],
        cache: str,
    ) -> Evaluation:
        """Score ``method`` on ``loaded``: every row to ``on_row`` as it is done; rows in ``finished``
        (an interrupted run's, by id) need not be asked again; ``cache`` is the run's KV cache kind."""


class BaseTask:
    """The defaults of ``Task``: no default sample count, accuracy, no backend summary, no calibration."""

    work_name = "work"
    summary_key: tuple[str, str] | None = None
    metrics: Metrics = ACCURACY  # the declaration of every score the task reports (metrics_for's default)

    def __getattr__(self, name: str):
        # ``n`` defaults to None without being a class attribute, so that a dataclass task may declare
        # ``n`` as a field without a default, anywhere among its fields (a class attribute would be its default)
        if name == "n":
            return None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def sizes(self) -> dict[str, int] | None:
        return None

    def calibration_prompts(self, n: int) -> list[Prompt]:
        return calibrates_on_shapes_only(self, n)

    def metrics_for(self, name: str) -> Metrics:
        return self.metrics


def calibrates_on_shapes_only(task, n: int):
    """``calibration_prompts`` of a task whose data calibration may not use (a benchmark's own split)."""
    raise ValueError(
        "method.layers=auto calibrates on the shapes val split; run it with task=shapes, then pass the "
        "chosen layers (result.json method.lazy_layers) as method.layers=[...] here."
    )


def first_turn(sample: shapes.Sample, image_size: int) -> Prompt:
    return conversation(sample.questions[:1], []), [sample.image(image_size)]


@dataclasses.dataclass
class ShapesTask(BaseTask):
    """The built-in shapes benchmark: data and scoring live in ``harness.tasks.shapes``."""

    name: str
    split: str
    n: int
    qtypes: Sequence[str]
    image_size: int
    max_new_tokens: dict[str, int] | int  # per turn kind (short, describe, long), or one budget for every turn
    multiturn: str = "carry"  # carry | reencode (harness.generate)
    min_new_tokens: int = 0  # no stop token before this many: forces long generation, as serving benchmarks do

    metrics = SHAPES  # F1 for describe and long, accuracy otherwise; grouped by question type

    def check(self) -> None:
        unknown = [q for q in self.qtypes if q not in shapes.QTYPES]
        if unknown or not self.qtypes:
            raise ValueError(f"task.qtypes {list(unknown or self.qtypes)} unknown; choose from {list(shapes.QTYPES)}.")
        if self.split not in shapes.SPLITS:
            raise ValueError(f"task.split must be one of {list(shapes.SPLITS)}, got {self.split!r}.")
        if self.multiturn not in MULTITURN_MODES:
            raise ValueError(f"task.multiturn must be one of {list(MULTITURN_MODES)}, got {self.multiturn!r}.")
        budgets = [self.max_new_tokens] if isinstance(self.max_new_tokens, int) else list(self.max_new_tokens.values())
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in budgets):
            raise ValueError(f"task.max_new_tokens must be an integer >= 1 (or one per turn kind), got {self.max_new_tokens!r}.")
        if isinstance(self.min_new_tokens, bool) or not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            raise ValueError(f"task.min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}.")
        if self.n < 1:  # n=0 would score nothing and print acc 0.000 as if it were a result
            raise ValueError(f"task.n must be an integer >= 1 (the samples scored without limit), got {self.n!r}.")

    def samples(self, limit: int | None) -> list[shapes.Sample]:
        return shapes.load_split(self.split, self.n if limit is None else int(limit), self.qtypes)

    def calibration_prompts(self, n: int) -> list[Prompt]:
        """Calibration never sees the split being scored: first turns of the val split."""
        return [first_turn(s, self.image_size) for s in shapes.load_split("val", n, self.qtypes)]

    def image(self, sample: shapes.Sample):
        return sample.image(self.image_size)

    def turn_budget(self, turn_type: str) -> int:
        if isinstance(self.max_new_tokens, int):
            return self.max_new_tokens
        if turn_type == "long":
            return self.max_new_tokens.get("long", self.max_new_tokens["describe"])
        return self.max_new_tokens["describe" if turn_type == "describe" else "short"]

    def conversations(self, samples: Sequence[shapes.Sample]) -> list[Conversation]:
        """What the generator is asked: each sample's image, questions and per-turn budgets."""
        return [Conversation.of_questions(s.id, s.questions, [self.turn_budget(t) for t in s.turn_types],
                                          [self.image(s)]) for s in samples]

    def answers(self, model, processor, samples: Sequence[shapes.Sample], batch_size: int, device,
                cache: str = "static") -> Iterator[Answer]:
        """Greedy answers to ``samples``, in order (``harness.generate.answer``)."""
        return answer(model, processor, self.conversations(samples), batch_size, device, self.multiturn,
                      self.min_new_tokens, cache)

    def predictions(self, model, processor, samples: Sequence[shapes.Sample], batch_size: int, device,
                    cache: str = "static") -> list[str]:
        return [a.prediction for a in self.answers(model, processor, samples, batch_size, device, cache)]

    def score(self, samples: Sequence[shapes.Sample], predictions: Sequence[str]) -> dict[str, Any]:
        """The scores of ``predictions`` (``score_rows`` of their rows)."""
        if len(samples) != len(predictions):
            raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
        return self.score_rows([self.row(s, p, None) for s, p in zip(samples, predictions)])

    @staticmethod
    def score_rows(rows: Sequence[dict]) -> dict[str, Any]:
        """Mean scores overall and per question type, each declared metric with its 95 % interval
        (``*_ci95``: ``SHAPES``, Wilson for accuracy, bootstrap for F1), from rows scored once (``row``)."""
        by_type: dict[str, Any] = {}
        for qtype in sorted({r["qtype"] for r in rows}, key=shapes.QTYPES.index):
            sub = [r for r in rows if r["qtype"] == qtype]
            by_type[qtype] = {"n": len(sub)}
            for metric in [m for m in ("acc", "f1", "precision", "recall") if m in sub[0]]:
                by_type[qtype][metric] = sum(r[metric] for r in sub) / len(sub)
            for metric in sorted(SHAPES.metrics, key=lambda m: m.name):  # acc_ci95 before f1_ci95, as ever
                if metric.name in sub[0]:
                    by_type[qtype][f"{metric.name}_ci95"] = compare.ci95(metric, [r[metric.name] for r in sub])
        accuracy = SHAPES.metrics[1]
        every = [r[accuracy.name] for r in rows]
        return {"n": len(rows), "acc": accuracy.aggregate(every), "acc_ci95": compare.ci95(accuracy, every), **by_type}

    def row(self, sample: shapes.Sample, prediction: str, turns: list[str] | None, kv_bytes: list[int] | None = None) -> dict:
        """One sample's row, scored (once) against its last turn."""
        return {
            "id": sample.id,
            "qtype": sample.qtype,
            "questions": sample.questions,
            "answers": sample.answers,
            "turns": turns,
            "prediction": prediction,
            **shapes.score_sample(sample, prediction),
            "kv_bytes": kv_bytes,
        }

    def evaluate(self, loaded, method, *, limit, batch_size, device, work_dir, finished, on_row,
                 cache: str = "static") -> Evaluation:
        """Greedy answers for every sample (those in ``finished`` are kept, not asked again);
        each new row goes to ``on_row`` as soon as its sample is done."""
        samples = self.samples(limit)
        rows = dict(finished)
        todo = [s for s in samples if s.id not in rows]
        by_id = {s.id: s for s in todo}
        with method.apply(loaded.model):
            for ans in self.answers(loaded.model, loaded.processor, todo, batch_size, device, cache):
                rows[ans.id] = self.row(by_id[ans.id], ans.prediction, ans.turns, ans.kv_bytes)
                on_row(rows[ans.id])
        ordered = [rows[s.id] for s in samples]
        return Evaluation(
            scores={self.name: self.score_rows(ordered)},
            rows=ordered,
            efficiency_prompt=first_turn(samples[0], self.image_size),
        )


def shapes_task(cfg) -> ShapesTask:
    """A ``ShapesTask`` from a ``conf/task`` node (``task=shapes``)."""
    return ShapesTask(
        name=cfg.name,
        split=str(cfg.split),
        n=int(cfg.n),
        qtypes=list(cfg.qtypes),
        image_size=int(cfg.image_size),
        max_new_tokens=plain(cfg.max_new_tokens),
        multiturn=str(cfg.get("multiturn", "carry")),
        min_new_tokens=plain(cfg.get("min_new_tokens", 0)),
    )


TASKS = Registry("task")  # a preset's name -> a builder, or "module:attribute" of an optional backend's


def register(name: str, builder: Callable, preset: Mapping[str, Any]) -> Callable:
    """Add a task from code alone: ``builder`` (a ``conf/task`` node -> a ``Task``) under ``name``, and its
    preset (the settings ``task=NAME`` composes to, ``name`` set to ``name``) in Hydra's ConfigStore, so
    ``harness.config.compose(["task=NAME", "task.SETTING=..."])`` runs it like a shipped one."""
    from hydra.core.config_store import ConfigStore

    TASKS.register(name)(builder)
    ConfigStore.instance().store(group="task", name=name, node={**preset, "name": name})
    return builder


def loaded(entry):
    """A registry entry: the object itself, or a ``"module:attribute"`` of an optional backend,
    imported only now (so this module imports no backend, and nothing imports back into it)."""
    if isinstance(entry, str):
        module, _, attribute = entry.partition(":")
        return getattr(importlib.import_module(module), attribute)
    return entry


def build(cfg):
    """The task a ``conf/task`` preset describes, checked (``Task.check``: its data, its settings)
    before any model loads."""
    task = loaded(TASKS.get(str(cfg.name)))(cfg)
    task.check()
    return task


@TASKS.register("shapes")
def _shapes(cfg) -> ShapesTask:
    """task=shapes (built-in) and task=shapes_lmms (the same samples through lmms-eval)."""
    backend = str(cfg.get("backend", "builtin"))
    if backend == "builtin":
        return shapes_task(cfg)
    if backend == "lmms_eval":
        return loaded("harness.lmms.backend:LmmsShapes")(**vars(shapes_task(cfg)))
    if backend == "vlmeval":
        raise ValueError("VLMEvalKit runs its own datasets: use task=vlmeval 'task.datasets=[...]' (the shapes sets: "
                         "python -m harness.vlmeval.export_shapes).")
    raise ValueError(f"task.backend must be one of ['builtin', 'lmms_eval'], got {backend!r}.")


TASKS.register("lmms_eval")("harness.lmms.backend:build_benchmarks")  # task=benchmarks, task=paper
TASKS.register("vlmeval")("harness.vlmeval.backend:build")  # task=vlmeval
