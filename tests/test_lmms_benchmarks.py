"""Paper benchmark presets through lmms-eval (harness/lmms/benchmarks.py) and data-parallel lmms-eval runs.

Offline: the benchmark datasets are tiny fakes written to tmp in the layouts a real local copy has
(a downloaded HF dataset repository; a ``save_to_disk`` copy), with the columns lmms-eval's task
utils read. Like tests/test_lmms.py these skip without lmms-eval, except in CI.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import OFFLINE, cfg_for, harness_cli
import yaml

if os.environ.get("CI"):
    import lmms_eval  # noqa: F401
else:
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed: run `make lmms-install`")

from harness.generate import Conversation, answer  # noqa: E402
from harness.lmms import benchmarks  # noqa: E402
from harness.lmms.backend import _metrics, evaluate_shapes  # noqa: E402
from harness.lmms.export_shapes import write_task_dir as write_shapes_dir  # noqa: E402
from harness.models import load_model  # noqa
from harness.run import run  # noqa: E402
from harness.lmms.backend import LmmsBenchmarks  # noqa: E402
from harness.tasks import build as build_task  # noqa: E402
from lazyattn import LazyAttention  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# task=benchmarks with one lmms-eval task each, and the paper preset
PRESETS = [*(("task=benchmarks", f"task.lmms_tasks=[{name}]") for name in (
    "gqa", "mmbench_en_dev_static", "mme", "pope", "scienceqa_img", "vqav2_val", "textvqa_val", "mmmu_val",
    "vizwiz_vqa_val", "ai2d", "coco2017_cap_val", "nocaps_val", "flickr30k_test", "llava_in_the_wild")),
    ("task=paper",)]
# The paper's twelve (GQA, VQAv2, TextVQA, VizWiz, AI2D, ScienceQA-IMG, MMMU, MMBench, POPE, COCO Captions,
# NoCaps, Flickr30K) as lmms-eval tasks under the references' protocols (TextVQA with OCR tokens, POPE as
# its three subsets), written out here rather than read from the code under test
TWELVE = ["gqa", "vqav2_val", "textvqa_val_ocr", "vizwiz_vqa_val", "ai2d", "scienceqa_img", "mmmu_val",
          "mmbench_en_dev_static", "pope_adv", "pope_pop", "pope_random", "coco2017_cap_val", "nocaps_val",
          "flickr30k_test"]
needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="caption scoring (pycocoevalcap's PTB tokenizer, METEOR) needs `java` on PATH")
POPE_POST = "\nAnswer the question using a single word or phrase."  # pope.yaml's default post_prompt


pytestmark = pytest.mark.usefixtures("offline_hf")


def image(seed: int, size: int = 32):
    from PIL import Image

    return Image.new("RGB", (size, size), ((70 * seed) % 256, (40 + 90 * seed) % 256, (200 - 50 * seed) % 256))


def fake_pope(data_dir: Path) -> list[dict]:
    """POPE as a ``save_to_disk`` copy: question_id, question, answer, image (what pope/utils.py reads)."""
    import datasets

    rows = [{"question_id": str(i), "question": q, "answer": a, "image": image(i), "category": "adversarial"}
            for i, (q, a) in enumerate([("is there a dog in the image ?", "yes"), ("is there a cat ?", "no"),
                                        ("is there a red square ?", "yes")])]
    features = datasets.Features({"question_id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "image": datasets.Image(),
                                  "category": datasets.Value("string")})
    ds = datasets.Dataset.from_list(rows, features=features)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(data_dir / "lmms-lab-encoder" / "POPE"))
    return rows


def fake_gqa(data_dir: Path, with_images: bool = True) -> None:
    """GQA as a downloaded repository: README naming two configs, questions and images as parquet."""
    import datasets

    root = data_dir / "lmms-lab-encoder" / "GQA"
    configs = ["testdev_balanced_instructions"] + (["testdev_balanced_images"] if with_images else [])
    (root / configs[0]).mkdir(parents=True)
    entry = "- config_name: {c}\n  data_files:\n  - split: testdev\n    path: {c}/testdev-*\n"
    entries = "".join(entry.format(c=c) for c in configs)
    (root / "README.md").write_text(f"---\nconfigs:\n{entries}---\n")
    questions = {"id": ["q0", "q1"], "imageId": ["n2", "n1"], "question": ["what colour ?", "is it big ?"],
                 "answer": ["blue", "no"]}
    datasets.Dataset.from_dict(questions).to_parquet(str(root / configs[0] / "testdev-00000-of-00001.parquet"))
    if with_images:
        (root / configs[1]).mkdir()
        feats = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()})
        datasets.Dataset.from_dict({"id": ["n1", "n2"], "image": [image(5), image(6)]}, features=feats).to_parquet(
            str(root / configs[1] / "testdev-00000-of-00001.parquet"))


def test_every_preset_composes_to_installed_lmms_eval_tasks():
    from lmms_eval.utils import load_yaml_config

    for preset in PRESETS:
        judged = preset[-1] == "task.lmms_tasks=[llava_in_the_wild]"
        task = None if judged else build_task(cfg_for(*preset, "task.data_dir=null").task)
        cfg = cfg_for(*preset).task
        assert cfg.backend == "lmms_eval" and cfg.name == "lmms_eval" and cfg.lmms_tasks, preset
        assert cfg.data_dir == os.environ.get("LAZYATTN_DATA", "data")
        if task is not None:
            assert isinstance(task, LmmsBenchmarks) and task.data_dir is None
        for name in benchmarks.expand(cfg.lmms_tasks):
            installed = load_yaml_config(str(benchmarks.task_yaml(benchmarks.BENCHMARKS[name])), mode="simple")
            assert installed["task"] == benchmarks.BENCHMARKS[name].installed_task and installed["dataset_path"], name
    assert list(cfg_for("task=paper").task.lmms_tasks) == list(benchmarks.PAPER) == TWELVE
    assert "mme" in benchmarks.BENCHMARKS and "mme" not in benchmarks.PAPER  # available, not the paper's
    assert [t for t in TWELVE if benchmarks.BENCHMARKS[t].captions] == ["coco2017_cap_val", "nocaps_val",
                                                                         "flickr30k_test"]
    assert benchmarks.expand(["paper", "pope_adv", "llava_in_the_wild"]) == [*benchmarks.PAPER, "llava_in_the_wild"]
    assert benchmarks.expand(["paper", "pope"]) == [*TWELVE, "pope"]  # the mixed 9,000: another protocol
    assert benchmarks.expand(["paper", "mme"]) == [*TWELVE, "mme"]
    assert benchmarks.expand(["pope_full"]) == ["pope_adv", "pope_pop", "pope_random"]
    with pytest.raises(ValueError, match="unknown lmms-eval benchmark 'coco_karpathy_test'"):
        benchmarks.expand(["coco_karpathy_test"])
    with pytest.raises(ValueError, match="no benchmarks given"):
        build_task(cfg_for("task=benchmarks").task)
    with pytest.raises(ValueError, match="task.backend=lmms_eval only"):
        build_task(cfg_for("task=benchmarks", "task.lmms_tasks=[pope]", "task.backend=builtin").task)


def test_local_task_yamls_load_in_lmms_eval(tmp_path, monkeypatch):
    """Every written task includes the installed one, is renamed *_local, reads the local dir, and its
    !function references (GQA's images, MMBench's rule-based scoring) import."""
    from lmms_eval.utils import load_yaml_config

    data = tmp_path / "data"
    monkeypatch.setattr(benchmarks, "locate", lambda b, d, config=None, split=None: benchmarks.Local(
        Path(d) / benchmarks.source(b).dataset_path, from_disk=False))
    monkeypatch.setattr(benchmarks, "check_judge", lambda bench: None)  # LLaVA-Bench's judge: tested below
    monkeypatch.setattr(benchmarks, "check_captions", lambda names: None)  # pycocoevalcap and Java: tested below
    names = benchmarks.write_task_dir(list(benchmarks.BENCHMARKS), data, tmp_path / "tasks")
    assert names == [f"{t}_local" for t in benchmarks.BENCHMARKS]
    for task, name in zip(benchmarks.BENCHMARKS, names):
        config = load_yaml_config(str(tmp_path / "tasks" / f"{name}.yaml"), mode="full")
        # no tags; the two caption tasks that still set lmms-eval's deprecated `group` get an empty one
        labels = "group" if task in ("coco2017_cap_val", "nocaps_val") else "tag"
        assert config["task"] == name and config[labels] == [] and config.get("tag", []) == []
        assert config["dataset_path"] == str(data / benchmarks.source(benchmarks.BENCHMARKS[task]).dataset_path)
        assert config["dataset_kwargs"] == {} and callable(config["doc_to_visual"])
    assert callable(load_yaml_config(str(tmp_path / "tasks" / "gqa_local.yaml"), mode="full")["process_docs"])
    mmbench = load_yaml_config(str(tmp_path / "tasks" / "mmbench_en_dev_static_local.yaml"), mode="full")
    assert [m["metric"] for m in mmbench["metric_list"]] == ["gpt_eval_score"]  # no xlsx submission
    assert mmbench["metric_list"][0]["aggregation"].__name__ == "mmbench_aggregate_dev_results_static"
    flickr = load_yaml_config(str(tmp_path / "tasks" / "flickr30k_test_local.yaml"), mode="full")
    assert flickr["doc_to_target"] == "caption"  # its references, not the literal word lmms-eval's YAML gives
    assert flickr["process_results"].__name__ == "flickr_process_result"  # scoring stays lmms-eval's
    ocr = load_yaml_config(str(tmp_path / "tasks" / "textvqa_val_ocr_local.yaml"), mode="full")
    plain = load_yaml_config(str(tmp_path / "tasks" / "textvqa_val_local.yaml"), mode="full")
    assert ocr["lmms_eval_specific_kwargs"]["default"]["ocr"] is True  # every model's entry asks for OCR tokens
    assert all(entry["ocr"] is True for entry in ocr["lmms_eval_specific_kwargs"].values())
    assert plain["lmms_eval_specific_kwargs"]["default"]["ocr"] is False  # lmms-eval's default left alone
    for entry, default in zip(ocr["lmms_eval_specific_kwargs"].values(), plain["lmms_eval_specific_kwargs"].values()):
        assert {k: v for k, v in entry.items() if k != "ocr"} == {k: v for k, v in default.items() if k != "ocr"}
    assert {k: v for k, v in ocr.items() if k not in ("task", "lmms_eval_specific_kwargs")}.keys() == {
        k for k in plain if k not in ("task", "lmms_eval_specific_kwargs")}
    for subset, split in zip(("pope_adv", "pope_pop", "pope_random"), ("adversarial", "popular", "random")):
        config = load_yaml_config(str(tmp_path / "tasks" / f"{subset}_local.yaml"), mode="full")
        assert (config["dataset_name"], config["test_split"].strip()) == ("Full", split)


def test_missing_dataset_is_one_clear_error_before_the_model_loads(tmp_path, monkeypatch, capfd):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data were checked")

    monkeypatch.setattr("harness.run.load_model", no_model)
    data = tmp_path / "data"
    fake_pope(data)
    common = ("method=lazy", "device=cpu", f"out_dir={tmp_path / 'out'}", f"task.data_dir={data}")
    with pytest.raises(benchmarks.MissingDataset) as err:
        run(cfg_for("task=benchmarks", "task.lmms_tasks=[pope,mme]", *common))
    message = str(err.value)
    assert "\n" not in message
    assert "mme (MME) needs the HF dataset lmms-lab-encoder/MME" in message
    assert f"not found at {data / 'lmms-lab-encoder' / 'MME'}" in message
    hint = f"hf download --repo-type dataset lmms-lab-encoder/MME --local-dir {data / 'lmms-lab-encoder/MME'}"
    assert hint in message

    fake_gqa(data, with_images=False)  # the questions are there, the images config is not
    with pytest.raises(benchmarks.MissingDataset, match="config testdev_balanced_images, split testdev.*not a usable"):
        run(cfg_for("task=benchmarks", "task.lmms_tasks=[gqa]", *common))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="scored by an LLM judge.*OPENAI_API_KEY"):
        run(cfg_for("task=benchmarks", "task.lmms_tasks=[llava_in_the_wild]", *common))
    with pytest.raises(ValueError, match="method.layers=auto calibrates on the shapes val split"):
        run(cfg_for("task=benchmarks", "task.lmms_tasks=[pope]", *common, "method=lazy_calibrated"))

    # from the command line: exit status 2 and the one line on stderr, in seconds
    status, _, stderr = harness_cli(["task=paper", f"task.data_dir={tmp_path / 'empty'}", f"out_dir={tmp_path / 'cli'}",
                                     "device=cpu"], monkeypatch, capfd, cwd=ROOT, env=OFFLINE)
    assert status == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines() == [stderr.strip()]
    assert stderr.startswith(f"error: 14 of 14 benchmarks have no usable local data under {tmp_path / 'empty'} "
                                  f"({', '.join(TWELVE)}): ")
    for task in TWELVE:  # every missing dataset is named, each once
        what = f"{task} ({benchmarks.BENCHMARKS[task].title}) needs the HF dataset"
        assert stderr.count(what) == 1, task
    assert "hf download --repo-type dataset D --local-dir" in stderr
    for dataset in ("VizWiz-VQA", "ai2d", "COCO-Caption2017", "NoCaps", "flickr30k"):
        assert f"lmms-lab-encoder/{dataset}," in stderr or f"lmms-lab-encoder/{dataset}:" in stderr


def test_several_missing_datasets_are_named_in_one_error(tmp_path):
    data = tmp_path / "data"
    fake_pope(data)
    fake_gqa(data, with_images=False)
    with pytest.raises(benchmarks.MissingDataset) as err:
        benchmarks.locate_all(["pope", "mme", "gqa", "textvqa_val"], data)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"3 of 4 benchmarks have no usable local data under {data} (mme, gqa, textvqa_val): ")
    assert "pope (POPE)" not in message  # its data are there
    assert f"mme (MME) needs the HF dataset lmms-lab-encoder/MME (split test), not found at {data / 'lmms-lab-encoder/MME'}" in message
    assert "gqa (GQA test-dev balanced) needs the HF dataset lmms-lab-encoder/GQA (config testdev_balanced_images" in message
    assert "textvqa_val (TextVQA val)" in message
    assert "lmms-lab-encoder/MME, lmms-lab-encoder/textvqa" in message and message.endswith("then copy it there.")


def test_benchmarks_run_end_to_end_from_local_data(tmp_path):
    """task=benchmarks with POPE (save_to_disk copy) and GQA (repository copy, images from their own
    config) on llava_tiny_random: each lands under its own key, scored by lmms-eval from the local rows."""
    data = tmp_path / "data"
    pope = fake_pope(data)
    fake_gqa(data)
    out = tmp_path / "out"
    path = run(cfg_for("task=benchmarks", "task.lmms_tasks=[pope,gqa]", f"task.data_dir={data}", "method=lazy",
                       "model=llava_tiny_random",
                       "method.layers=[1,3,5]", "task.max_new_tokens=6", "batch_size=2", "device=cpu", f"out_dir={out}",
                       "efficiency.batch_size=1", "efficiency.repeats=1", "efficiency.warmup=0",
                       "efficiency.new_tokens=2", "wandb.mode=disabled"))
    result = json.loads(path.read_text())
    assert list(result["tasks"]) == ["pope", "gqa"] and list(result["tasks_dense"]) == ["pope", "gqa"]
    assert result["tasks"]["pope"]["n"] == 3 and result["tasks"]["gqa"]["n"] == 2
    assert {"pope_accuracy", "pope_f1_score", "pope_precision", "pope_recall"} <= set(result["tasks"]["pope"])
    # lmms-eval's stderr kept; the paired change against dense of the declared per-sample metric added
    assert set(result["tasks"]["gqa"]) == {"n", "exact_match", "exact_match_stderr_clt", "delta", "delta_ci95"}
    assert set(result["tasks_dense"]["gqa"]) == {"n", "exact_match", "exact_match_stderr_clt"}
    assert set(result["lmms_eval"]) == {"version", "dense", "method"}
    assert result["efficiency"]["kv_reduction"] == pytest.approx(3 / 24)  # 3 lazy layers of 12 drop their keys

    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["id"]) for r in rows] == [
        (v, i) for v in ("dense", "method") for i in ("pope/0", "pope/1", "pope/2", "gqa/0", "gqa/1")]
    assert [r["target"] for r in rows[:5]] == ["yes", "no", "yes", "blue", "no"]
    for variant in ("dense", "method"):
        got = [r for r in rows if r["variant"] == variant and r["task"] == "pope"]
        hits = [float(r["prediction"].lower().strip() == p["answer"]) for r, p in zip(got, pope)]
        assert result["tasks" if variant == "method" else "tasks_dense"]["pope"]["pope_accuracy"] == pytest.approx(
            sum(hits) / len(hits))
        assert [r["pope_accuracy"] for r in got] == hits

    # lmms-eval asked exactly the local rows: the same answers as generating on them directly
    method_rows = [r for r in rows if r["variant"] == "method" and r["task"] == "pope"]
    model = load_model(cfg_for("model=llava_tiny_random").model)
    histories = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p["question"] + POPE_POST}]}]
                 for p in pope]
    with LazyAttention(layers=[1, 3, 5]).apply(model.model):
        asked = [Conversation(str(i), h, [p["image"]], [6]) for i, (h, p) in enumerate(zip(histories, pope))]
        direct = [a.prediction for a in answer(model.model, model.processor, asked, 3, "cpu")]
    assert [r["prediction"] for r in method_rows] == direct


def test_benchmarks_cli_writes_an_include_path(tmp_path, capsys):
    data = tmp_path / "data"
    fake_pope(data)
    benchmarks.main(["--data-dir", str(data), "--out", str(tmp_path / "tasks"), "--tasks", "pope"])
    assert capsys.readouterr().out.split() == ["--include_path", str(tmp_path / "tasks"), "--tasks", "pope_local"]
    config = yaml.safe_load((tmp_path / "tasks" / "pope_local.yaml").read_text())
    assert config["dataset_kwargs"] == {"load_from_disk": True}
    with pytest.raises(SystemExit) as exc:
        benchmarks.main(["--data-dir", str(data), "--out", str(tmp_path / "t2"), "--tasks", "paper"])
    assert exc.value.code == 2
    assert "lmms-lab-encoder/GQA" in capsys.readouterr().err


def _torchrun_command(tmp):
    task = build_task(cfg_for("task=shapes_lmms").task)
    samples = task.samples(10)  # 2 per question type: every subtask has a document on both ranks
    tasks_dir = tmp / "tasks"
    write_shapes_dir(samples, task.qtypes, task.image_size, tasks_dir, task.max_new_tokens)
    out = tmp / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lmms_eval", "--model", "lazyattn",
           "--model_args", "model=llava_tiny_random,method=lazy,method.layers=[1,3,5]",
           "--tasks", "lazyattn_shapes", "--include_path", str(tasks_dir), "--batch_size", "2",
           "--device", "cpu", "--output_path", str(out), "--log_samples"]
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(tmp / "hf_datasets"), "ACCELERATE_USE_CPU": "true",
           "OMP_NUM_THREADS": "1"}
    return {"args": cmd, "cwd": ROOT, "timeout": 600, "env": env}, (task, samples, out)


@pytest.mark.real_process(prepare=_torchrun_command)
def test_data_parallel_cli_equals_single_process(real_process, tmp_path):
    """torchrun, two CPU processes (gloo), ``python -m lmms_eval --model lazyattn``: lmms-eval shards
    the documents by rank and gathers them; the merged samples and scores equal one process's. The
    command runs beside the in-process tests (tests/conftest.py)."""
    proc, (task, samples, out), _ = real_process
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert "Running on rank 1" in proc.stdout + proc.stderr, log
    results = list(out.rglob("*_results.json"))
    assert len(results) == 1, log  # written once, by rank 0 (lmms-eval's CLI exits 0 even on errors)
    merged = json.loads(results[0].read_text())

    parallel = {}
    for path in out.rglob("*_samples_lazyattn_shapes_*.jsonl"):
        qtype = path.stem.rsplit("lazyattn_shapes_", 1)[1]
        ids = [s.id for s in samples if s.qtype == qtype]
        for line in path.read_text().splitlines():
            row = json.loads(line)
            parallel[ids[row["doc_id"]]] = row["filtered_resps"]
    assert len(parallel) == 10  # both ranks' documents, each once (padding requests are dropped)

    loaded = load_model(cfg_for("model=llava_tiny_random").model)
    single, scores, summary = evaluate_shapes(task, loaded, LazyAttention(layers=[1, 3, 5]), samples, 4, "cpu",
                                              tmp_path / "single")
    assert parallel == {s.id: p for s, p in zip(samples, single)}
    def numbers(entry):
        return {k: v for k, v in entry.items() if "stderr" not in k and isinstance(v, (int, float))}

    assert set(merged["results"]) == set(summary["results"])
    for name, entry in summary["results"].items():
        assert numbers(merged["results"][name]) == pytest.approx(numbers(entry)), name
    assert merged["n-samples"] == summary["n-samples"]


# ---- the paper's other benchmarks: VizWiz, AI2D and the three captioning sets -------------------


def save(data_dir: Path, dataset_path: str, split: str, rows: list[dict], features, as_repo: bool) -> None:
    """One split of a fake HF dataset, as a downloaded repository (parquet + README naming the split)
    or as a ``save_to_disk`` copy: the two layouts a real local copy has."""
    import datasets

    root = data_dir / dataset_path
    ds = datasets.Dataset.from_list(rows, features=datasets.Features(features))
    if as_repo:
        (root / "data").mkdir(parents=True)
        entry = f"- config_name: default\n  data_files:\n  - split: {split}\n    path: data/{split}-*\n"
        (root / "README.md").write_text(f"---\nconfigs:\n{entry}---\n")
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    else:
        datasets.DatasetDict({split: ds}).save_to_disk(str(root))


def fake_vizwiz(data_dir: Path) -> None:
    """VizWiz-VQA val (repository copy): question_id, image, question, ten crowd answers, category."""
    import datasets

    s = datasets.Value("string")
    rows = [{"question_id": "VizWiz_val_0", "image": image(1), "question": "what colour is this shirt?",
             "answers": ["blue"] * 8 + ["navy", "dark blue"], "category": "other"},
            {"question_id": "VizWiz_val_1", "image": image(2), "question": "what is this?",
             "answers": ["unanswerable"] * 10, "category": "unanswerable"}]
    save(data_dir, "lmms-lab-encoder/VizWiz-VQA", "val", rows,
         {"question_id": s, "image": datasets.Image(), "question": s, "answers": datasets.Sequence(s),
          "category": s}, as_repo=True)


def fake_ai2d(data_dir: Path) -> None:
    """AI2D test (save_to_disk copy): question, options, answer (the option's index as a string), image."""
    import datasets

    s = datasets.Value("string")
    rows = [{"question": "which animal eats the grass?", "options": ["hawk", "rabbit", "snake", "sun"],
             "answer": "1", "image": image(3)},
            {"question": "what is the source of energy?", "options": ["sun", "moon", "grass"], "answer": "0",
             "image": image(4)}]
    save(data_dir, "lmms-lab-encoder/ai2d", "test", rows,
         {"question": s, "options": datasets.Sequence(s), "answer": s, "image": datasets.Image()}, as_repo=False)


# Two images whose reference captions share few words (CIDEr's IDF comes from the references).
CAPTIONS = [["a brown dog runs across a grassy field", "a dog running on green grass",
             "the brown dog is running in a park", "a puppy runs through the grass", "a dog plays on a lawn"],
            ["two people ride bicycles down a city street", "cyclists riding through traffic downtown",
             "a man and a woman on bikes in the city", "people cycling along an urban road",
             "two riders pedal past tall buildings"]]
WRONG = ["a bowl of soup on a wooden table", "an airplane flying over snowy mountains"]


def fake_coco(data_dir: Path) -> None:
    """COCO-Caption2017 val (repository copy): question_id (the file name), image, question, answer (the
    five references), id, and the COCO image fields."""
    import datasets

    s, i = datasets.Value("string"), datasets.Value("int64")
    rows = [{"question_id": f"{n:012d}.jpg", "image": image(5 + k), "question": "", "answer": refs, "id": n,
             "license": 1, "file_name": f"{n:012d}.jpg", "coco_url": "", "height": 32, "width": 32,
             "date_captured": ""} for k, (n, refs) in enumerate(zip((139, 632), CAPTIONS))]
    save(data_dir, "lmms-lab-encoder/COCO-Caption2017", "val", rows,
         {"question_id": s, "image": datasets.Image(), "question": s, "answer": datasets.Sequence(s), "id": i,
          "license": i, "file_name": s, "coco_url": s, "height": i, "width": i, "date_captured": s}, as_repo=True)


def fake_nocaps(data_dir: Path) -> None:
    """NoCaps validation (save_to_disk copy): image, image_id, the references in annotations_captions."""
    import datasets

    s, i = datasets.Value("string"), datasets.Value("int64")
    rows = [{"image": image(7 + k), "image_id": k, "image_file_name": f"{k:016x}.jpg",
             "annotations_ids": list(range(5 * k, 5 * k + 5)), "annotations_captions": refs}
            for k, refs in enumerate(CAPTIONS)]
    save(data_dir, "lmms-lab-encoder/NoCaps", "validation", rows,
         {"image": datasets.Image(), "image_id": i, "image_file_name": s, "annotations_ids": datasets.Sequence(i),
          "annotations_captions": datasets.Sequence(s)}, as_repo=False)


def fake_flickr(data_dir: Path) -> None:
    """Flickr30K test (repository copy): image, caption (the references), sentids, img_id, filename."""
    import datasets

    s = datasets.Value("string")
    rows = [{"image": image(9 + k), "caption": refs, "sentids": [str(5 * k + j) for j in range(5)],
             "img_id": str(k), "filename": f"{1000 + k}.jpg"} for k, refs in enumerate(CAPTIONS)]
    save(data_dir, "lmms-lab-encoder/flickr30k", "test", rows,
         {"image": datasets.Image(), "caption": datasets.Sequence(s), "sentids": datasets.Sequence(s),
          "img_id": s, "filename": s}, as_repo=True)


FAKES = {"vizwiz_vqa_val": fake_vizwiz, "ai2d": fake_ai2d, "coco2017_cap_val": fake_coco,
         "nocaps_val": fake_nocaps, "flickr30k_test": fake_flickr}
CAPTION_TASKS = ["coco2017_cap_val", "nocaps_val", "flickr30k_test"]
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."


@pytest.fixture
def one_meteor_process(monkeypatch):
    """lmms-eval's caption aggregation runs once per metric (seven per benchmark), and each run starts a
    METEOR Java process (loading its paraphrase tables) for its scorer list, used or not, and tokenizes
    the same captions again with the Java PTB tokenizer. The scores are the same with one METEOR process
    for the test and one tokenization per distinct input: the Java scoring still runs, with a seventh
    of the process starts."""
    import copy

    import pycocoevalcap.eval
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    shared: list = []

    def meteor():
        if not shared:
            shared.append(Meteor())
        return shared[0]

    monkeypatch.setattr(pycocoevalcap.eval, "Meteor", meteor)
    for module in list(sys.modules.values()):  # lmms-eval's task utils imported before this test
        if getattr(module, "Meteor", None) is Meteor and module is not sys.modules["pycocoevalcap.meteor.meteor"]:
            monkeypatch.setattr(module, "Meteor", meteor)
    real, memo = PTBTokenizer.tokenize, {}

    def tokenize(self, captions):
        key = repr(captions)
        if key not in memo:
            memo[key] = real(self, captions)
        return copy.deepcopy(memo[key])

    monkeypatch.setattr(PTBTokenizer, "tokenize", tokenize)
    yield
    if shared:
        shared[0].close() if hasattr(shared[0], "close") else None


def scripted_evaluate(tasks: list[str], data_dir: Path, work: Path, answers: dict[str, list[str]]):
    """lmms-eval's ``simple_evaluate`` on the local task YAMLs the harness writes, with a model that
    answers each document from ``answers[task][doc_id]``: lmms-eval builds the requests, reads every
    image and scores the answers with its own task code. Returns its results and what was asked."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    local = benchmarks.write_task_dir(tasks, data_dir, work / "tasks")
    model = scripted_model(answers)
    with benchmarks.hub_offline():
        results = simple_evaluate(
            model=model, tasks=local, batch_size=1, log_samples=True, bootstrap_iters=0, verbosity="WARNING",
            task_manager=TaskManager("WARNING", include_path=str(work / "tasks"), include_defaults=False),
            process_docs_parallel=1, cli_args=argparse.Namespace(output_path=str(work), process_with_media=False))
    return {name: results["results"][benchmarks.local_name(name)] for name in tasks}, model.asked


def scripted_model(answers: dict[str, list[str]]):
    """An lmms-eval model that answers each document from ``answers[task][doc_id]`` and records what it
    was asked (task, doc_id, prompt, image sizes) in ``asked``."""
    from lmms_eval.api.model import lmms

    class Scripted(lmms):
        def __init__(self):
            super().__init__()
            self.asked = []
            self.first_prompt = None  # what the harness's LazyAttnLMM keeps for timing: nothing here

        def generate_until(self, requests):
            out = []
            for request in requests:
                context, _gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                visuals = doc_to_visual(self.task_dict[task][split][doc_id])
                self.asked.append((task, doc_id, context, [v.size for v in visuals]))
                out.append(answers[task.removesuffix(benchmarks.LOCAL_SUFFIX)][doc_id])
            return out

        def loglikelihood(self, requests):
            raise NotImplementedError

        def generate_until_multi_round(self, requests):
            raise NotImplementedError

    return Scripted()


def test_vizwiz_and_ai2d_are_scored_by_lmms_eval(tmp_path):
    """lmms-eval's own prompts and scoring on local rows: VizWiz's VQA accuracy over ten crowd answers
    (after its answer normalisation), AI2D's option letter by its regex filter."""
    data = tmp_path / "data"
    fake_vizwiz(data)
    fake_ai2d(data)
    answers = {"vizwiz_vqa_val": ["Blue.", "Unanswerable"], "ai2d": ["B. rabbit", "C"]}
    results, asked = scripted_evaluate(["vizwiz_vqa_val", "ai2d"], data, tmp_path / "w", answers)
    # VizWiz: "Blue." normalises to 8 of the 10 answers (accuracy 1), "Unanswerable" matches all 10
    assert _metrics(results["vizwiz_vqa_val"]) == {"exact_match": 1.0, "exact_match_stderr_clt": 0.0}
    # AI2D: "B. rabbit" -> B = options[1], right; "C" for an answer of A, wrong
    assert _metrics(results["ai2d"]) == {"exact_match": 0.5, "exact_match_stderr_clt": 0.5}
    prompts = {(task, doc): text for task, doc, text, _ in asked}
    assert prompts[("vizwiz_vqa_val_local", 0)].startswith("What colour is this shirt?\nWhen the provided "
                                                           "information is insufficient, respond with 'Unanswerable'.")
    assert prompts[("ai2d_local", 1)] == ("what is the source of energy?\nA. sun\nB. moon\nC. grass\nAnswer with "
                                          "the option's letter from the given choices directly.")
    assert all(sizes == [(32, 32)] for *_, sizes in asked) and len(asked) == 4  # every local image was read

    # a partial VizWiz match: "navy" is 1 of the 10 answers, so 9 of the 10 leave-one-out subsets credit it 1/3
    results, _ = scripted_evaluate(["vizwiz_vqa_val"], data, tmp_path / "w2",
                                   {"vizwiz_vqa_val": ["navy", "a red shirt"]})
    assert _metrics(results["vizwiz_vqa_val"])["exact_match"] == pytest.approx((0.9 * 1 / 3 + 0) / 2)


@needs_java
def test_caption_benchmarks_are_scored_by_lmms_eval(tmp_path, one_meteor_process):
    """COCO 2017 (repository copy), NoCaps (save_to_disk) and Flickr30K (repository): lmms-eval's prompt
    and its aggregation over pycocoevalcap (PTB tokenizer and METEOR in Java). A caption identical to one
    of its image's references scores BLEU 1 and CIDEr above 0; unrelated captions score lower on every metric."""
    data = tmp_path / "data"
    for task in CAPTION_TASKS:
        FAKES[task](data)
    right = [CAPTIONS[0][1], CAPTIONS[1][0]]
    good, asked = scripted_evaluate(CAPTION_TASKS, data, tmp_path / "right", dict.fromkeys(CAPTION_TASKS, right))
    bad, _ = scripted_evaluate(CAPTION_TASKS, data, tmp_path / "wrong", dict.fromkeys(CAPTION_TASKS, WRONG))
    assert sorted((task, doc) for task, doc, *_ in asked) == [(f"{t}_local", d) for t in sorted(CAPTION_TASKS)
                                                              for d in (0, 1)]
    assert {text for _, _, text, _ in asked} == {CAPTION_PROMPT}
    for task, prefix in zip(CAPTION_TASKS, ("coco", "nocaps", "flickr")):
        hit, miss = _metrics(good[task]), _metrics(bad[task])  # the keys result.json gets
        metrics = [f"{prefix}_{m}" for m in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")]
        assert set(hit) == set(miss) == set(metrics), task
        assert hit[f"{prefix}_Bleu_4"] == pytest.approx(1.0, abs=1e-6), task
        assert hit[f"{prefix}_ROUGE_L"] == pytest.approx(1.0), task
        assert hit[f"{prefix}_CIDEr"] > 1.0 and hit[f"{prefix}_METEOR"] > 0.5, (task, hit)
        assert miss[f"{prefix}_CIDEr"] < 0.5 * hit[f"{prefix}_CIDEr"], (task, miss)
        assert all(miss[m] < hit[m] for m in metrics), (task, hit, miss)
    # the same rows and predictions give the same scores whichever dataset they come from
    assert [v for v in _metrics(good["coco2017_cap_val"]).values()] == pytest.approx(
        [v for v in _metrics(good["flickr30k_test"]).values()])
    assert (tmp_path / "right" / "submissions").is_dir()  # lmms-eval's prediction files land in the work dir


def test_caption_benchmarks_are_refused_without_pycocoevalcap_or_java(tmp_path, monkeypatch):
    """One line naming what to install, after the data check and before the model loads; the other
    benchmarks do not need either."""
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the caption scorer was checked")

    monkeypatch.setattr("harness.run.load_model", no_model)
    data = tmp_path / "data"
    fake_pope(data)
    fake_nocaps(data)
    fake_flickr(data)
    common = ("method=lazy", "device=cpu", f"out_dir={tmp_path / 'out'}", f"task.data_dir={data}")
    for name in [m for m in list(sys.modules) if m.split(".")[0] in ("pycocoevalcap", "pycocotools")] + [
            "pycocoevalcap", "pycocotools"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: importing it fails
    with pytest.raises(ValueError) as err:
        run(cfg_for("task=benchmarks", "task.lmms_tasks=[pope,nocaps_val,flickr30k_test]", *common))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("the captioning benchmarks nocaps_val, flickr30k_test are scored by lmms-eval with "
                              "pycocoevalcap")
    assert "missing: the Python packages pycocoevalcap and pycocotools (`make lmms-install`, or pip install " \
           "'pycocoevalcap==1.2' 'pycocotools>=2.0.2' -c constraints/lmms.txt)" in message
    assert benchmarks.locate_all(["pope"], data)["pope"].from_disk  # no caption task: nothing else is needed

    monkeypatch.undo()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no `java` on PATH
    with pytest.raises(ValueError) as err:
        benchmarks.locate_all(["nocaps_val"], data)
    assert str(err.value) == (
        "the captioning benchmark nocaps_val is scored by lmms-eval with pycocoevalcap (BLEU, METEOR, ROUGE-L, "
        "CIDEr); missing: a Java runtime (`java` on PATH, e.g. apt-get install default-jre-headless) for "
        "pycocoevalcap's PTB tokenizer and METEOR.")


@needs_java
def test_new_benchmarks_run_end_to_end_from_local_data(tmp_path, one_meteor_process):
    """AI2D, VizWiz and Flickr30K through the harness on llava_tiny_random: each under its own key in
    result.json, every caption metric lmms-eval reports, one row per document in samples.jsonl."""
    data = tmp_path / "data"
    for task in ("ai2d", "vizwiz_vqa_val", "flickr30k_test"):
        FAKES[task](data)
    out = tmp_path / "out"
    path = run(cfg_for("task=benchmarks", "task.lmms_tasks=[ai2d,vizwiz_vqa_val,flickr30k_test]",
                       f"task.data_dir={data}", "method=lazy", "model=llava_tiny_random", "method.layers=[1,3,5]",
                       "compare_dense=false", "task.max_new_tokens=6", "batch_size=2", "device=cpu",
                       f"out_dir={out}", "efficiency.batch_size=1", "efficiency.repeats=1", "efficiency.warmup=0",
                       "efficiency.new_tokens=2", "wandb.mode=disabled"))
    result = json.loads(path.read_text())
    tasks = result["tasks"]
    assert list(tasks) == ["ai2d", "vizwiz_vqa_val", "flickr30k_test"]
    assert set(tasks["ai2d"]) == {"n", "exact_match", "exact_match_stderr_clt"}
    assert set(tasks["vizwiz_vqa_val"]) == {"n", "exact_match", "exact_match_stderr_clt", "protocol"}
    assert "val" in tasks["vizwiz_vqa_val"]["protocol"] and "test-dev" in tasks["vizwiz_vqa_val"]["protocol"]
    assert set(tasks["flickr30k_test"]) == {"n", *(f"flickr_{m}" for m in (
        "Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"))}
    assert all(t["n"] == 2 for t in tasks.values())
    assert all(0 <= v <= 10 for v in tasks["flickr30k_test"].values())
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"{t}/{d}" for t in tasks for d in (0, 1)]
    assert [r["target"] for r in rows[:2]] == ["B", "A"]
    assert rows[4]["target"] == CAPTIONS[0]  # the references a caption was scored against


# ---- task=paper under the references' protocols: TextVQA with OCR tokens, POPE as its subsets' mean F1 ----


def fake_textvqa(data_dir: Path) -> list[dict]:
    """TextVQA validation (save_to_disk copy): question_id, question, image, ten answers, ocr_tokens."""
    import datasets

    s = datasets.Value("string")
    rows = [{"question_id": 0, "image_id": "a0", "question": "what BRAND is the drink?", "image": image(1),
             "answers": ["coca cola"] * 7 + ["coke"] * 3, "ocr_tokens": ["COCA", "Cola", "330ml"]},
            {"question_id": 1, "image_id": "a1", "question": "what does the sign say?", "image": image(2),
             "answers": ["stop"] * 10, "ocr_tokens": ["STOP"]}]
    save(data_dir, "lmms-lab-encoder/textvqa", "validation", rows,
         {"question_id": datasets.Value("int64"), "image_id": s, "question": s, "image": datasets.Image(),
          "answers": datasets.Sequence(s), "ocr_tokens": datasets.Sequence(s)}, as_repo=False)
    return rows


# POPE's three subsets (the `Full` config): ground truth and the scripted answers, per subset
POPE_GT = ["yes", "yes", "no", "no"]
POPE_ANSWERS = {"pope_adv": ["yes", "no", "yes", "no"],  # TP 1, FP 1, FN 1: P 1/2, R 1/2, F1 1/2
                "pope_pop": ["Yes", "yes", "no", " No "],  # all right (lowercased, stripped): F1 1
                "pope_random": ["yes", "Yes.", "no", "yes"]}  # "yes." is neither: TP 1, FP 1, FN 0: F1 2/3


def fake_pope_full(data_dir: Path) -> None:
    """POPE's `Full` config as a save_to_disk copy (<root>/Full/): splits adversarial, popular, random."""
    import datasets

    features = datasets.Features({"question_id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "image": datasets.Image(),
                                  "category": datasets.Value("string")})
    splits = {}
    for k, split in enumerate(("adversarial", "popular", "random")):
        rows = [{"question_id": f"{split}{i}", "question": f"is there a thing {i} in the {split} image ?",
                 "answer": gt, "image": image(k + i), "category": split} for i, gt in enumerate(POPE_GT)]
        splits[split] = datasets.Dataset.from_list(rows, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(data_dir / "lmms-lab-encoder" / "POPE" / "Full"))


def hand_f1(truth: list[str], said: list[str]) -> float:
    """POPE's F1, by hand: an answer counts as "yes" or "no" only when it is exactly that (lowercased, stripped)."""
    said = [a.lower().strip() for a in said]
    tp = sum(t == "yes" and a == "yes" for t, a in zip(truth, said))
    fp = sum(t == "no" and a == "yes" for t, a in zip(truth, said))
    fn = sum(t == "yes" and a == "no" for t, a in zip(truth, said))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


def test_paper_preset_names_the_references_protocols(tmp_path, monkeypatch):
    """task=paper runs TextVQA with the reference OCR tokens (lmms-eval's textvqa_val, ocr: true) and POPE as
    its three subsets (the Full config's adversarial, popular, random splits), not textvqa_val / pope."""
    tasks = list(cfg_for("task=paper").task.lmms_tasks)
    assert "textvqa_val_ocr" in tasks and "textvqa_val" not in tasks
    assert [t for t in tasks if t.startswith("pope")] == ["pope_adv", "pope_pop", "pope_random"]
    assert benchmarks.BENCHMARKS["textvqa_val_ocr"].installed_task == "textvqa_val"
    assert benchmarks.source(benchmarks.BENCHMARKS["textvqa_val_ocr"]) == benchmarks.Source(
        "lmms-lab-encoder/textvqa", None, "validation")
    for name, split in zip(("pope_adv", "pope_pop", "pope_random"), ("adversarial", "popular", "random")):
        assert benchmarks.source(benchmarks.BENCHMARKS[name]) == benchmarks.Source("lmms-lab-encoder/POPE", "Full",
                                                                                     split)
    # the test-dev references of VQAv2 and VizWiz are named beside the val scores
    for name in ("vqav2_val", "vizwiz_vqa_val"):
        assert "test-dev" in benchmarks.PROTOCOL[name] and "val" in benchmarks.PROTOCOL[name]
    assert "mean" in benchmarks.PROTOCOL["pope_full"] and "OCR" in benchmarks.PROTOCOL["textvqa_val_ocr"]

    # the local data check looks for POPE's Full config, each split
    data = tmp_path / "data"
    fake_pope(data)  # the default config only (the mixed `test` split): not what the subsets need
    with pytest.raises(benchmarks.MissingDataset, match=r"pope_adv \(POPE adversarial\) needs the HF dataset "
                                                          r"lmms-lab-encoder/POPE \(config Full, split adversarial\)"):
        benchmarks.locate_all(["pope_adv"], data)
    fake_pope_full(data)
    found = benchmarks.locate_all(["pope_full"], data)
    assert list(found) == ["pope_adv", "pope_pop", "pope_random"]
    assert {local.path for local in found.values()} == {data / "lmms-lab-encoder" / "POPE" / "Full"}


def test_textvqa_ocr_prompt_reaches_the_model(tmp_path):
    """textvqa_val_ocr asks lmms-eval's prompt with the reference OCR tokens (question capitalised as
    lmms-eval does, then "\nReference OCR token: a, b, c"); textvqa_val asks without them; both are
    scored by lmms-eval's VQA accuracy."""
    data = tmp_path / "data"
    fake_textvqa(data)
    answers = {"textvqa_val_ocr": ["Coca Cola", "go"], "textvqa_val": ["coke", "stop"]}
    results, asked = scripted_evaluate(["textvqa_val_ocr", "textvqa_val"], data, tmp_path / "w", answers)
    prompts = {(task, doc): text for task, doc, text, _ in asked}
    post = "\nAnswer the question using a single word or phrase."
    assert prompts[("textvqa_val_ocr_local", 0)] == (
        "What brand is the drink?\nReference OCR token: COCA, Cola, 330ml" + post)
    assert prompts[("textvqa_val_ocr_local", 1)] == "What does the sign say?\nReference OCR token: STOP" + post
    assert prompts[("textvqa_val_local", 0)] == "What brand is the drink?" + post  # lmms-eval's default: no tokens
    # VQA accuracy (leave one answer out, min(1, matches / 3), averaged): "Coca Cola" matches 7 of 10 (1 on
    # every subset), "go" none; "coke" matches 3 of 10 (1 on the 7 subsets that keep all three, 2/3 on the
    # other 3), "stop" all
    assert _metrics(results["textvqa_val_ocr"])["exact_match"] == pytest.approx(0.5)
    assert _metrics(results["textvqa_val"])["exact_match"] == pytest.approx(((7 * 1 + 3 * 2 / 3) / 10 + 1) / 2)


def test_pope_number_is_the_mean_of_its_subsets_f1_and_the_paper_table(tmp_path, monkeypatch, capsys):
    """POPE's three subsets scored by lmms-eval from local rows (scripted answers, through the harness's
    lmms-eval backend and run, task=paper with two of its benchmarks): result.json keeps each subset's
    scores and adds pope_full, whose pope_f1_score is the mean of the three F1 computed by hand here;
    TextVQA's and POPE's protocol notes are recorded beside their scores. The paper table shows each
    benchmark by its protocol's metric (POPE: the mean subset F1), a row per method, with KV cut and
    throughput; `make table-paper` renders it; a tree the report cannot render is refused in one line."""
    from harness import report
    from harness.lmms.model import LazyAttnLMM

    data = tmp_path / "data"
    fake_pope_full(data)
    fake_textvqa(data)
    answers = {**POPE_ANSWERS, "textvqa_val_ocr": ["coca cola", "stop"]}
    scripted = scripted_model(answers)
    scripted.first_prompt = ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is it ?"}]}],
                             [image(0)])  # the timing batch's prompt, as LazyAttnLMM keeps its first
    monkeypatch.setattr(LazyAttnLMM, "from_loaded", classmethod(lambda cls, *args, **kwargs: scripted))
    root = tmp_path / "paper"
    out = root / "lazy"
    path = run(cfg_for("task=paper", "task.lmms_tasks=[pope_full,textvqa_val_ocr]", f"task.data_dir={data}",
                       "method=lazy", "method.layers=[1,3,5]", "model=llava_tiny_random", "device=cpu",
                       f"out_dir={out}", "efficiency.batch_size=1", "efficiency.repeats=1", "efficiency.warmup=0",
                       "efficiency.new_tokens=2", "wandb.mode=disabled"))
    result = json.loads(path.read_text())
    tasks = result["tasks"]
    assert list(tasks) == ["pope_adv", "pope_pop", "pope_random", "pope_full", "textvqa_val_ocr"]
    f1 = {name: hand_f1(POPE_GT, said) for name, said in POPE_ANSWERS.items()}
    assert f1 == pytest.approx({"pope_adv": 1 / 2, "pope_pop": 1.0, "pope_random": 2 / 3})
    for name in POPE_ANSWERS:  # each subset as lmms-eval scores it, kept
        assert tasks[name]["n"] == 4 and tasks[name]["pope_f1_score"] == pytest.approx(f1[name]), name
    pope = tasks["pope_full"]
    assert pope["pope_f1_score"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)  # the POPE number: mean subset F1
    assert pope["subsets"] == pytest.approx(f1) and pope["of"] == ["pope_adv", "pope_pop", "pope_random"]
    assert pope["n"] == 12 and pope["pope_accuracy"] == pytest.approx((2 / 4 + 4 / 4 + 2 / 4) / 3)
    assert "mean" in pope["protocol"] and "pope_f1_score" in pope["protocol"]
    assert tasks["textvqa_val_ocr"]["exact_match"] == pytest.approx(1.0)
    assert "Reference OCR token" in tasks["textvqa_val_ocr"]["protocol"]
    assert {task for task, *_ in scripted.asked} == {f"{t}_local" for t in [*POPE_ANSWERS, "textvqa_val_ocr"]}
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows[:4]] == [f"pope_adv/{i}" for i in range(4)]  # per-sample rows keep the subset
    assert not any(r["task"] == "pope_full" for r in rows)
    # each benchmark's declared metrics recorded; POPE's subsets judged by their F1, pope_full too
    assert result["metrics"]["pope_full"]["metrics"][0]["name"] == "pope_f1_score"
    assert result["headline"]["acc_samples"] == pytest.approx(f1["pope_adv"])  # the first task's, by its F1

    # the paper table: the paper's order (TextVQA before POPE), each column by its protocol's metric
    capsys.readouterr()
    report.main(["paper", "--results", str(root), "--out", str(tmp_path / "rendered")])
    written, err = capsys.readouterr()
    md = tmp_path / "rendered" / "tables" / "paper.md"
    assert str(md) in written and "the paper table has no results for gqa, vqav2_val" in err
    header, *body = [[c.strip() for c in line.strip("|").split("|")] for line in md.read_text().splitlines()
                     if line.startswith("| ")]
    assert header == ["Method", "Model", "TextVQA EM", "POPE F1", "KV cut timing batch", "Decode tok/s", "Decode ×"]
    by_label = {row[0]: row for row in body}
    lazy = result["method"]["label"]
    assert set(by_label) == {lazy, "Dense (in-run)"}  # dense scored beside the method
    for row in by_label.values():  # the same scripted answers for both variants
        assert row[2:4] == ["100.0", f"{100 * (1 / 2 + 1 + 2 / 3) / 3:.1f}"]
    assert by_label[lazy][4] == "12.5 %"  # 3 lazy layers of 12 keep no keys: 3/24 of the KV cache
    assert float(by_label[lazy][5]) > 0 and float(by_label[lazy][6].split()[0]) > 0
    dense_tps = result["efficiency"]["dense"]["decode_tokens_per_s"]  # dense's, timed beside the method
    assert by_label["Dense (in-run)"][4:] == ["0.0 %", f"{dense_tps:.0f}", "–"]
    assert (tmp_path / "rendered" / "tables" / "paper.tex").read_text().count(r"\\") == 3

    # make table-paper renders this tree; `make tables` lists it
    make = subprocess.run(["make", "-n", "table-paper", f"PAPER_RESULTS={root}", "STAMP=", "BIN=bin"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert f"bin/python -m harness.report paper --results {root} --out {root}" in make.stdout
    tables = next(line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("tables:"))
    assert "table-paper" in tables.split()

    # a tree a table cannot show is refused in one line, never rendered empty
    for what, results, message in (("main", root, "the main table has nothing to show"),
                                   ("paper", ROOT / "results" / "tiny" / "dense", "no task=paper results")):
        with pytest.raises(SystemExit) as refused:
            report.main([what, "--results", str(results), "--out", str(tmp_path / "refused")])
        assert str(refused.value).startswith(f"error: {message}") and "\n" not in str(refused.value)
    assert not (tmp_path / "refused").exists()
