"""VLMEvalKit datasets from local TSVs only: checked before the model loads, never downloaded.

VLMEvalKit reads ``$LMUData/<name>.tsv`` (columns ``index``, ``image`` as base64 or ``image_path``,
``question``, ``answer``, options ``A``-``D`` for multiple choice, ``category``, ...) and, when the
file is missing or its MD5 differs from the one it records for a released set, downloads it
again. Here the folder is ``task.data_dir`` (else ``$LMUData``); ``locate_all`` refuses, in one line
each, a missing file, an unreadable one, missing columns, a question type the route does not
score, and an MD5 mismatch (``task.verify_md5=false`` scores the local copy as it is, and
result.json says so); ``no_downloads`` turns any download VLMEvalKit still attempts into an error.

Datasets the route runs: VLMEvalKit's yes/no (``Y/N``: MME, POPE, HallusionBench, AMBER, ...)
and multiple-choice (``MCQ``: MMBench, SEEDBench_IMG, ScienceQA, AI2D, MMStar, ...) image sets,
scored by VLMEvalKit's own ``evaluate`` with exact matching (no API judge), and any other name
whose TSV is there: with options ``A``, ``B`` it is VLMEvalKit's custom multiple-choice set
(as VLMEvalKit itself decides), with answers all ``Yes``/``No`` its yes/no class.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import pandas as pd

KINDS = ("Y/N", "MCQ")
JUDGE = "exact_matching"


@dataclasses.dataclass
class Found:
    name: str
    path: Path
    kind: str  # Y/N | MCQ
    cls: type  # the VLMEvalKit dataset class that reads and scores it
    rows: int
    md5_verified: bool | None  # None: VLMEvalKit records no MD5 for it


def data_root(data_dir: str | None) -> Path:
    root = data_dir if data_dir not in (None, "") else os.environ.get("LMUData")
    if not root:
        raise ValueError("task=vlmeval reads local TSVs: pass task.data_dir=DIR or set LMUData=DIR "
                         "(python -m harness.vlmeval.export_shapes --out DIR writes the shapes sets).")
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"task.data_dir {root} is not a directory; it holds the datasets' <name>.tsv files.")
    return root


def registered(name: str):
    """VLMEvalKit's image dataset class for a released dataset name, or None."""
    from vlmeval.dataset import DATASET_CLASSES

    for cls in DATASET_CLASSES:
        if name in cls.supported_datasets():
            return cls
    return None


def locate_all(names, data_dir: str | None, verify_md5: bool = True) -> dict[str, Found]:
    """Every dataset's TSV present, readable, with the columns its kind needs; before the model loads."""
    if not names:
        raise ValueError("task.datasets is empty; name VLMEvalKit datasets, e.g. 'task.datasets=[POPE,MMBench_DEV_EN]'.")
    root = data_root(data_dir)
    for name in names:  # before VLMEvalKit's import (about 15 s)
        path = root / f"{name}.tsv"
        if not path.is_file():
            raise ValueError(f"VLMEvalKit dataset {name}: {path} does not exist, and the harness never downloads; put the "
                             f"released TSV there (docs/benchmarks.md, VLMEvalKit) or pass task.data_dir=DIR.")
        try:  # one row of one column: cheap even for a TSV of base64 images
            empty = pd.read_csv(path, sep="\t", usecols=[0], nrows=1).empty
        except Exception:  # noqa: BLE001 - an unreadable file: the full read below says why
            empty = False
        if empty:  # a header alone would score n=0 and print acc 0.000 as if it were a result
            raise ValueError(f"VLMEvalKit dataset {name}: {path} holds a header and no rows; nothing to score.")
    from harness.vlmeval import import_vlmeval

    import_vlmeval()
    from vlmeval.dataset.image_mcq import CustomMCQDataset
    from vlmeval.dataset.image_yorn import ImageYORNDataset
    from vlmeval.smp import md5  # the digest VLMEvalKit's own check computes

    found = {}
    for name in names:
        path = root / f"{name}.tsv"
        cls = registered(name)
        try:
            data = pd.read_csv(path, sep="\t", usecols=lambda c: c != "image")
        except Exception as err:
            raise ValueError(f"VLMEvalKit dataset {name}: {path} is no readable TSV ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}).") from err
        columns = set(data.columns)
        header = set(pd.read_csv(path, sep="\t", nrows=0).columns)
        if len(data) == 0:  # (the early check read one column; this is every row but the images)
            raise ValueError(f"VLMEvalKit dataset {name}: {path} holds a header and no rows; nothing to score.")
        missing = [c for c in ("index", "question", "answer") if c not in columns]
        if "image" not in header and "image_path" not in header:
            missing.append("image (or image_path)")
        if missing:
            raise ValueError(f"VLMEvalKit dataset {name}: {path} lacks the column(s) {missing} (a test split without "
                             "answers cannot be scored offline).")
        if cls is not None:
            kind = cls.TYPE
            if kind not in KINDS:
                raise ValueError(f"VLMEvalKit dataset {name} is a {kind} set; task=vlmeval scores yes/no and "
                                 f"multiple-choice image sets ({', '.join(KINDS)}) by exact matching only.")
        elif {"A", "B"} <= columns:
            kind, cls = "MCQ", CustomMCQDataset
        elif set(data["answer"].astype(str)) <= {"Yes", "No"}:
            kind, cls = "Y/N", ImageYORNDataset
        else:
            raise ValueError(f"VLMEvalKit dataset {name}: {path} is neither multiple choice (options A, B) nor yes/no "
                             "(answers Yes/No); VLMEvalKit scores other custom sets only with an API judge.")
        expected = getattr(cls, "DATASET_MD5", {}).get(name)
        verified = None
        if expected is not None:
            if verify_md5 and md5(str(path)) != expected:
                raise ValueError(f"VLMEvalKit dataset {name}: {path}'s MD5 differs from the released file's ({expected}), "
                                 "and VLMEvalKit would download it again; replace it with the released TSV, or pass "
                                 "task.verify_md5=false to score this copy as it is.")
            verified = bool(verify_md5)
        found[name] = Found(name, path, kind, cls, len(data), verified)
    return found


@contextlib.contextmanager
def no_downloads():
    """Any download VLMEvalKit attempts becomes a ValueError naming the URL and the file."""
    import vlmeval.dataset.image_base as image_base
    import vlmeval.smp.file as smp_file

    def refuse(url, filename=None):
        raise ValueError(f"VLMEvalKit tried to download {url} to {filename}; the harness never downloads: put the "
                         "file there yourself (docs/benchmarks.md, VLMEvalKit).")

    saved = image_base.download_file, smp_file.download_file
    image_base.download_file = smp_file.download_file = refuse
    try:
        yield
    finally:
        image_base.download_file, smp_file.download_file = saved


def build(found: Found, root: Path):
    """VLMEvalKit's dataset object for a checked TSV (its MD5 record dropped when not verified)."""
    os.environ["LMUData"] = str(root)
    cls = found.cls
    if found.md5_verified is False:  # task.verify_md5=false: this copy, as it is
        cls = type(cls.__name__, (cls,), {"DATASET_MD5": {}})
    with no_downloads():
        return cls(dataset=found.name)


def sample_scores(found: Found, result_file: str) -> dict:
    """VLMEvalKit's own per-sample verdict (1.0 right, 0.0 wrong) by index, from the files its
    ``evaluate`` wrote beside ``result_file``."""
    from vlmeval.smp import get_intermediate_file_path, load

    if found.kind == "Y/N":
        table, column = load(get_intermediate_file_path(result_file, "_auxmatch")), "score"
    else:
        table, column = load(get_intermediate_file_path(result_file, f"_{JUDGE}_result")), "hit"
    return {str(i): float(bool(v)) for i, v in zip(table["index"], table[column])}


def to_plain(score) -> dict:
    """VLMEvalKit's score table (a DataFrame or dict) as JSON-able ``{column: [values]}`` / ``{key: value}``."""
    if isinstance(score, pd.DataFrame):
        return {str(c): [_plain(v) for v in score[c]] for c in score.columns}
    if isinstance(score, dict):
        return {str(k): _plain(v) for k, v in score.items()}
    return {"value": _plain(score)}


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
