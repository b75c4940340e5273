"""lmms-eval hooks for the shapes benchmark: prompts as chat messages, scores by the harness's scorer.

A row of the parquet (``harness.lmms.export_shapes``) names its sample: ``split``, ``index`` and
the ``qtypes`` it was drawn with. Scoring rebuilds that very sample from the seed and calls
``harness.tasks.shapes.score_sample`` on it, so both paths score with one function.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lmms_eval.api.task import ConfigurableMessagesTask

from harness.tasks import shapes


def _exit(message: str):
    """One line on stderr, exit status 2: lmms-eval's CLI turns any ``Exception`` of a task into a
    traceback and exit status 0 (a failed load, retried for up to a minute, into a ``RetryError``);
    ``SystemExit`` is no ``Exception``."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class ShapesTask(ConfigurableMessagesTask):
    """lmms-eval's chat task (``class:`` in the template) that checks its data as it loads them: a
    missing parquet, or a row whose image cannot be decoded (named by task, doc index and sample
    id), is one line on stderr and exit status 2."""

    def __init__(self, config=None, **kwargs):
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"}, **kwargs)

    def download(self, dataset_kwargs=None) -> None:
        files = (dataset_kwargs or {}).get("data_files") or {}
        paths = list(files.values()) if isinstance(files, dict) else [files] if isinstance(files, str) else list(files)
        missing = [str(p) for p in paths if isinstance(p, str) and not Path(p).is_file()]
        if missing:
            where = missing[0] if Path(missing[0]).is_absolute() else f"{missing[0]} (beside the task YAML)"
            _exit(f"{self.config.task}: its data {where} is not there; write it with `python -m "
                  "harness.lmms.export_shapes` (the shipped tasks) or `python -m harness.lmms.export_shapes --out DIR` "
                  "and pass --include_path DIR.")
        super().download(dataset_kwargs)
        for split, docs in self.dataset.items():  # after process_docs: an index here is lmms-eval's doc id
            if "image" not in docs.column_names:
                continue
            images = docs.select_columns([c for c in ("image", "id") if c in docs.column_names])
            for index in range(len(images)):
                try:
                    images[index]["image"].load()
                except Exception as err:
                    sample = images.select_columns(["id"])[index]["id"] if "id" in images.column_names else "?"
                    _exit(f"{self.config.task} ({split} split) doc {index} (sample {sample}): its image cannot be "
                          f"decoded ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}); "
                          "re-export the parquet with `python -m harness.lmms.export_shapes`.")


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_messages(doc, lmms_eval_specific_kwargs=None):
    """The built-in path's first turn (harness.generate.conversation): the image, then the question."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "url": doc_to_visual(doc)[0]},
                {"type": "text", "text": doc_to_text(doc)},
            ],
        }
    ]


def sample_of(doc) -> shapes.Sample:
    sample = shapes.load_split(doc["split"], 1, doc["qtypes"].split(","), offset=int(doc["index"]))[0]
    if sample.questions[-1] != doc["question"] or sample.answers[-1] != doc["answer"]:
        raise ValueError(
            f"parquet row {doc['id']} does not match the shapes generator (question {doc['question']!r}); "
            "re-export it with `python -m harness.lmms.export_shapes`."
        )
    return sample


def process_results(doc, results):
    return shapes.score_sample(sample_of(doc), results[0])


def _only(qtype):
    def select(dataset):  # reads the qtype column only: no image is decoded here (a bad one is named later, by row)
        return dataset.filter(lambda q: q == qtype, input_columns=["qtype"])

    select.__name__ = f"{qtype}_docs"
    return select


colour_docs = _only("colour")
count_docs = _only("count")
exist_docs = _only("exist")
position_docs = _only("position")
describe_docs = _only("describe")
