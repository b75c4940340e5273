"""Paper benchmark presets through lmms-eval (harness/lmms/benchmarks.py) and data-parallel lmms-eval runs.

Offline: the benchmark datasets are tiny fakes written to tmp in the layouts a real local copy has
(a downloaded HF dataset repository; a ``save_to_disk`` copy), with the columns lmms-eval's task
utils read. Like tests/test_lmms.py these skip without lmms-eval, except in CI.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import OFFLINE, cfg_for
import yaml

if os.environ.get("CI"):
    import lmms_eval  # noqa: F401
else:
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed: run `make lmms-install`")

from harness.generate import generate_batch  # noqa: E402
from harness.lmms import benchmarks  # noqa: E402
from harness.lmms.tasks import evaluate_shapes  # noqa: E402
from harness.lmms.export_shapes import write_task_dir as write_shapes_dir  # noqa: E402
from harness.models import load_model  # noqa
from harness.run import run  # noqa: E402
from harness.lmms.tasks import LmmsBenchmarks  # noqa: E402
from harness.run import build_task  # noqa: E402
from lazyattn import LazyAttention  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# task=benchmarks with one lmms-eval task each, and the paper preset
PRESETS = [*(("task=benchmarks", f"task.lmms_tasks=[{name}]") for name in (
    "gqa", "mmbench_en_dev_static", "mme", "pope", "scienceqa_img", "vqav2_val", "textvqa_val", "mmmu_val",
    "llava_in_the_wild")), ("task=paper",)]
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
            assert installed["task"] == name and installed["dataset_path"], name
    assert list(cfg_for("task=paper").task.lmms_tasks) == list(benchmarks.PAPER)
    assert benchmarks.expand(["paper", "pope", "llava_in_the_wild"]) == [*benchmarks.PAPER, "llava_in_the_wild"]
    with pytest.raises(ValueError, match="unknown lmms-eval benchmark 'coco2017_cap_val'"):
        benchmarks.expand(["coco2017_cap_val"])
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
    names = benchmarks.write_task_dir(list(benchmarks.BENCHMARKS), data, tmp_path / "tasks")
    assert names == [f"{t}_local" for t in benchmarks.BENCHMARKS]
    for task, name in zip(benchmarks.BENCHMARKS, names):
        config = load_yaml_config(str(tmp_path / "tasks" / f"{name}.yaml"), mode="full")
        assert config["task"] == name and config["tag"] == []
        assert config["dataset_path"] == str(data / benchmarks.source(benchmarks.BENCHMARKS[task]).dataset_path)
        assert config["dataset_kwargs"] == {} and callable(config["doc_to_visual"])
    assert callable(load_yaml_config(str(tmp_path / "tasks" / "gqa_local.yaml"), mode="full")["process_docs"])
    mmbench = load_yaml_config(str(tmp_path / "tasks" / "mmbench_en_dev_static_local.yaml"), mode="full")
    assert [m["metric"] for m in mmbench["metric_list"]] == ["gpt_eval_score"]  # no xlsx submission
    assert mmbench["metric_list"][0]["aggregation"].__name__ == "mmbench_aggregate_dev_results_static"


def test_missing_dataset_is_one_clear_error_before_the_model_loads(tmp_path, monkeypatch):
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
    proc = subprocess.run([sys.executable, "-m", "harness", "task=paper", f"task.data_dir={tmp_path / 'empty'}",
                           f"out_dir={tmp_path / 'cli'}", "device=cpu"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **OFFLINE})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"error: 8 of 8 benchmarks have no usable local data under {tmp_path / 'empty'} "
                                  f"({', '.join(benchmarks.PAPER)}): ")
    for task in benchmarks.PAPER:  # every missing dataset is named, each once
        what = f"{task} ({benchmarks.BENCHMARKS[task].title}) needs the HF dataset"
        assert proc.stderr.count(what) == 1, task
    assert "hf download --repo-type dataset D --local-dir" in proc.stderr


def test_several_missing_datasets_are_named_in_one_error(tmp_path):
    data = tmp_path / "data"
    fake_pope(data)
    fake_gqa(data, with_images=False)
    with pytest.raises(benchmarks.MissingDataset) as err:
        benchmarks.check(["pope", "mme", "gqa", "textvqa_val"], data)
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
    assert set(result["tasks"]["gqa"]) == {"n", "exact_match", "exact_match_stderr_clt"}  # lmms-eval's stderr kept
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
        direct = generate_batch(model.model, model.processor, histories, [p["image"] for p in pope], [6] * 3, "cpu")
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


def test_data_parallel_cli_equals_single_process(tmp_path):
    """torchrun, two CPU processes (gloo), ``python -m lmms_eval --model lazyattn``: lmms-eval shards
    the documents by rank and gathers them; the merged samples and scores equal one process's."""
    task = build_task(cfg_for("task=shapes_lmms").task)
    samples = task.samples(10)  # 2 per question type: every subtask has a document on both ranks
    tasks_dir = tmp_path / "tasks"
    write_shapes_dir(samples, task.qtypes, task.image_size, tasks_dir, task.max_new_tokens)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lmms_eval", "--model", "lazyattn",
           "--model_args", "model=llava_tiny_random,method=lazy,method.layers=[1,3,5]",
           "--tasks", "lazyattn_shapes", "--include_path", str(tasks_dir), "--batch_size", "2",
           "--device", "cpu", "--output_path", str(out), "--log_samples"]
    env = {**os.environ, **OFFLINE, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False, env=env)
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
