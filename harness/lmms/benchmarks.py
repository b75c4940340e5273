"""The paper's benchmarks as lmms-eval tasks that read local copies of their datasets.

lmms-eval's own task YAMLs load each benchmark from the Hugging Face hub (``dataset_path:
lmms-lab-encoder/GQA`` ...). Here every benchmark gets a small task YAML that ``include``s the
installed one, so prompts, generation settings and scoring stay lmms-eval's, and overrides only
where the data come from::

    <data_dir>/<dataset_path>/           e.g. /data/lmms/lmms-lab-encoder/POPE

holding either the dataset repository as downloaded (``hf download --repo-type dataset
lmms-lab-encoder/POPE --local-dir /data/lmms/lmms-lab-encoder/POPE``: parquet files and the
README that names its configs) or a ``DatasetDict.save_to_disk`` copy (``dataset_dict.json``;
for a named config, in ``<config>/`` below it). The local task is called ``<lmms-eval task>_local``
(a name of its own, so that it does not collide with the installed task on lmms-eval's CLI).

    python -m harness.lmms.benchmarks --data-dir /data/lmms --out tasks_local --tasks paper

checks every dataset and writes such a directory for ``python -m lmms_eval --include_path``;
the harness (``task=paper``: the paper's twelve, ``PAPER``; ``task=benchmarks task.lmms_tasks=[pope]`` ...)
does the same per run, before loading a model.

Per benchmark (``BENCHMARKS``), beyond the data source:
- ``gqa``: lmms-eval's ``process_docs`` loads the images config from the hub by name; the local
  task attaches them from the local copy instead (a generated ``lazyattn_local.py``).
- ``mmbench_en_dev_static``: lmms-eval's regex/substring choice extraction (no GPT matching); its
  xlsx submission file is left out (it needs ``openpyxl``, not installed).
- ``vizwiz_vqa_val``: VQA accuracy against the ten crowd answers (``exact_match``), unanswerable included.
- ``ai2d``: the option letter, extracted by lmms-eval's ``MultiChoiceRegexFilter`` (``exact_match``).
- ``coco2017_cap_val``, ``nocaps_val``, ``flickr30k_test``: BLEU-1..4, METEOR, ROUGE-L and CIDEr by
  lmms-eval's aggregation over pycocoevalcap (the ``lmms`` extra), whose PTB tokenizer and METEOR
  run Java: refused up front, in one line naming what to install, without either. COCO is the 2017
  val split (5,000 images, held in the dataset); lmms-eval's Karpathy-split tasks fetch every
  image from a URL at scoring time, which a local run cannot do. Flickr30K's logged target is its
  references (lmms-eval's YAML names a column the dataset lacks; scoring does not read it).
- ``textvqa_val_ocr``: lmms-eval's ``textvqa_val`` with ``ocr: true`` in its prompt kwargs, so each
  question is followed by ``\nReference OCR token: a, b, ...`` (the dataset's ``ocr_tokens``), the
  prompt of LLaVA-1.5's ``llava_textvqa_val_v051_ocr`` behind the reference TextVQA numbers. Plain
  ``textvqa_val`` stays lmms-eval's default (no OCR tokens).
- ``pope_adv``, ``pope_pop``, ``pope_random``: POPE's adversarial, popular and random subsets (the
  dataset's ``Full`` config); with all three in a run, result.json also gets ``pope_full``: each
  metric's mean over the three (``pope_f1_score``: the mean F1, the POPE number of LLaVA-1.5 and
  SparseVLM's Table 1), the subsets' F1 in ``subsets``. ``pope`` (the 9,000 mixed, one F1) is another
  protocol.
- ``vqav2_val``, ``vizwiz_vqa_val``: val; the reference numbers are test-dev (evaluation server), so
  result.json's ``protocol`` note says so.
- ``llava_in_the_wild``: scored by an LLM judge over the OpenAI API (``openai`` package and
  ``OPENAI_API_KEY``, or ``API_TYPE=azure`` with ``AZURE_API_KEY``/``AZURE_ENDPOINT``); refused
  up front without them. Not part of ``task=paper``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from harness.metrics import Metric, Metrics

LOCAL_SUFFIX = "_local"
DATA_ENV = "LAZYATTN_DATA"
# POPE's three subsets (the `Full` config's splits), whose mean F1 is the POPE number of the references
POPE_SUBSETS = ("pope_adv", "pope_pop", "pope_random")
# The paper's twelve benchmarks, in its order (MME is available, but not one of them), each under the
# protocol of the reference numbers: TextVQA with the reference OCR tokens, POPE as its three subsets
# (their mean F1: ``pope_full``, added by ``combine``).
PAPER = ("gqa", "vqav2_val", "textvqa_val_ocr", "vizwiz_vqa_val", "ai2d", "scienceqa_img", "mmmu_val",
         "mmbench_en_dev_static", *POPE_SUBSETS, "coco2017_cap_val", "nocaps_val", "flickr30k_test")
# Notes recorded beside a benchmark's scores in result.json (``tasks.<name>.protocol``): where its
# protocol is not the one of the reference numbers (docs/methods.md, "Numbers to compare against").
TEST_DEV = "the reference numbers (LLaVA-1.5, SparseVLM Table 1) are test-dev, scored by the evaluation server"
PROTOCOL = {
    "vqav2_val": f"scored on val (lmms-eval vqav2_val); {TEST_DEV}: val is a proxy, not comparable digit for digit",
    "vizwiz_vqa_val": f"scored on val (lmms-eval vizwiz_vqa_val); {TEST_DEV}: val is a proxy, not comparable "
                      "digit for digit",
    "textvqa_val": "val without OCR tokens (lmms-eval's default, ocr: false); the reference numbers use the "
                   "'Reference OCR token' prompt: textvqa_val_ocr",
    "textvqa_val_ocr": "val with the 'Reference OCR token' prompt (lmms-eval textvqa_val, ocr: true), as LLaVA-1.5's "
                       "llava_textvqa_val_v051_ocr behind the reference numbers",
    "pope": "the 9,000 questions of all three subsets mixed, one F1; the reference POPE number is the mean F1 of "
            "the adversarial, popular and random subsets: pope_full",
    "pope_full": "the mean over POPE's adversarial, popular and random subsets (pope_adv, pope_pop, pope_random) "
                 "of each metric; pope_f1_score is the POPE number of the references (mean subset F1)",
    "mmbench_en_dev_static": "MMBench en dev, lmms-eval's regex choice extraction, not circular; the reference "
                             "numbers are circular (task=vlmeval)",
}
# What lmms-eval's caption scoring (pycocoevalcap: BLEU, METEOR, ROUGE-L, CIDEr) needs beyond the
# `lmms` extra's core: Python modules (installed by the extra) and a Java runtime (PTB tokenizer, METEOR).
CAPTION_MODULES = {"pycocoevalcap": "pycocoevalcap.tokenizer.ptbtokenizer", "pycocotools": "pycocotools.coco"}


class MissingDataset(FileNotFoundError):
    """A benchmark's local dataset is not where the run looks for it (one line, says what to put where).
    ``problem``: the message less the download hint; ``dataset``: the HF dataset to download."""

    def __init__(self, message: str, problem: str | None = None, dataset: str | None = None) -> None:
        super().__init__(message)
        self.problem, self.dataset = problem or message, dataset


def _scorer(*names: str, scale: float = 100.0, title: str | None = None) -> Metrics:
    """Metrics lmms-eval aggregates over the whole set (no per-sample value), the first its protocol's."""
    return Metrics(tuple(Metric(n, aggregation="lmms_eval", interval=None, scale=scale, title=title if i == 0 else None)
                         for i, n in enumerate(names)))


# Exact match per sample (VQA accuracy against the ten answers where there are ten), averaged by lmms-eval
EXACT_MATCH = Metrics((Metric("exact_match", interval=None, title="EM"),))
POPE = Metrics((Metric("pope_f1_score", aggregation="lmms_eval", interval=None, title="F1"),
                Metric("pope_accuracy", interval=None, title="Acc")))


def _captions(prefix: str) -> Metrics:
    return _scorer(*(f"{prefix}_{m}" for m in ("CIDEr", "Bleu_4", "Bleu_3", "Bleu_2", "Bleu_1", "METEOR", "ROUGE_L")),
                   title="CIDEr")


@dataclasses.dataclass(frozen=True)
class Benchmark:
    task: str  # the installed lmms-eval task
    yaml: str  # its YAML, relative to lmms_eval/tasks
    title: str
    extra_configs: tuple[str, ...] = ()  # other configs of the same dataset that its utils load
    judge: bool = False  # scored by an API judge
    captions: bool = False  # scored by pycocoevalcap (needs Java)
    base: str | None = None  # the installed lmms-eval task when ``task`` is the harness's own variant of it
    prompt_kwargs: tuple[tuple[str, object], ...] = ()  # set in every entry of its lmms_eval_specific_kwargs
    metrics: Metrics = EXACT_MATCH  # its metrics as lmms-eval reports them, the one its protocol reports first
    short: str = ""  # the paper table's column name

    @property
    def installed_task(self) -> str:
        return self.base or self.task


BENCHMARKS = {
    b.task: b
    for b in (
        Benchmark("gqa", "gqa/gqa.yaml", "GQA test-dev balanced", extra_configs=("testdev_balanced_images",),
                  short="GQA"),
        Benchmark("mmbench_en_dev_static", "mmbench/mmbench_en_dev_static.yaml", "MMBench en dev",
                  metrics=_scorer("gpt_eval_score", scale=1, title="Acc"), short="MMB"),  # already a percentage
        Benchmark("mme", "mme/mme.yaml", "MME",
                  metrics=_scorer("mme_perception_score", "mme_cognition_score", scale=1, title="Perception"),
                  short="MME"),
        Benchmark("pope", "pope/pope.yaml", "POPE", metrics=POPE, short="POPE mixed"),
        Benchmark("scienceqa_img", "scienceqa/scienceqa_img.yaml", "ScienceQA-IMG", short="SQA-IMG"),
        Benchmark("vqav2_val", "vqav2/vqav2_val.yaml", "VQAv2 val", short="VQAv2"),
        Benchmark("textvqa_val", "textvqa/textvqa_val.yaml", "TextVQA val", short="TextVQA (no OCR)"),
        Benchmark("textvqa_val_ocr", "textvqa/textvqa_val.yaml", "TextVQA val, reference OCR tokens",
                  base="textvqa_val", prompt_kwargs=(("ocr", True),), short="TextVQA"),
        Benchmark("pope_adv", "pope/pope_adv.yaml", "POPE adversarial", metrics=POPE, short="POPE adv"),
        Benchmark("pope_pop", "pope/pope_pop.yaml", "POPE popular", metrics=POPE, short="POPE pop"),
        Benchmark("pope_random", "pope/pope_random.yaml", "POPE random", metrics=POPE, short="POPE rand"),
        Benchmark("mmmu_val", "mmmu/mmmu_val.yaml", "MMMU val", metrics=_scorer("mmmu_acc", title="Acc"),
                  short="MMMU"),
        Benchmark("vizwiz_vqa_val", "vizwiz_vqa/vizwiz_vqa_val.yaml", "VizWiz-VQA val", short="VizWiz"),
        Benchmark("ai2d", "ai2d/ai2d.yaml", "AI2D test", short="AI2D"),
        Benchmark("coco2017_cap_val", "coco_cap/coco2017_cap_val.yaml", "COCO Captions 2017 val", captions=True,
                  metrics=_captions("coco"), short="COCO"),
        Benchmark("nocaps_val", "nocaps/nocaps_val.yaml", "NoCaps val", captions=True, metrics=_captions("nocaps"),
                  short="NoCaps"),
        Benchmark("flickr30k_test", "flickr30k/flickr30k_test.yaml", "Flickr30K test", captions=True,
                  metrics=_captions("flickr"), short="Flickr30K"),
        Benchmark("llava_in_the_wild", "llava-in-the-wild/llava-in-the-wild.yaml", "LLaVA-Bench in-the-wild",
                  judge=True, metrics=_scorer("gpt_eval_llava_all", scale=1, title="Score"), short="LLaVA-W"),
    )
}
GROUPS = {"paper": PAPER, "pope_full": POPE_SUBSETS}
# scores result.json gets from other benchmarks' when all of them ran: name -> its parts
COMBINED = {"pope_full": POPE_SUBSETS}
# The paper table's columns (python -m harness.report paper): each benchmark under its protocol's
# metric, POPE as its subsets' mean F1 (pope_full), in the paper's order
PAPER_COLUMNS = tuple(dict.fromkeys("pope_full" if name in POPE_SUBSETS else name for name in PAPER))


def declared(name: str) -> Metrics:
    """The metrics of result.json ``tasks.<name>`` of a benchmark run (``harness.metrics``): the
    benchmark's own (``Benchmark.metrics``); POPE's subsets' mean (``pope_full``) is POPE's."""
    if name in COMBINED:
        return BENCHMARKS[COMBINED[name][0]].metrics
    return BENCHMARKS[name].metrics


def column_title(name: str) -> str:
    """A benchmark's column in the paper table: its short name and its protocol's metric (its first)."""
    short = "POPE" if name == "pope_full" else BENCHMARKS[name].short or name
    metric = declared(name).metrics[0]
    return f"{short} {metric.title or metric.name}"


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one benchmark's data come from, read from the installed task YAML."""

    dataset_path: str  # the HF dataset id
    dataset_name: str | None  # its config, if any
    split: str


@dataclasses.dataclass(frozen=True)
class Local:
    path: Path  # what lmms-eval's dataset_path becomes
    from_disk: bool  # a save_to_disk copy (dataset_kwargs.load_from_disk) rather than a repository


def tasks_dir() -> Path:
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or spec.origin is None:
        raise ValueError("the lmms-eval benchmarks need lmms-eval, which is not installed; run `make lmms-install`.")
    return Path(spec.origin).parent / "tasks"


def expand(names: Sequence[str]) -> list[str]:
    """Task names, groups (``paper``) expanded, unknown names refused, order kept, no repeats."""
    out: list[str] = []
    for name in names:
        for task in GROUPS.get(name, (name,)):
            if task not in BENCHMARKS:
                raise ValueError(
                    f"unknown lmms-eval benchmark {task!r}; supported: {', '.join(BENCHMARKS)} (or a group: "
                    f"{', '.join(GROUPS)})."
                )
            if task not in out:
                out.append(task)
    if not out:
        raise ValueError("no benchmarks given: set task.lmms_tasks=[...] (e.g. [pope, mme]).")
    return out


def task_yaml(bench: Benchmark) -> Path:
    path = tasks_dir() / bench.yaml
    if not path.is_file():
        raise ValueError(f"{path} not found: this lmms-eval install has no task {bench.installed_task!r}.")
    return path


def with_protocol(task: str, scores: dict) -> dict:
    """``scores`` with the benchmark's protocol note (``PROTOCOL``), if it has one."""
    return {**scores, "protocol": PROTOCOL[task]} if task in PROTOCOL else scores


def combine(scores: dict[str, dict]) -> dict[str, dict]:
    """``scores`` (per benchmark, in run order) with each ``COMBINED`` entry whose parts all ran, placed
    after its last part (a run's first task stays one that has rows, for its headline): ``n`` summed,
    every numeric metric the parts share averaged (standard errors left out), the parts' names in
    ``of`` and their F1 (or first metric) in ``subsets``. POPE's ``pope_full.pope_f1_score`` is the
    mean of its three subsets' F1."""
    out: dict[str, dict] = {}
    for name, value in scores.items():
        out[name] = value
        for combined, parts in COMBINED.items():
            if name == parts[-1] and combined not in scores and all(p in scores for p in parts):
                numeric = [{k: v for k, v in scores[p].items() if k != "n" and "stderr" not in k
                            and isinstance(v, (int, float)) and not isinstance(v, bool)} for p in parts]
                shared = [k for k in numeric[0] if all(k in m for m in numeric[1:])]
                head = next((k for k in shared if k.endswith("f1_score")), shared[0] if shared else None)
                out[combined] = with_protocol(combined, {
                    "n": sum(int(scores[p]["n"]) for p in parts),
                    **{k: sum(m[k] for m in numeric) / len(parts) for k in shared},
                    "of": list(parts),
                    "subsets": {p: m.get(head) for p, m in zip(parts, numeric)},
                })
    return out


def installed(bench: Benchmark) -> dict:
    """The installed task's YAML, includes followed, ``!function`` references left unresolved."""
    from lmms_eval.utils import load_yaml_config

    return load_yaml_config(str(task_yaml(bench)), mode="simple")


def source(bench: Benchmark) -> Source:
    config = installed(bench)
    return Source(str(config["dataset_path"]), config.get("dataset_name"), str(config["test_split"]))


def download_hint(dataset_path: str, data_dir: Path) -> str:
    return (
        f"on a machine with internet: `hf download --repo-type dataset {dataset_path} --local-dir "
        f"{data_dir / dataset_path}` (older huggingface_hub: `huggingface-cli download`; some lmms-lab "
        f"datasets want `hf auth login` first), then copy it there"
    )


def locate(bench: Benchmark, data_dir: Path, config: str | None = None, split: str | None = None) -> Local:
    """The local copy of one benchmark's dataset (``config``/``split`` default to the task's), or a
    ``MissingDataset`` error naming the dataset and where it should be. Reads no data."""
    src = source(bench)
    config = src.dataset_name if config is None else config
    split = src.split if split is None else split
    root = Path(data_dir).expanduser().resolve() / src.dataset_path
    what = f"{bench.task} ({bench.title}) needs the HF dataset {src.dataset_path}" + (
        f" (config {config}, split {split})" if config else f" (split {split})"
    )
    if not root.is_dir():
        problem = f"{what}, not found at {root}"
        raise MissingDataset(f"{problem}; {download_hint(src.dataset_path, Path(data_dir))}.", problem, src.dataset_path)
    for saved in ([root / config] if config else []) + [root]:
        if (saved / "dataset_dict.json").is_file():
            splits = yaml.safe_load((saved / "dataset_dict.json").read_text()).get("splits", [])
            if split not in splits:
                raise MissingDataset(f"{what}; the saved copy {saved} has splits {splits}.")
            return Local(saved, from_disk=True)
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(root), config)
    except Exception as err:  # a config the README does not name, no data files, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        problem = f"{what}; {root} is not a usable copy of it ({first})"
        raise MissingDataset(
            f"{problem}; {download_hint(src.dataset_path, Path(data_dir))}.", problem, src.dataset_path
        ) from err
    files = builder.config.data_files or {}
    if split not in files:
        raise MissingDataset(f"{what}; {root} has splits {sorted(files)} for config {builder.config.name!r}.")
    return Local(root, from_disk=False)


def check_judge(bench: Benchmark) -> None:
    if not bench.judge:
        return
    api = os.environ.get("API_TYPE", "openai")
    needs = {"openai": ["OPENAI_API_KEY"], "azure": ["AZURE_API_KEY", "AZURE_ENDPOINT"]}.get(api)
    if needs is None:
        raise ValueError(f"{bench.task} is scored by an LLM judge; API_TYPE must be openai or azure, got {api!r}.")
    missing = [k for k in needs if not os.environ.get(k)]
    if importlib.util.find_spec("openai") is None:
        missing.insert(0, "the `openai` package (pip install openai -c constraints/lmms.txt)")
    if missing:
        raise ValueError(
            f"{bench.task} ({bench.title}) is scored by an LLM judge (lmms-eval's, model $MODEL_VERSION, default "
            f"gpt-4o-2024-11-20, through API_TYPE={api}); missing: {', '.join(missing)}. OPENAI_API_URL may point "
            "at a local OpenAI-compatible server."
        )


def check_captions(names: Sequence[str]) -> None:
    """The captioning benchmarks among ``names`` are scored by lmms-eval with pycocoevalcap, whose PTB
    tokenizer and METEOR run Java: refused in one line, naming what to install, when either is missing."""
    asked = [task for task in names if BENCHMARKS[task].captions]
    if not asked:
        return
    missing = []
    for package, module in CAPTION_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the package itself is absent
            found = False
        if not found:
            missing.append(package)
    needs = []
    if missing:
        packages = f"package{'s' if len(missing) > 1 else ''} {' and '.join(missing)}"
        needs.append(f"the Python {packages} (`make lmms-install`, or pip install 'pycocoevalcap==1.2' "
                     "'pycocotools>=2.0.2' -c constraints/lmms.txt)")
    if shutil.which("java") is None:
        needs.append("a Java runtime (`java` on PATH, e.g. apt-get install default-jre-headless) for "
                     "pycocoevalcap's PTB tokenizer and METEOR")
    if needs:
        raise ValueError(
            f"the captioning benchmark{'s' if len(asked) > 1 else ''} {', '.join(asked)} "
            f"{'are' if len(asked) > 1 else 'is'} scored by lmms-eval with pycocoevalcap (BLEU, METEOR, "
            f"ROUGE-L, CIDEr); missing: {'; '.join(needs)}."
        )


def locate_all(names: Sequence[str], data_dir: str | Path | None) -> dict[str, Local | None]:
    """Every benchmark's local dataset (and judge), checked before any model is loaded.

    ``data_dir=None``: lmms-eval's own loading (HF cache or hub, as the environment says); only
    the judge is checked."""
    found: dict[str, Local | None] = {}
    missing: dict[str, MissingDataset] = {}  # every benchmark whose data are not there, named in one error
    tasks = expand(names)
    for task in tasks:
        bench = BENCHMARKS[task]
        check_judge(bench)
        if data_dir is None:
            found[task] = None
            continue
        for config in (None, *bench.extra_configs):
            try:
                local = locate(bench, Path(data_dir), config=config)
            except MissingDataset as err:
                missing[task] = err  # its first problem (the other configs live in the same copy)
                break
            if config is None:
                found[task] = local
    if len(missing) == 1:
        raise next(iter(missing.values()))
    if missing:
        root = Path(data_dir).expanduser().resolve()
        downloads = sorted({err.dataset for err in missing.values() if err.dataset})
        hint = (f"; on a machine with internet, for each HF dataset D of {', '.join(downloads)}: `hf download "
                f"--repo-type dataset D --local-dir {root}/D`, then copy it there") if downloads else ""
        raise MissingDataset(
            f"{len(missing)} of {len(tasks)} benchmarks have no usable local data under {root} "
            f"({', '.join(missing)}): " + " | ".join(err.problem for err in missing.values()) + hint + "."
        )
    check_captions(tasks)  # after the data (a fresh machine lacks those first), still before any model loads
    return found


class _Fn(str):
    """A ``!function module.name`` reference in a written task YAML."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Fn, lambda dumper, ref: dumper.represent_scalar("!function", str(ref)))

_GQA_MODULE = '''"""Written by harness.lmms.benchmarks: GQA's images from the local copy, not the hub."""
from harness.lmms.benchmarks import attach_gqa_images

IMAGES = {images!r}
FROM_DISK = {from_disk!r}


def gqa_process_docs(dataset):
    return attach_gqa_images(dataset, IMAGES, FROM_DISK)
'''


def attach_gqa_images(dataset, images: str, from_disk: bool):
    """What lmms-eval's ``gqa_process_docs`` does (an ``image`` column from the images config by
    ``imageId``), reading the images config from a local copy."""
    import datasets

    if from_disk:
        table = datasets.load_from_disk(images)["testdev"]
    else:
        table = datasets.load_dataset(images, "testdev_balanced_images", split="testdev")
    row_of = {image_id: i for i, image_id in enumerate(table["id"])}
    wanted = set(dataset["imageId"])
    missing = sorted(wanted - row_of.keys())
    if missing:
        raise MissingDataset(f"GQA images {missing[:3]} (of {len(missing)}) are not in {images}.")
    return dataset.map(lambda doc: {"image": table[row_of[doc["imageId"]]]["image"].convert("RGB")})


def local_name(task: str) -> str:
    return task + LOCAL_SUFFIX


def write_task_dir(names: Sequence[str], data_dir: str | Path | None, out_dir: str | Path,
                   found: dict[str, Local | None] | None = None) -> list[str]:
    """``out_dir``: one ``<task>_local.yaml`` per benchmark (checked first unless ``found`` is given).
    Returns the local task names, in order."""
    tasks = expand(names)
    found = locate_all(tasks, data_dir) if found is None else found
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task in tasks:
        bench, local = BENCHMARKS[task], found[task]
        # no tags: the local task joins none of the installed task's collections. A task that still
        # sets the deprecated `group` (coco2017_cap_val, nocaps_val) gets an empty group instead, since
        # lmms-eval refuses a task with both keys (and an empty group is read as no tags).
        labels = "group" if "group" in installed(bench) else "tag"
        config: dict = {"include": str(task_yaml(bench)), "task": local_name(task), labels: []}
        if bench.prompt_kwargs:  # the whole mapping: an include is merged key by key at the top level only
            kwargs = installed(bench).get("lmms_eval_specific_kwargs") or {"default": {}}
            config["lmms_eval_specific_kwargs"] = {
                model: {**(entry or {}), **dict(bench.prompt_kwargs)} for model, entry in kwargs.items()}
        if local is not None:
            config["dataset_path"] = str(local.path)
            config["dataset_kwargs"] = {"load_from_disk": True} if local.from_disk else {}
        if task == "gqa" and local is not None:
            images = locate(bench, Path(data_dir), config="testdev_balanced_images")
            (out / "lazyattn_local.py").write_text(
                _GQA_MODULE.format(images=str(images.path), from_disk=images.from_disk)
            )
            config["process_docs"] = _Fn("lazyattn_local.gqa_process_docs")
        if task == "mmbench_en_dev_static":
            config["metric_list"] = [{
                "metric": "gpt_eval_score",
                "aggregation": _Fn("lmms_eval.tasks.mmbench.en_utils.mmbench_aggregate_dev_results_static"),
                "higher_is_better": True,
            }]
        if task == "flickr30k_test":
            # its doc_to_target names a column Flickr30K lacks ("answer"), so every logged target was that
            # word; the references (what flickr_process_result scores against) instead. Scores are unchanged.
            config["doc_to_target"] = "caption"
        header = f"# {bench.title}: lmms-eval's {bench.installed_task} reading {local.path if local else 'its default source'}.\n"
        text = header + yaml.dump(config, Dumper=_Dumper, sort_keys=False)
        (out / f"{local_name(task)}.yaml").write_text(text)
        written.append(local_name(task))
    return written


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """No hub requests while local benchmarks run: the HF offline switches, as environment variables
    and as the already-imported libraries' settings, restored afterwards."""
    import datasets.config
    import huggingface_hub.constants as hub

    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    env = {k: os.environ.get(k) for k in keys}
    saved = (hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    os.environ.update({k: "1" for k in keys})
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m harness.lmms.benchmarks", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get(DATA_ENV, "data"),
                        help=f"holds <dataset_path>/ per benchmark (default: ${DATA_ENV} or ./data)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the task YAMLs (--include_path)")
    parser.add_argument("--tasks", default="paper", help=f"comma-separated: {', '.join([*GROUPS, *BENCHMARKS])}")
    args = parser.parse_args(argv)
    try:
        names = write_task_dir([t for t in args.tasks.split(",") if t], args.data_dir, args.out)
    except (MissingDataset, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"--include_path {args.out.resolve()} --tasks {','.join(names)}")


if __name__ == "__main__":
    main()
