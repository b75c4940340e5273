"""``task.backend=lmms_eval``: score a task through lmms-eval's ``simple_evaluate``, in process.

The model the harness already loaded is wrapped as the ``lazyattn`` lmms-eval model with the
variant's method (dense or the method under test); lmms-eval builds the requests, the model
answers them greedily with the built-in path's generation function, and lmms-eval aggregates
the scores. They are returned in the built-in result shape::

    {"n": N, "acc": ..., "<subtask>": {"n": n, "<metric>": ...}, ...}

where a subtask's key is its lmms-eval name less the group's prefix (``lazyattn_shapes_colour``
-> ``colour``). Efficiency is not measured here: lmms-eval's wall clock is no benchmark, the
harness's own loop (harness/measure.py) is.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from harness.lmms import benchmarks, export_shapes
from harness.generate import conversation
from harness.metrics import Metrics
from harness.tasks import BaseTask, Evaluation, ShapesTask

_DROP = ("alias", "samples", "sample_len", "name")


def _metrics(entry: dict) -> dict[str, Any]:
    """lmms-eval's ``{"acc,none": x, "acc_stderr,none": s, "alias": ...}`` -> ``{"acc": x, "acc_stderr": s}``
    (metrics whose aggregation only writes a file, such as ``submission``, have no value or an empty one: left out)."""
    out = {}
    for key, value in entry.items():
        metric, _, _filter = key.partition(",")
        if metric in _DROP or value is None or isinstance(value, str) and value == "N/A":
            continue
        if isinstance(value, (list, tuple, dict)) and not value:  # e.g. VizWiz's unscored `submission`
            continue
        out[metric] = value  # lmms-eval's standard errors are kept as <metric>_stderr
    return out


def to_scores(results: dict, group: str, subtasks: list[str]) -> dict[str, Any]:
    """The built-in result shape from lmms-eval's results for ``group`` and its ``subtasks``."""
    n_of = {name: int(results["n-samples"][name]["effective"]) for name in subtasks}
    scores: dict[str, Any] = {"n": sum(n_of.values())}
    scores |= _metrics(results["results"][group]) if group in results["results"] else {}
    for name in subtasks:
        key = name.removeprefix(f"{group}_")
        scores[key] = {"n": n_of[name], **_metrics(results["results"][name])}
    return scores


def predictions_by_id(results: dict, subtasks: list[str]) -> dict[str, str]:
    out = {}
    for name in subtasks:
        for row in results["samples"][name]:
            prediction = row["filtered_resps"][0]
            out[row["doc"]["id"]] = prediction if isinstance(prediction, str) else str(prediction)
    return out


def evaluate_shapes(task, loaded, method, samples, batch_size: int, device, work_dir: Path):
    """Predictions (in ``samples`` order), scores and lmms-eval's own result summary for one variant."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from harness.lmms.model import LazyAttnLMM

    work_dir = Path(work_dir)
    names = export_shapes.write_task_dir(
        samples, task.qtypes, task.image_size, work_dir, task.max_new_tokens, cache_dir=work_dir / "hf_datasets"
    )
    subtasks, group = names[:-1], names[-1]
    lmm = LazyAttnLMM.from_loaded(loaded, method, device, batch_size=batch_size)
    results = simple_evaluate(
        model=lmm,
        tasks=[group],
        task_manager=TaskManager("WARNING", include_path=str(work_dir), include_defaults=False),
        batch_size=batch_size,
        device=str(device),
        log_samples=True,
        bootstrap_iters=0,
        verbosity="WARNING",
        process_docs_parallel=1,
    )
    by_id = predictions_by_id(results, subtasks)
    missing = [s.id for s in samples if s.id not in by_id]
    if missing:
        raise RuntimeError(f"lmms-eval returned no prediction for samples {missing[:5]}")
    summary = {k: results[k] for k in ("results", "n-samples", "versions") if k in results}
    return [by_id[s.id] for s in samples], to_scores(results, group, subtasks), summary


@dataclasses.dataclass
class BenchmarkRun:
    scores: dict[str, dict[str, Any]]  # per lmms-eval task: {"n": N, "<metric>": value, ..., "protocol": note}
    rows: list[dict]  # one per document: task, id, target, prediction, per-sample metrics
    summary: dict  # lmms-eval's own results, n-samples, versions
    first_prompt: tuple | None  # (chat history, images) of the first request: the efficiency prompt


def _sample_metrics(row: dict, metrics: set[str]) -> dict[str, Any]:
    out = {}
    for metric in metrics:
        value = row.get(metric)
        if isinstance(value, dict):
            value = value.get("score")
        if isinstance(value, (int, float, bool)):
            out[metric] = value
    return out


def evaluate_benchmarks(task, loaded, method, limit, batch_size: int, device, work_dir: Path) -> BenchmarkRun:
    """One variant on every benchmark of ``task`` (``harness.tasks.LmmsBenchmarks``), in one
    ``simple_evaluate`` over local task YAMLs written to ``work_dir/tasks``."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from harness.lmms.model import LazyAttnLMM

    work_dir = Path(work_dir).resolve()
    names = benchmarks.expand(task.lmms_tasks)
    local = benchmarks.write_task_dir(names, task.data_dir, work_dir / "tasks", found=task.found)
    lmm = LazyAttnLMM.from_loaded(loaded, method, device, batch_size=batch_size)
    offline = benchmarks.hub_offline() if task.data_dir is not None else contextlib.nullcontext()
    with offline:
        results = simple_evaluate(
            model=lmm,
            tasks=local,
            task_manager=TaskManager("WARNING", include_path=str(work_dir / "tasks"), include_defaults=False),
            batch_size=batch_size,
            device=str(device),
            limit=None if limit is None else int(limit),
            gen_kwargs=None if task.max_new_tokens is None else f"max_new_tokens={task.max_new_tokens}",
            log_samples=True,
            bootstrap_iters=0,
            verbosity="WARNING",
            process_docs_parallel=1,
            # as from the CLI: submission files land in work_dir (not the cwd), results see docs without media
            cli_args=argparse.Namespace(output_path=str(work_dir), process_with_media=False),
        )
    scores, rows = {}, []
    for name, lname in zip(names, local):
        metrics = _metrics(results["results"][lname])
        scores[name] = benchmarks.with_protocol(name, {"n": int(results["n-samples"][lname]["effective"]), **metrics})
        for row in results["samples"][lname]:
            prediction = row["filtered_resps"][0] if isinstance(row["filtered_resps"], list) else row["filtered_resps"]
            rows.append({"task": name, "id": f"{name}/{row['doc_id']}", "target": row.get("target"),
                         "prediction": str(prediction), **_sample_metrics(row, set(metrics))})
    summary = {k: results[k] for k in ("results", "n-samples", "versions") if k in results}
    # POPE's three subsets also as their mean (pope_full: mean F1, the references' POPE number)
    return BenchmarkRun(benchmarks.combine(scores), rows, summary, lmm.first_prompt)


def require_lmms_eval() -> None:
    try:
        import lmms_eval  # noqa: F401
    except ImportError as err:
        raise ValueError(
            f"task.backend=lmms_eval needs lmms-eval, which is not installed ({err}); run `make lmms-install`."
        ) from err


@dataclasses.dataclass
class LmmsShapes(ShapesTask):
    """The shapes benchmark asked and scored through lmms-eval: the same samples, prompts and
    scorer as the built-in path, single-turn question types only."""

    work_name = "lmms_eval"  # <out_dir>/lmms_eval/<variant>/: the exported task and lmms-eval's files
    summary_key = ("lmms_eval", "lmms_eval")

    def check(self) -> None:
        super().check()
        require_lmms_eval()
        export_shapes.check_qtypes(self.qtypes)

    def evaluate(self, loaded, method, *, limit, batch_size, device, work_dir, finished, on_row,
                 cache: str = "static") -> Evaluation:
        _static_only(cache)
        samples = self.samples(limit)
        predictions, scores, summary = evaluate_shapes(self, loaded, method, samples, batch_size, device, work_dir)
        rows = [self.row(s, p, [p]) for s, p in zip(samples, predictions)]  # each sample scored once
        ours = self.score_rows(rows)  # the same scorer: its 95 % intervals go beside lmms-eval's numbers
        for key, value in ours.items():
            if key.endswith("_ci95"):
                scores[key] = value
            elif isinstance(value, dict) and isinstance(scores.get(key), dict):
                scores[key].update({k: v for k, v in value.items() if k.endswith("_ci95")})
        for row in rows:
            on_row(row)
        efficiency_prompt = (conversation(samples[0].questions[:1], []), [self.image(samples[0])])
        return Evaluation({self.name: scores}, rows, efficiency_prompt, summary)


def _static_only(cache: str) -> None:
    if cache != "static":
        raise ValueError(f"cache={cache} is available with the built-in task=shapes only; the lmms-eval tasks "
                         "generate on the preallocated cache (cache=static).")


@dataclasses.dataclass
class LmmsBenchmarks(BaseTask):
    """Benchmarks asked and scored by lmms-eval (``harness.lmms.benchmarks``), each one a key in
    result.json's ``tasks`` with the metrics lmms-eval reports for it (``benchmarks.declared``); their
    datasets are read from ``data_dir`` (None: lmms-eval's own loading)."""

    work_name = "lmms_eval"  # <out_dir>/lmms_eval/<variant>/: the local task YAMLs and lmms-eval's files
    summary_key = ("lmms_eval", "lmms_eval")

    name: str
    lmms_tasks: list[str]
    data_dir: str | None
    max_new_tokens: int | None = None  # replaces every benchmark's own budget (lmms-eval gen_kwargs)
    found: dict | None = None  # what the dataset check found, so the task YAMLs reuse it

    def check(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"task.max_new_tokens must be >= 1 or null, got {self.max_new_tokens}.")
        require_lmms_eval()
        self.found = benchmarks.locate_all(self.lmms_tasks, self.data_dir)  # every dataset, before any model loads

    def metrics_for(self, name: str) -> Metrics:
        return benchmarks.declared(name)

    def evaluate(self, loaded, method, *, limit, batch_size, device, work_dir, finished, on_row,
                 cache: str = "static") -> Evaluation:
        _static_only(cache)
        run = evaluate_benchmarks(self, loaded, method, limit, batch_size, device, work_dir)
        for row in run.rows:
            on_row(row)
        prompt = None if run.first_prompt is None else (run.first_prompt[0], list(run.first_prompt[1]))
        return Evaluation(run.scores, run.rows, prompt, run.summary)


def build_benchmarks(cfg) -> LmmsBenchmarks:
    """task=benchmarks and task=paper (``harness.tasks.TASKS["lmms_eval"]``)."""
    if str(cfg.get("backend")) != "lmms_eval":
        raise ValueError(f"the lmms-eval benchmarks {list(cfg.lmms_tasks)} run on task.backend=lmms_eval only.")
    data_dir, budget = cfg.get("data_dir"), cfg.get("max_new_tokens")
    return LmmsBenchmarks(name=cfg.name, lmms_tasks=list(cfg.lmms_tasks),
                          data_dir=None if data_dir in (None, "") else str(data_dir),
                          max_new_tokens=None if budget is None else int(budget))
