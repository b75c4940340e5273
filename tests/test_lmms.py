"""The lmms-eval backend: the ``lazyattn`` lmms-eval model and the shapes tasks agree with the built-in path.

lmms-eval is an optional install (``make lmms-install``; ``make test`` does it). Without it these
tests skip, except in CI, where a missing lmms-eval is a failure.
"""

import copy
import json
import os
import sys
from pathlib import Path

import pytest
from helpers import OFFLINE, cfg_for

if os.environ.get("CI"):
    import lmms_eval  # noqa: F401  (CI installs it: a missing lmms-eval must fail, not skip)
else:
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed: run `make lmms-install`")

from harness.lmms.backend import evaluate_shapes  # noqa: E402
from harness.lmms.export_shapes import write_task_dir  # noqa: E402
from harness.lmms.model import LazyAttnLMM, to_history  # noqa: E402
from harness.models import load_model
from harness.run import run  # noqa: E402
from harness.tasks import build as build_task  # noqa: E402
from harness.tracking import flatten  # noqa: E402
from lazyattn import LazyAttention  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("offline_hf")


def same_scores(got: dict, want: dict) -> None:
    """Equal keys everywhere, equal numbers to 1e-12 (lmms-eval's group mean is a weighted mean);
    lmms-eval's own standard errors (``*_stderr*``), which the built-in path has no counterpart of, aside."""
    got, want = flatten(got), flatten(want)
    assert any("_stderr" in k for k in got) or not any("_stderr" in k for k in want)
    got = {k: v for k, v in got.items() if "_stderr" not in k}
    if not any(k.endswith("_ci95") for k in got):  # lmms-eval's scores alone: the harness adds the intervals
        want = {k: v for k, v in want.items() if not k.endswith("_ci95")}
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def shapes_lmms(*extra):
    return build_task(cfg_for("task=shapes_lmms", *extra).task)


def test_entry_point_registers_lazyattn():
    from lmms_eval.models import get_model

    assert get_model("lazyattn") is LazyAttnLMM


def test_same_predictions_and_scores_as_builtin(tiny, tmp_path):
    """8 samples, every single-turn question type, lazy method: identical strings, equal scores."""
    task = shapes_lmms()
    samples = task.samples(8)
    assert {s.qtype for s in samples} == {"colour", "count", "exist", "position", "describe"}
    method = LazyAttention(ratio=0.5)
    with method.apply(tiny.model):
        builtin = task.predictions(tiny.model, tiny.processor, samples, 3, "cpu")
    predictions, scores, summary = evaluate_shapes(task, tiny, method, samples, 4, "cpu", tmp_path / "lmms")
    assert predictions == builtin
    assert len(set(builtin)) > 1  # the wide-init tiny model says different things to different prompts
    expected = task.score(samples, builtin)
    same_scores(scores, expected)
    assert summary["results"]["lazyattn_shapes_describe"]["f1,none"] == pytest.approx(expected["describe"]["f1"])


def test_harness_backend_lmms_eval_matches_builtin(tmp_path):
    """python -m harness task=shapes_lmms: the same result.json shape and rows as task.backend=builtin."""
    common = ("model=llava_tiny_random", "method=lazy", "limit=8", "batch_size=4", "device=cpu", "efficiency.enabled=false", "wandb.mode=disabled")
    results, rows = {}, {}
    for backend in ("lmms_eval", "builtin"):
        out = tmp_path / backend
        path = run(cfg_for("task=shapes_lmms", f"task.backend={backend}", f"out_dir={out}", *common))
        results[backend] = json.loads(path.read_text())
        rows[backend] = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    lmms, builtin = results["lmms_eval"], results["builtin"]
    for key in ("tasks", "tasks_dense"):
        same_scores(lmms[key], builtin[key])
    assert lmms["tasks"]["shapes"]["n"] == 8
    assert set(lmms["lmms_eval"]) == {"version", "dense", "method"} and "lmms_eval" not in builtin

    def view(r):
        return [(row["variant"], row["id"], row["prediction"], row["acc"]) for row in r]

    assert view(rows["lmms_eval"]) == view(rows["builtin"])


def _lmms_eval_command(tmp):
    task = shapes_lmms()
    samples = task.samples(6)
    tasks_dir = tmp / "tasks"
    write_task_dir(samples, task.qtypes, task.image_size, tasks_dir, task.max_new_tokens)
    out = tmp / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "lazyattn",
           "--model_args", "model=llava_tiny_random,method=lazy,method.layers=[1,3,5]",
           "--tasks", "lazyattn_shapes", "--include_path", str(tasks_dir), "--batch_size", "4",
           "--device", "cpu", "--output_path", str(out), "--log_samples"]
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(tmp / "hf_datasets")}
    return {"args": cmd, "cwd": ROOT, "timeout": 600, "env": env}, (task, samples, out)


@pytest.mark.real_process(prepare=_lmms_eval_command)
def test_cli_matches_builtin(real_process):
    """python -m lmms_eval --model lazyattn ... on an exported task dir: the built-in path's answers.
    The command runs beside the in-process tests (tests/conftest.py)."""
    proc, (task, samples, out), _ = real_process
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "lazyattn_shapes" in proc.stdout

    cli = {}
    for path in out.rglob("*_samples_lazyattn_shapes_*.jsonl"):
        qtype = path.stem.rsplit("lazyattn_shapes_", 1)[1]
        ids = [s.id for s in samples if s.qtype == qtype]  # a subtask's docs, in parquet order
        for line in path.read_text().splitlines():
            row = json.loads(line)
            cli[ids[row["doc_id"]]] = row["filtered_resps"]
    loaded = load_model(cfg_for("model=llava_tiny_random").model)
    with LazyAttention(layers=[1, 3, 5]).apply(loaded.model):
        builtin = task.predictions(loaded.model, loaded.processor, samples, 2, "cpu")
    assert cli == {s.id: p for s, p in zip(samples, builtin)}


def test_model_args_compose_the_harness_presets():
    lmm = LazyAttnLMM(model="llava_tiny_random", method="lazy", device="cpu", batch_size=2,
                      **{"method.layers": "[2,4]", "model.text.layers": 6})
    assert lmm.method.lazy_layers(6) == [2, 4] and lmm.loaded.n_layers == 6 and lmm.batch_size == 2
    with pytest.raises(ValueError, match="unknown lazyattn model_args"):
        LazyAttnLMM(model="llava_tiny_random", ratio=0.5)
    with pytest.raises(ValueError, match="calibration"):
        LazyAttnLMM(model="llava_tiny_random", method="lazy", **{"method.layers": "auto"})


def test_chat_messages_become_harness_history():
    from PIL import Image

    image = Image.new("RGB", (8, 8))
    history, images = to_history([{"role": "user", "content": [{"type": "image", "url": image},
                                                                {"type": "text", "text": "what colour ?"}]}])
    assert history == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour ?"}]}]
    assert len(images) == 1
    with pytest.raises(NotImplementedError, match="video"):
        to_history([{"role": "user", "content": [{"type": "video", "url": "x.mp4"}]}])


def test_multiturn_is_refused_clearly():
    with pytest.raises(ValueError, match="single-turn"):
        build_task(cfg_for("task.backend=lmms_eval").task)  # task=shapes asks multiturn questions too
    with pytest.raises(ValueError, match="VLMEvalKit runs its own datasets: use task=vlmeval"):
        build_task(cfg_for("task.backend=vlmeval").task)
    with pytest.raises(ValueError, match="task.backend must be one of"):
        build_task(cfg_for("task.backend=nope").task)


def test_pip_check_accepts_only_documented_skips():
    from harness.lmms.pip_check import skipped, unexpected

    allowed = skipped()
    assert {"wandb", "torchvision"} <= allowed
    report = (
        "lmms-eval 0.7.3 requires torchvision>=0.16.0, which is not installed.\n"
        "lmms-eval 0.7.3 has requirement wandb==0.25.0, but you have wandb 0.31.0.\n"
        "lmms-eval 0.7.3 requires accelerate, which is not installed.\n"
        "evaluate 0.4.6 requires datasets, which is not installed.\n"
    )
    assert unexpected(report, allowed) == [
        "lmms-eval 0.7.3 requires accelerate, which is not installed.",
        "evaluate 0.4.6 requires datasets, which is not installed.",
    ]


def test_an_exported_task_dir_has_relative_data_paths_and_moves(tmp_path):
    """The YAMLs name their parquet relative to themselves (lmms-eval resolves it against the YAML's
    folder), so a moved folder still loads, with the same documents."""
    import shutil

    from lmms_eval.tasks import TaskManager, get_task_dict

    task = shapes_lmms()
    samples = task.samples(10)
    names = write_task_dir(samples, task.qtypes, task.image_size, tmp_path / "a", task.max_new_tokens)
    for name in names[:-1]:
        text = (tmp_path / "a" / f"{name}.yaml").read_text()
        assert str(tmp_path) not in text and "test: shapes.parquet" in text
    shutil.move(tmp_path / "a", tmp_path / "b")
    tasks = get_task_dict(["lazyattn_shapes"], TaskManager("WARNING", include_path=str(tmp_path / "b"),
                                                           include_defaults=False))
    docs = {name: t.dataset["test"]["id"] for group in tasks.values() for name, t in group.items()}
    assert docs == {f"lazyattn_shapes_{q}": [s.id for s in samples if s.qtype == q] for q in task.qtypes}


def test_a_row_the_model_cannot_read_is_named(tiny):
    """The harness path (from_loaded): a document whose image does not decode is a RunError naming the row."""
    import io
    from types import SimpleNamespace

    import datasets
    from PIL import Image

    from harness.settings import RunError
    from lazyattn import Dense

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    docs = datasets.Dataset.from_dict(
        {"id": ["a", "b"], "image": [{"bytes": png.getvalue(), "path": None}, {"bytes": b"not a png", "path": None}]},
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()}),
    )
    lmm = LazyAttnLMM.from_loaded(tiny, Dense(), "cpu")
    lmm.task_dict = {"mytask": {"test": docs}}
    ask = lambda doc: [{"role": "user", "content": [{"type": "image", "url": doc["image"]}]}]  # noqa: E731
    with pytest.raises(RunError, match=r"^mytask \(test split\) doc 1 \(id b\): its prompt or image cannot be read "
                                       r"\(UnidentifiedImageError"):
        lmm.generate_until([SimpleNamespace(args=("", ask, {"max_new_tokens": 1}, i, "mytask", "test")) for i in (0, 1)])


def _broken(kind: str, tasks_dir: Path, samples) -> None:
    """Spoil an exported task dir: no parquet, or the image of the third sample not an image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tasks_dir / "shapes.parquet"
    if kind == "no parquet":
        parquet.unlink()
    elif kind == "corrupt image":
        table = pq.read_table(parquet)
        rows = table.to_pylist()
        rows[2]["image"] = {"bytes": b"not a png", "path": None}
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), parquet)


def _corrupt_row(samples):
    from harness.lmms.export_shapes import task_name

    s = samples[2]
    doc = [x.id for x in samples if x.qtype == s.qtype].index(s.id)
    return f"error: {task_name(s.qtype)} (test split) doc {doc} (sample {s.id}): its image cannot be decoded"


_DEFAULT_INDEX: dict = {}


def lmms_eval_cli(args, cwd, monkeypatch, capfd):
    """``python -m lmms_eval ARGS`` in this process (lmms-eval's own CLI dispatcher): (status, stdout,
    stderr), captured at the file-descriptor level (lmms-eval logs through loguru). lmms-eval indexes
    its own shipped task YAMLs (about 2,000 files, 4-5 s) on every run; that index is the same for
    every case, so it is built once per session (the cases' own task folders are indexed each time)."""
    import lmms_eval.tasks as lmms_tasks
    from lmms_eval.cli.dispatch import main
    from loguru import logger

    real = lmms_tasks.TaskManager._get_task_and_group
    defaults = str(Path(lmms_tasks.__file__).parent)

    def index(self, task_dir):
        if str(task_dir).rstrip("/") != defaults:
            return real(self, task_dir)
        if "index" not in _DEFAULT_INDEX:
            _DEFAULT_INDEX["index"] = real(self, task_dir)
        return copy.deepcopy(_DEFAULT_INDEX["index"])

    monkeypatch.setattr(lmms_tasks.TaskManager, "_get_task_and_group", index)

    monkeypatch.chdir(cwd)
    for key, value in {**OFFLINE, "HF_DATASETS_CACHE": str(cwd / "hf"), "VERBOSITY": "INFO"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["lmms_eval", *args])
    capfd.readouterr()
    status = 0
    try:
        main()
    except SystemExit as exit:
        status = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    finally:
        logger.remove()  # lmms-eval pointed loguru at this test's captured stdout
        logger.add(sys.stderr, level="WARNING")
    out, err = capfd.readouterr()
    return status, out, err


@pytest.mark.parametrize(
    "case, model_args, device, message",
    [
        ("no parquet", "model=llava_tiny", "cpu", lambda s: "error: lazyattn_shapes_"),
        ("corrupt image", "model=llava_tiny", "cpu", _corrupt_row),
        ("ok", "model=hf,model.path=/nope", "cpu", lambda s: "error: the lazyattn model: model.path '/nope' does not exist"),
        ("ok", "model=llava_tiny", "cuda", lambda s: "error: the lazyattn model: device=cuda but no CUDA device is visible"),
        ("ok", "model=llava_tiny,method=fastv,method.layers=[2]", "cpu",
         lambda s: "error: the lazyattn model: method fastv has no setting 'layers' (in 'method.layers=[2]'); its settings:"),
    ],
    ids=["no parquet", "corrupt image", "no model.path", "cuda without CUDA", "unknown method key"],
)
def test_lmms_eval_cli_failures_exit_2_with_one_error_line(tmp_path, case, model_args, device, message, monkeypatch,
                                                           capfd):
    """lmms-eval's CLI prints any exception of a model or task and exits 0: ours exit 2 with one error line.
    lmms-eval's CLI runs in this process (its real process is test_cli_matches_builtin)."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    task = shapes_lmms()
    samples = task.samples(5)
    tasks_dir = tmp_path / "tasks"
    write_task_dir(samples, task.qtypes, task.image_size, tasks_dir, task.max_new_tokens)
    _broken(case, tasks_dir, samples)
    args = ["--model", "lazyattn", "--model_args", model_args, "--tasks", "lazyattn_shapes", "--include_path",
            str(tasks_dir), "--batch_size", "4", "--device", device, "--output_path", str(tmp_path / "out")]
    status, stdout, stderr = lmms_eval_cli(args, tmp_path, monkeypatch, capfd)
    assert status == 2, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stdout + stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr[-2000:]
    assert errors[0].startswith(message(samples)), errors[0]
    if case == "no parquet":
        assert "shapes.parquet (beside the task YAML) is not there" in errors[0]
    assert not list((tmp_path / "out").rglob("*_results.json"))
