"""``task=vlmeval``: VLMEvalKit's datasets, prompts, inference job and scoring, in process.

For each variant (dense, then the method) and each dataset of ``task.datasets``:

1. VLMEvalKit's dataset object reads the local TSV (``harness.vlmeval.data``: checked before the
   model loads, never downloaded) and builds every row's prompt, as its ``infer_data`` would
   (the dataset's ``build_prompt``, or the model's for the exported shapes sets);
2. ``LazyAttnVLM.answer_ahead`` answers them in batches of ``batch_size`` (VLMEvalKit's own loop
   asks one message at a time; it then receives these answers) and keeps each answer's KV bytes;
3. ``vlmeval.inference.infer_data_job`` writes VLMEvalKit's prediction file and the dataset's
   ``evaluate`` scores it (exact matching, no API judge), writing its own files beside it, in
   ``<out_dir>/vlmeval/<variant>/``;
4. the harness reads VLMEvalKit's per-sample verdicts back from those files and reports
   accuracy with its 95 % interval, per dataset and per ``category`` (under circular evaluation,
   MMBench's, a verdict covers a question and its rotated variants: one row per question, the
   variants' answers in its ``circular``); ``harness.run`` adds dense
   on the same samples (paired differences per dataset), fidelity and the workload KV cache.

For the exported shapes sets each row is also scored by the harness's own shapes scorer
(``acc_harness``), and ``agreement`` says on how many samples the two verdicts agree.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from harness.compare import interval
from harness.settings import RunError
from harness.tasks import BaseTask, Evaluation
from harness.vlmeval import require
from harness.vlmeval import data as vdata

MODEL_NAME = "lazyattn"  # VLMEvalKit's files are <MODEL_NAME>_<dataset>.xlsx and its evaluation's siblings


def _accuracy(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "acc": sum(values) / len(values) if values else 0.0, "acc_ci95": interval(values)}


def prompt(model, dataset, line) -> list[dict]:
    """The message VLMEvalKit's ``infer_data`` builds for ``line``."""
    if getattr(dataset, "force_use_dataset_prompt", False):
        return dataset.build_prompt(line)
    if model.use_custom_prompt(dataset.dataset_name):
        return model.build_prompt(line, dataset=dataset.dataset_name)
    return dataset.build_prompt(line)


@dataclasses.dataclass
class VlmevalDatasets(BaseTask):
    """VLMEvalKit's yes/no and multiple-choice image datasets, each a key in result.json ``tasks``, scored
    by accuracy (``BaseTask.metrics``: VLMEvalKit's per-sample verdicts, Wilson intervals)."""

    name: str
    datasets: list[str]
    data_dir: str | None
    max_new_tokens: int = 32
    verify_md5: bool = True
    found: dict | None = None

    summary_key = ("vlmeval", "ms-vlmeval")  # result.json key of VLMEvalKit's own numbers, and its package
    work_name = "vlmeval"  # <out_dir>/vlmeval/<variant>/: VLMEvalKit's files

    def check(self) -> None:
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"task.max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        require()
        self.found = vdata.locate_all(list(self.datasets), self.data_dir, bool(self.verify_md5))

    def sizes(self) -> dict[str, int]:
        """Each dataset's rows (``check`` has read them)."""
        return {name: found.rows for name, found in (self.found or {}).items()}

    def evaluate(self, loaded, method, *, limit, batch_size, device, work_dir, finished, on_row,
                 cache: str = "static") -> Evaluation:
        from vlmeval.inference import infer_data_job
        from vlmeval.smp import get_pred_file_path, load

        from harness.tasks import shapes
        from harness.vlmeval.model import LazyAttnVLM, message_key

        model = LazyAttnVLM.from_loaded(loaded, method, device, int(self.max_new_tokens), batch_size, cache)
        root = vdata.data_root(self.data_dir)
        work_dir = Path(work_dir).resolve()
        work_dir.mkdir(parents=True, exist_ok=True)
        scores, rows, summary = {}, [], {}
        for name, found in self.found.items():
            dataset = vdata.build(found, root)
            if limit is not None:
                dataset.data = dataset.data.iloc[: int(limit)]
            model.set_dump_image(dataset.dump_image)
            lines = [dataset.data.iloc[i] for i in range(len(dataset.data))]
            messages = {}
            for line in lines:
                try:
                    messages[str(line["index"])] = prompt(model, dataset, line)
                except Exception as err:  # a corrupt image, a row its prompt cannot be built from
                    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                    raise RunError(f"VLMEvalKit dataset {name} ({found.path}), index {line['index']}: its image or "
                                   f"prompt cannot be read ({type(err).__name__}: {first}); fix or re-export that row.")
            for index, message in messages.items():  # an interrupted run's finished answers are kept
                done = finished.get(f"{name}/{index}")
                if done is not None:
                    model.answers[message_key(message)] = done["prediction"]
                    model.kv_bytes[message_key(message)] = int(done["kv_bytes"][-1])
                    for variant, text in (done.get("circular") or {}).items():
                        model.answers[message_key(messages[variant])] = text
                        model.kv_bytes[message_key(messages[variant])] = int(done["kv_bytes"][-1])
            model.answer_ahead(list(messages.values()))
            for stale in work_dir.glob(f"*{name}*"):  # VLMEvalKit reuses files it finds: these answers are the truth
                if stale.name.startswith(f"{MODEL_NAME}_{name}") or stale.name.endswith(f"_{name}.pkl"):
                    stale.unlink()
            with vdata.no_downloads():
                infer_data_job(model, work_dir=str(work_dir), model_name=MODEL_NAME, dataset=dataset)
                result_file = get_pred_file_path(str(work_dir), MODEL_NAME, name)
                table = dataset.evaluate(result_file, model=vdata.JUDGE, nproc=1)
            verdicts = vdata.sample_scores(found, result_file)
            predictions = load(result_file)
            written = dict(zip(map(str, predictions["index"]), predictions["prediction"]))
            name_rows, groups = [], {}
            for line in lines:  # circular evaluation (MMBench) scores a question with its rotated variants
                if str(line["index"]) not in verdicts:
                    group = line["g_index"] if "g_index" in line else int(line["index"]) % 1_000_000
                    groups.setdefault(str(int(group)), {})[str(line["index"])] = model.answers[
                        message_key(messages[str(line["index"])])]
            for line in lines:
                index = str(line["index"])
                if index not in verdicts:
                    continue
                key = message_key(messages[index])
                row = {"task": name, "id": f"{name}/{index}", "category": _text(line.get("category")),
                       "target": str(line["answer"]), "prediction": model.answers[key],
                       "acc": verdicts[index], "kv_bytes": [model.kv_bytes[key]]}
                if isinstance(written.get(index), str) and written[index] != model.answers[key]:
                    raise RuntimeError(f"VLMEvalKit's prediction file {result_file} holds another answer for index "
                                       f"{index} than the model gave ({written[index]!r}, {model.answers[key]!r}).")
                if index in groups:  # the variants' answers, judged together with this one
                    row["circular"] = groups.pop(index)
                if "harness_id" in line and isinstance(line.get("harness_answer"), str):
                    row["harness_id"], row["shapes_qtype"] = str(line["harness_id"]), str(line["qtype"])
                    row["acc_harness"] = shapes.score_turn(row["shapes_qtype"], row["prediction"],
                                                          str(line["harness_answer"]))["acc"]
                name_rows.append(row)
            scores[name] = self._scores(found, name_rows)
            summary[name] = {"scores": vdata.to_plain(table),
                             "prediction_file": str(Path(result_file).relative_to(work_dir.parent.parent)),
                             "md5_verified": found.md5_verified, "kind": found.kind}
            for row in name_rows:
                on_row(row)
            rows += name_rows
        prompt_ = None if model.first_prompt is None else (model.first_prompt[0], list(model.first_prompt[1]))
        return Evaluation(scores, rows, prompt_, summary)

    @staticmethod
    def _scores(found, rows: list[dict]) -> dict[str, Any]:
        out = _accuracy([r["acc"] for r in rows])
        for category in dict.fromkeys(r["category"] for r in rows if r["category"] is not None):
            out[category] = _accuracy([r["acc"] for r in rows if r["category"] == category])
        if rows and all("acc_harness" in r for r in rows):
            out["acc_harness"] = sum(r["acc_harness"] for r in rows) / len(rows)
            out["agreement"] = sum(r["acc"] == r["acc_harness"] for r in rows) / len(rows)
        return out


def _text(value) -> str | None:
    return None if value is None or value != value else str(value)


def build(cfg) -> VlmevalDatasets:
    """task=vlmeval (``harness.tasks.TASKS["vlmeval"]``)."""
    if str(cfg.get("backend")) != "vlmeval":
        raise ValueError("task=vlmeval runs on task.backend=vlmeval only.")
    data_dir = cfg.get("data_dir")
    return VlmevalDatasets(name=cfg.name, datasets=list(cfg.datasets),
                           data_dir=None if data_dir in (None, "") else str(data_dir),
                           max_new_tokens=int(cfg.max_new_tokens), verify_md5=bool(cfg.verify_md5))
