"""Write shapes samples to a local parquet that the lmms-eval tasks in ``harness/lmms/tasks`` read.

    python -m harness.lmms.export_shapes                      # tasks/shapes/data/shapes.parquet
    python -m harness.lmms.export_shapes --out DIR --n 40     # DIR/shapes.parquet + task YAMLs

With ``--out DIR`` the directory also gets task YAMLs (each includes the shipped one and points
at DIR's parquet by a path relative to itself, so DIR can be moved) and a ``lazyattn_shapes`` group over the question types present, so
``--include_path DIR`` serves exactly those samples. Single-turn question types only: lmms-eval
gets no multiturn samples from here.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Sequence
from pathlib import Path

import yaml

from harness.tasks import shapes

TASKS_DIR = Path(__file__).resolve().parent / "tasks" / "shapes"
DEFAULT_DATA = TASKS_DIR / "data" / "shapes.parquet"
SINGLE_TURN = ("colour", "count", "exist", "position", "describe")
GROUP = "lazyattn_shapes"
DEFAULT_BUDGETS = {"short": 8, "describe": 48}


def task_name(qtype: str) -> str:
    return f"{GROUP}_{qtype}"


def check_qtypes(qtypes: Sequence[str]) -> None:
    bad = [q for q in qtypes if q not in SINGLE_TURN]
    if bad or not qtypes:
        raise ValueError(
            f"the lmms-eval shapes tasks take single-turn question types only, got {list(qtypes)}; "
            f"choose from {list(SINGLE_TURN)} (multiturn runs on the built-in backend)."
        )


def write_parquet(samples: Sequence[shapes.Sample], qtypes: Sequence[str], image_size: int, path: Path) -> Path:
    """One row per sample: what it is (split, index, qtypes), its question, answer and PNG image."""
    import datasets  # an lmms-eval dependency, imported here so the harness runs without it

    check_qtypes(qtypes)
    rows = {k: [] for k in ("id", "split", "index", "qtype", "qtypes", "question", "answer", "image")}
    for s in samples:
        if len(s.questions) != 1:
            raise ValueError(f"sample {s.id} is multi-turn; the lmms-eval shapes tasks are single-turn.")
        png = io.BytesIO()
        s.image(image_size).save(png, format="PNG")  # lossless: the same pixels as the built-in path
        for key, value in (("id", s.id), ("split", s.split), ("index", s.index), ("qtype", s.qtype),
                           ("qtypes", ",".join(qtypes)), ("question", s.questions[0]), ("answer", s.answers[0]),
                           ("image", {"bytes": png.getvalue(), "path": None})):
            rows[key].append(value)
    features = datasets.Features(
        {k: datasets.Value("int64" if k == "index" else "string") for k in rows if k != "image"}
        | {"image": datasets.Image()}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def write_task_dir(
    samples: Sequence[shapes.Sample],
    qtypes: Sequence[str],
    image_size: int,
    out_dir: Path,
    budgets: dict[str, int] | None = None,
    cache_dir: Path | None = None,
) -> list[str]:
    """``out_dir``: the parquet, one task YAML per question type present, and the group.

    Returns the lmms-eval task names written (subtasks first, the group last). ``cache_dir``:
    where ``datasets`` keeps its Arrow copy (default: the HF datasets cache).
    """
    budgets = {**DEFAULT_BUDGETS, **(budgets or {})}
    out_dir = Path(out_dir).resolve()
    parquet = write_parquet(samples, qtypes, image_size, out_dir / "shapes.parquet")
    present = [q for q in SINGLE_TURN if any(s.qtype == q for s in samples)]
    # relative to the YAML: lmms-eval resolves data_files of a parquet task against the YAML's folder, so
    # the folder can be moved or copied as a whole
    dataset_kwargs: dict = {"data_files": {"test": parquet.name}}
    if cache_dir is not None:
        dataset_kwargs["cache_dir"] = str(Path(cache_dir).resolve())
    for qtype in present:
        budget = budgets["describe" if qtype == "describe" else "short"]
        config = {
            "include": str(TASKS_DIR / f"{task_name(qtype)}.yaml"),
            "dataset_kwargs": dataset_kwargs,
            "generation_kwargs": {"max_new_tokens": int(budget), "until": []},
        }
        (out_dir / f"{task_name(qtype)}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    group = yaml.safe_load((TASKS_DIR / f"{GROUP}.yaml").read_text())
    group["task"] = [task_name(q) for q in present]
    (out_dir / f"{GROUP}.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    return [task_name(q) for q in present] + [GROUP]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m harness.lmms.export_shapes", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"a directory for the parquet and task YAMLs (default: only {DEFAULT_DATA})")
    parser.add_argument("--split", default="test", choices=sorted(shapes.SPLITS))
    parser.add_argument("--n", type=int, default=100, help="samples, question types in round robin (default 100)")
    parser.add_argument("--qtypes", default=",".join(SINGLE_TURN))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--short", type=int, default=DEFAULT_BUDGETS["short"], help="max_new_tokens, short answers")
    parser.add_argument("--describe", type=int, default=DEFAULT_BUDGETS["describe"], help="max_new_tokens, describe")
    args = parser.parse_args(argv)
    qtypes = [q for q in args.qtypes.split(",") if q]
    check_qtypes(qtypes)
    samples = shapes.load_split(args.split, args.n, qtypes)
    if args.out is None:
        if (args.short, args.describe) != (DEFAULT_BUDGETS["short"], DEFAULT_BUDGETS["describe"]):
            parser.error("--short/--describe need --out DIR (the shipped YAMLs carry the default budgets).")
        if sorted(qtypes) != sorted(SINGLE_TURN):
            parser.error("a subset of --qtypes needs --out DIR (the shipped group lists every question type).")
        print(write_parquet(samples, qtypes, args.image_size, DEFAULT_DATA))
        return
    names = write_task_dir(samples, qtypes, args.image_size, args.out,
                           {"short": args.short, "describe": args.describe})
    print(f"{args.out.resolve()}: {', '.join(names)}")


if __name__ == "__main__":
    main()
