"""Benchmarks. A task adapter turns task config into samples, prompts and scores."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig

from harness.registry import Registry
from harness.tasks import shapes

TASKS = Registry("task")


@dataclasses.dataclass
class ShapesTask:
    """The built-in shapes benchmark: data and scoring live in ``harness.tasks.shapes``."""

    name: str
    split: str
    n: int
    qtypes: Sequence[str]
    image_size: int
    max_new_tokens: dict[str, int]
    backend: str = "builtin"  # or "lmms_eval": the same samples, asked and scored through lmms-eval

    def samples(self, limit: int | None) -> list[shapes.Sample]:
        return shapes.load_split(self.split, self.n if limit is None else int(limit), self.qtypes)

    def calibration_samples(self, n: int) -> list[shapes.Sample]:
        """Calibration never sees the split being scored."""
        return shapes.load_split("val", n, self.qtypes)

    def image(self, sample: shapes.Sample):
        return sample.image(self.image_size)

    def turn_budget(self, turn_type: str) -> int:
        return self.max_new_tokens["describe" if turn_type == "describe" else "short"]

    def score(self, samples: Sequence[shapes.Sample], predictions: Sequence[str]) -> dict[str, Any]:
        by_type = shapes.aggregate(samples, predictions)
        overall = by_type.pop("all")
        return {"n": int(overall["n"]), "acc": overall["acc"], **by_type}

    def score_sample(self, sample: shapes.Sample, prediction: str) -> dict[str, float]:
        return shapes.score_sample(sample, prediction)


@TASKS.register("shapes")
def _shapes(cfg: DictConfig) -> ShapesTask:
    unknown = [q for q in cfg.qtypes if q not in shapes.QTYPES]
    if unknown:
        raise ValueError(f"task.qtypes {unknown} unknown; choose from {list(shapes.QTYPES)}.")
    return ShapesTask(
        name=cfg.name,
        split=cfg.split,
        n=int(cfg.n),
        qtypes=list(cfg.qtypes),
        image_size=int(cfg.image_size),
        max_new_tokens=dict(cfg.max_new_tokens),
        backend=str(cfg.get("backend", "builtin")),
    )


@dataclasses.dataclass
class LmmsBenchmarks:
    """Benchmarks asked and scored by lmms-eval (``harness.lmms.benchmarks``), each one a key in
    result.json's ``tasks``; their datasets are read from ``data_dir`` (None: lmms-eval's own loading)."""

    name: str
    lmms_tasks: list[str]
    data_dir: str | None
    max_new_tokens: int | None = None  # replaces every benchmark's own budget (lmms-eval gen_kwargs)
    backend: str = "lmms_eval"
    found: dict | None = None  # what the dataset check found, so the task YAMLs reuse it


@TASKS.register("lmms_eval")
def _lmms_benchmarks(cfg: DictConfig) -> LmmsBenchmarks:
    data_dir, budget = cfg.get("data_dir"), cfg.get("max_new_tokens")
    if budget is not None and int(budget) < 1:
        raise ValueError(f"task.max_new_tokens must be >= 1 or null, got {budget}.")
    return LmmsBenchmarks(name=cfg.name, lmms_tasks=list(cfg.lmms_tasks),
                          data_dir=None if data_dir in (None, "") else str(data_dir),
                          max_new_tokens=None if budget is None else int(budget))


BACKENDS = ("builtin", "lmms_eval")


def build_task(cfg: DictConfig):
    backend = cfg.get("backend", "builtin")
    if backend not in BACKENDS:
        raise ValueError(f"task.backend must be one of {list(BACKENDS)}, got {backend!r}.")
    task = TASKS.get(cfg.name)(cfg)
    if isinstance(task, LmmsBenchmarks) and backend != "lmms_eval":
        raise ValueError(f"the lmms-eval benchmarks {task.lmms_tasks} run on task.backend=lmms_eval only.")
    if backend == "lmms_eval":
        _check_lmms_eval(task)
    return task


def _check_lmms_eval(task) -> None:
    try:
        import lmms_eval  # noqa: F401
    except ImportError as err:
        raise ValueError(
            f"task.backend=lmms_eval needs lmms-eval, which is not installed ({err}); run `make lmms-install`."
        ) from err
    if isinstance(task, LmmsBenchmarks):
        from harness.lmms.benchmarks import check

        task.found = check(task.lmms_tasks, task.data_dir)  # every dataset is there, before any model loads
        return
    from harness.lmms.export_shapes import check_qtypes

    check_qtypes(task.qtypes)
