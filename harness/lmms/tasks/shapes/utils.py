"""lmms-eval hooks for the shapes benchmark: prompts as chat messages, scores by the harness's scorer.

A row of the parquet (``harness.lmms.export_shapes``) names its sample: ``split``, ``index`` and
the ``qtypes`` it was drawn with. Scoring rebuilds that very sample from the seed and calls
``harness.tasks.shapes.score_sample`` on it, so both paths score with one function.
"""

from __future__ import annotations

from harness.tasks import shapes


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
    def select(dataset):
        return dataset.filter(lambda doc: doc["qtype"] == qtype)

    select.__name__ = f"{qtype}_docs"
    return select


colour_docs = _only("colour")
count_docs = _only("count")
exist_docs = _only("exist")
position_docs = _only("position")
describe_docs = _only("describe")
