"""Write the shapes benchmark as VLMEvalKit TSVs: a yes/no set and a multiple-choice set.

    python -m harness.vlmeval.export_shapes --out data/vlmeval            # shapes_yorn.tsv, shapes_mcq.tsv
    python -m harness.vlmeval.export_shapes --out DIR --n 40 --split val

``shapes_yorn``: the ``exist`` questions ("is there a red circle ?"), answers ``Yes``/``No``: VLMEvalKit
reads it with its yes/no class (``ImageYORNDataset``; overall accuracy, and per ``category``).
``shapes_mcq``: the ``colour``, ``count`` and ``position`` questions with options: colour four of
the six colours (the right one among three others, order drawn from the sample's id), count
``1``-``4``, position the two sides the question names; ``answer`` is the right letter. Images are
PNGs (base64), the pixels of the built-in path. Each row also carries ``harness_id`` (the
built-in sample id: ``task=shapes 'task.qtypes=[exist]'`` asks the same samples, as do
``[colour,count,position]`` for the multiple-choice set), ``qtype`` and ``harness_answer`` (its
gold answer in the harness's words), so the two backends' scores can be set side by side.
"""

from __future__ import annotations

import argparse
import base64
import io
import random
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from harness.tasks import shapes

YORN, MCQ = "shapes_yorn", "shapes_mcq"
MCQ_QTYPES = ("colour", "count", "position")
LETTERS = "ABCD"


def options(sample: shapes.Sample) -> list[str]:
    """The options of a multiple-choice row, the right one among them."""
    gold = sample.answers[0]
    if sample.qtype == "colour":
        rng = random.Random(f"vlmeval-options-{sample.id}")
        choices = [gold, *rng.sample([c for c in shapes.COLOURS if c != gold], 3)]
        rng.shuffle(choices)
        return choices
    if sample.qtype == "count":
        return [str(k) for k in range(1, shapes.MAX_OBJECTS + 1)]
    if sample.qtype == "position":
        return ["left", "right"] if gold in ("left", "right") else ["top", "bottom"]
    raise ValueError(f"no multiple-choice form for question type {sample.qtype!r}")


def _png64(sample: shapes.Sample, image_size: int) -> str:
    buffer = io.BytesIO()
    sample.image(image_size).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def rows(samples: Sequence[shapes.Sample], image_size: int, kind: str) -> pd.DataFrame:
    out = []
    for i, s in enumerate(samples):
        row = {"index": i, "image": _png64(s, image_size), "question": s.questions[0]}
        if kind == YORN:
            row["answer"] = "Yes" if s.answers[0] == shapes.YES else "No"
        else:
            choices = options(s)
            row.update({letter: (choices[k] if k < len(choices) else None) for k, letter in enumerate(LETTERS)})
            row["answer"] = LETTERS[choices.index(s.answers[0])]
        row.update({"category": s.qtype, "qtype": s.qtype, "harness_id": s.id, "harness_answer": s.answers[0]})
        out.append(row)
    return pd.DataFrame(out)


def export(out_dir: Path, n: int = 100, split: str = "test", image_size: int = 64) -> dict[str, Path]:
    """``out_dir/shapes_yorn.tsv`` (n exist questions) and ``out_dir/shapes_mcq.tsv`` (n questions,
    colour, count and position in turn)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for kind, qtypes in ((YORN, ["exist"]), (MCQ, list(MCQ_QTYPES))):
        path = out_dir / f"{kind}.tsv"
        rows(shapes.load_split(split, n, qtypes), image_size, kind).to_csv(path, sep="\t", index=False)
        written[kind] = path
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m harness.vlmeval.export_shapes", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the folder (task.data_dir / $LMUData)")
    parser.add_argument("--n", type=int, default=100, help="rows per set (default 100)")
    parser.add_argument("--split", default="test", choices=sorted(shapes.SPLITS))
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    for kind, path in export(args.out, args.n, args.split, args.image_size).items():
        print(f"{kind}: {path.resolve()}")


if __name__ == "__main__":
    main()
