"""The harness end to end: configs compose, runs write results, errors are clear."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cfg_for, harness_cli, harness_precheck
from omegaconf import open_dict

from harness import measure
from harness.generate import prompt_inputs
from harness.settings import RunError
from harness.run import run
from harness.tasks import build as build_task
from harness.tasks import first_turn
from lazyattn import LazyAttention

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
EXPS = sorted(p.stem for p in (CONF / "exp").glob("*.yaml"))


@pytest.mark.parametrize("exp", EXPS)
def test_every_exp_composes(exp):
    cfg = cfg_for(f"+exp={exp}")
    assert cfg.model.name and cfg.method.name and cfg.task.name


def test_overrides_compose():
    cfg = cfg_for("+exp=llava_lazy", "method.layers=[2,4]", "limit=3", "batch_size=2", "seed=5",
                  "device=cpu", "out_dir=/tmp/x", "wandb.mode=disabled", "method.ratio=0.25")
    assert list(cfg.method.layers) == [2, 4] and cfg.limit == 3 and cfg.wandb.mode == "disabled"


def small(tmp_path, *extra):
    # the harness mechanics on the in-memory random model, with uniform lazy layers
    cfg = cfg_for("+exp=llava_lazy", "model=llava_tiny_random", "method.layers=null", "limit=6", "batch_size=3",
                  f"out_dir={tmp_path}",
                  "efficiency.new_tokens=4", "efficiency.repeats=1", "wandb.mode=disabled", *extra)
    return cfg


def test_run_writes_result(tmp_path):
    path = run(small(tmp_path))
    result = json.loads(path.read_text())
    for key in ("schema_version", "exp", "model", "method", "tasks", "efficiency", "env", "config"):
        assert key in result
    n = result["model"]["n_layers"]
    lazy = result["method"]["lazy_layers"]
    assert lazy == [1, 3, 5, 7, 9, 11]
    assert result["efficiency"]["kv_reduction"] == pytest.approx(len(lazy) / (2 * n), abs=1e-12)
    assert result["tasks"]["shapes"]["n"] == 6 and "colour" in result["tasks"]["shapes"]
    assert result["tasks_dense"]["shapes"]["n"] == 6
    assert set(result["env"]) >= {"python", "torch", "transformers", "git_sha", "dirty"}
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {r["variant"] for r in rows} == {"dense", "method"}
    assert not (tmp_path / "samples.partial.jsonl").exists()
    multi = [r for r in rows if r["qtype"] == "multiturn"]
    assert multi and all(len(r["turns"]) == 2 for r in multi)
    with pytest.raises(RunError, match="overwrite=true"):
        run(small(tmp_path))


def test_predictions_do_not_depend_on_batch_size(tiny):
    task = build_task(cfg_for().task)
    samples = task.samples(6)
    with LazyAttention(ratio=0.5).apply(tiny.model):
        one = task.predictions(tiny.model, tiny.processor, samples, 1, "cpu")
        four = task.predictions(tiny.model, tiny.processor, samples, 4, "cpu")
    assert one == four
    assert len(set(one)) > 1


def test_interrupted_run_resumes_finished_samples(tmp_path, monkeypatch):
    import harness.tasks as run_mod

    calls = []
    real = run_mod.answer

    def flaky(model, processor, conversations, *args, **kwargs):
        asked = list(conversations)
        calls.append(len(asked))
        for i, ans in enumerate(real(model, processor, asked, *args, **kwargs)):
            if len(calls) == 1 and i == 3:  # dense pass: 3 samples finished, then "crash"
                raise KeyboardInterrupt
            yield ans

    monkeypatch.setattr(run_mod, "answer", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(small(tmp_path))
    assert not (tmp_path / "result.json").exists()
    assert len((tmp_path / "samples.partial.jsonl").read_text().splitlines()) == 3
    run(small(tmp_path))
    assert calls[:2] == [6, 3]  # the resumed dense pass asked only the three unfinished samples
    assert json.loads((tmp_path / "result.json").read_text())["tasks_dense"]["shapes"]["n"] == 6


def test_bad_settings_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(small(tmp_path, "model=hf", "model.path=/nonexistent/llava"))
    with pytest.raises(ValueError, match="model.path is not set"):
        run(small(tmp_path, "model=hf"))
    with pytest.raises(ValueError, match="out of range"):
        run(small(tmp_path, "method.layers=[3,40]"))
    with pytest.raises(ValueError, match="layer 0"):
        run(small(tmp_path, "method.layers=[0,3]"))
    with pytest.raises(ValueError, match="qtypes"):
        run(small(tmp_path, "task.qtypes=[colour,smell]"))
    with pytest.raises(Exception, match="task/nosuch"):
        cfg_for("task=nosuch")


@pytest.mark.parametrize(
    "override, message",
    [
        ("limit=-3", "limit must be an integer >= 1 or null, got -3"),
        ("limit=0", "limit must be an integer >= 1 or null, got 0"),
        ("limit=ten", "limit must be an integer >= 1 or null, got 'ten'"),
        ("batch_size=0", "batch_size must be an integer >= 1"),
        ("efficiency.new_tokens=0", "efficiency.new_tokens must be an integer >= 1"),
        ("method.fastv.k=0", "FastV k must be an integer >= 1"),
        ("method.lazy.ratio=1.5", "ratio must be a number in \\[0, 1\\)"),
        ("device=tpu", "device must be auto, cpu or cuda"),
    ],
)
def test_bad_run_settings_name_their_key_before_any_model_loads(tmp_path, monkeypatch, override, message):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr("harness.run.load_model", no_model)
    with pytest.raises((RunError, ValueError), match=message):
        run(cfg_for("model=llava_tiny_random", "method=lazy_fastv", f"out_dir={tmp_path}", override))


@pytest.mark.parametrize(
    "args, message",
    [
        (["limt=16"], "error: unknown setting 'limt' (in 'limt=16'); did you mean 'limit'? the settings: model,"),
        (["+limt=16"], "error: unknown setting 'limt' (in '+limt=16'); did you mean 'limit'?"),
        (["efficiency.new_tokns=3"], "error: unknown setting 'efficiency.new_tokns' (in 'efficiency.new_tokns=3'); "
                                     "did you mean 'efficiency.new_tokens'? efficiency has: enabled,"),
        (["method=fastv", "method.layers=[2,3]"],
         "error: method fastv has no setting 'layers' (in 'method.layers=[2,3]'); its settings: k, ratio, score."),
        (["method=fastv", "+method.foo=1"], "error: method fastv has no setting 'foo' (in '+method.foo=1'); its settings: k,"),
        (["-m", "method=fastv,lazy", "method.k=3"], "error: method lazy has no setting 'k' (in 'method.k=3'); its settings:"),
        (["method=lazy_fastv", "method.lazy.ratoi=0.3"],
         "error: method lazy_fastv has no setting 'lazy.ratoi' (in 'method.lazy.ratoi=0.3'); did you mean 'lazy.ratio'?"),
        (["method=fastvv"], "error: unknown method preset 'fastvv' (in 'method=fastvv'); did you mean 'fastv'? the presets:"),
        (["limit=0"], "error: limit must be an integer >= 1 or null, got 0"),
        (["device=tpu"], "error: device must be auto, cpu or cuda, got 'tpu'."),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_bad_command_lines_are_one_line(tmp_path, args, message, monkeypatch, capsys):
    """From the command line (its checks before Hydra, in this process): exit status 2, one line on
    stderr, no traceback, nothing run."""
    status, err = harness_precheck([*args, "model=llava_tiny_random", f"out_dir={tmp_path}/r"], monkeypatch, capsys)
    assert status == 2, err[-2000:]
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(message), err
    assert not (tmp_path / "r").exists()


def test_hf_path_loads_a_saved_checkpoint(tmp_path, tiny):
    ckpt = tmp_path / "ckpt"
    tiny.model.save_pretrained(ckpt)
    tiny.processor.save_pretrained(ckpt)
    path = run(small(tmp_path / "out", "model=hf", f"model.path={ckpt}", "model.dtype=float32"))
    result = json.loads(path.read_text())
    assert result["model"]["name"] == "ckpt" and result["model"]["n_layers"] == 12


def test_time_against_dense_reports_formula(tiny):
    task = build_task(cfg_for().task)
    history, images = first_turn(task.samples(1)[0], task.image_size)
    inputs = prompt_inputs(tiny.processor, [history] * 2, images * 2, "cpu")
    method = LazyAttention(layers=[1, 2, 3])
    eff = measure.time_against_dense(tiny.model, inputs, method, new_tokens=3, repeats=2, warmup=1)
    assert eff["kv_reduction"] == pytest.approx(3 / 24, abs=1e-12)
    per_token = 2 * 12 * 2 * 2 * 16 * 4  # K and V, layers, batch, kv heads, head dim, fp32
    assert eff["dense"]["kv_cache_bytes"] == per_token * (eff["prompt_tokens"] + 3)
    assert eff["dense"]["decode_tokens_per_s"] > 0 and eff["method"]["prefill_ms"] > 0


def _harness_command(tmp):
    out = tmp / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    return {"args": [sys.executable, "-m", "harness", "+exp=llava_lazy", "limit=6", f"out_dir={out}",
                     "efficiency.new_tokens=4", "efficiency.repeats=1"],
            "cwd": tmp, "env": env, "timeout": 300}, out


@pytest.mark.real_process(prepare=_harness_command)
def test_cli_run_with_wandb_offline(real_process):
    """``python -m harness`` in a real process (its command runs beside the in-process tests, tests/conftest.py)."""
    proc, out, _ = real_process
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out / "result.json")
    result = json.loads((out / "result.json").read_text())
    assert result["efficiency"]["kv_reduction"] == pytest.approx(6 / 24)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_cli_error_is_one_clear_line(tmp_path, monkeypatch, capfd):
    status, _, err = harness_cli(["model=hf", "model.path=/nope", f"out_dir={tmp_path}/r"], monkeypatch, capfd,
                                 cwd=tmp_path)
    assert status == 2 and "error: model.path '/nope' does not exist" in err


def test_auto_layers_calibrate_once_and_are_recorded(tmp_path, monkeypatch):
    import lazyattn.calibration as calib  # where the lazy-layer calibrator measures

    extra = ("method.layers=auto", "method.ratio=0.5", "calibration.samples=2",
             f"calibration.dir={tmp_path / 'calib'}", "efficiency.enabled=false", "compare_dense=false")
    result = json.loads(run(small(tmp_path / "a", *extra)).read_text())
    lazy = result["method"]["lazy_layers"]
    assert len(lazy) == 6 and 0 not in lazy
    record = result["method"]["calibration"]
    assert record["lazy_layers"] == lazy and len(record["adjacent_js"]) == 11
    assert all(x >= 0 for x in record["adjacent_js"])
    assert (tmp_path / "calib" / f"{record['key']}.json").exists()
    png = tmp_path / "a" / "layer_divergence.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000

    def must_not_run(*args, **kwargs):
        raise AssertionError("calibration should come from the cache file")

    monkeypatch.setattr(calib, "calibrate", must_not_run)
    again = json.loads(run(small(tmp_path / "b", *extra)).read_text())
    assert again["method"]["lazy_layers"] == lazy


def test_ctrl_c_keeps_finished_samples_and_says_how_to_resume(tmp_path, monkeypatch, capfd):
    """Ctrl-C (KeyboardInterrupt, what SIGINT raises) after two answered samples: exit 130, one line
    saying how many finished samples are kept and how to resume, and those samples on disk."""
    import harness.tasks as tasks_mod

    real = tasks_mod.answer

    def interrupted(*args, **kwargs):
        for i, ans in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield ans

    monkeypatch.setattr(tasks_mod, "answer", interrupted)
    status, _, err = harness_cli(["model=llava_tiny_random", "limit=8", "batch_size=1", "efficiency.enabled=false",
                                  "compare_dense=false", f"out_dir={tmp_path}/r"], monkeypatch, capfd, cwd=tmp_path)
    assert status == 130, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted: ") and "re-run the same command" in line and str(tmp_path / "r") in line
    partial = tmp_path / "r" / "samples.partial.jsonl"
    kept = int(line.split()[1])
    assert kept == 2 == len(partial.read_text().splitlines())


def test_calibration_cache_knows_retrained_weights(tmp_path, tiny):
    from harness.calibration import weights_fingerprint

    before = weights_fingerprint(tiny.model)
    with torch.no_grad():
        param = next(tiny.model.parameters())
        saved = param.clone()
        param.add_(1.0)
        try:
            assert weights_fingerprint(tiny.model) != before
        finally:
            param.copy_(saved)
    assert weights_fingerprint(tiny.model) == before


def test_results_record_no_path_of_this_machine():
    from harness.folders import relative_to_repo
    from harness.results import REPO_ROOT

    home = Path.home()
    data = {"a": str(REPO_ROOT / "harness/assets/llava_tiny"), "b": [str(home / "lazyattn-runs/x")], "c": "/data/llava"}
    assert relative_to_repo(data) == {"a": "harness/assets/llava_tiny", "b": ["~/lazyattn-runs/x"], "c": "/data/llava"}


RANDOM_PRESETS = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if "kind: random_shape" in p.read_text())


def test_the_default_model_is_the_trained_tiny_model(capsys):
    from harness.models import load_model

    cfg = cfg_for()
    assert cfg.model.name == "llava_tiny" and cfg.model.kind == "hf"
    loaded = load_model(cfg.model, "cpu")
    assert not loaded.random_weights and "random" not in capsys.readouterr().err.lower()


@pytest.mark.parametrize("preset", RANDOM_PRESETS)
def test_random_weights_are_announced_for_every_random_preset(preset, capsys):
    """Each random_shape preset, scaled down to the tiny sizes of its family, says on stderr that it is noise."""
    from omegaconf import OmegaConf

    from harness.models import families, load_model

    cfg = cfg_for(f"model={preset}", "model.dtype=float32").model
    same_family = [v for v in families.TINY_SHAPES.values() if v[0] == cfg.family]
    _, text, vision = next((v for v in same_family if v[1].get("backbone", "llama") == cfg.text.get("backbone", "llama")),
                           same_family[0])  # e.g. LLaVA-NeXT with a Llama (Vicuna) backbone: the family's shapes
    if "backbone" in cfg.text:
        text = {**text, "backbone": cfg.text.backbone}
    cfg.text = OmegaConf.create({**text, "vocab": None})
    cfg.vision = OmegaConf.create(vision)
    loaded = load_model(cfg, "cpu")
    assert loaded.random_weights
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {preset} has RANDOM weights (model.kind=random_shape): its answers are noise and its "
                   "accuracy means nothing; for accuracy use model=llava_tiny (trained, shipped) or a real checkpoint."]


def documented_command_lines():
    """Every ``python -m harness`` / ``python -m harness.bench`` line of the README and docs (continuations
    joined; lines with placeholders such as ``$M`` or ``...`` left out): (config name, overrides)."""
    import re
    import shlex

    out = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"\\\n\s*", " ", doc.read_text())
        for match in re.finditer(r"^python -m (harness|harness\.bench) (.*)$", text, flags=re.M):
            line = match.group(2).split(" #")[0]
            if "$" not in line and "..." not in line:
                out.append(("config" if match.group(1) == "harness" else "bench",
                            [a for a in shlex.split(line) if a not in ("-m", "--multirun")]))
    makefile = (ROOT / "Makefile").read_text()  # the sweeps: $(SWEEP) +exp=... with make's variables left out
    for match in re.finditer(r"^\t\$\(SWEEP\) (.*)$", makefile, flags=re.M):
        out.append(("config", [a for a in shlex.split(match.group(1)) if "$(" not in a]))
    return out


def test_documented_command_lines_pass_the_key_check():
    from harness.command_line import check_overrides

    lines = documented_command_lines()
    assert len(lines) >= 25
    for config_name, overrides in lines:
        check_overrides(overrides, config_name)  # raises RunError on an unknown key or preset


def test_wandb_group_is_per_model_in_sweeps_and_the_users_choice():
    assert cfg_for("+exp=sweep_lazy").wandb.group == "llava_tiny-sweeps"
    assert cfg_for("+exp=sweep_pruning").wandb.group == cfg_for("+exp=sweep_dense").wandb.group  # one comparison
    assert cfg_for("+exp=sweep_lazy", "wandb.group=mine").wandb.group == "mine"
    assert cfg_for("wandb.group=mine").wandb.group == "mine"


def test_documented_wandb_commands_exist_in_the_installed_wandb():
    """docs/results.md says how to read offline runs; each command it names is accepted by this wandb,
    and every ``wandb ...`` command line of its code blocks parses (its options are known)."""
    import re
    import shlex

    text = (ROOT / "docs" / "results.md").read_text()
    commands = sorted(set(re.findall(r"`(wandb (?:beta )?(?:leet inspect|leet|sync))\b", text)))
    assert {"wandb leet inspect", "wandb sync"} <= set(commands)
    wandb_cli = Path(sys.executable).with_name("wandb")
    for command in commands:
        proc = subprocess.run([str(wandb_cli), *command.split()[1:], "--help"], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, (command, proc.stderr[-1000:])
    lines = re.findall(r"^(wandb (?:leet|sync) .*?)\s+#", text, flags=re.M)
    assert any(line.startswith("wandb leet inspect --summary --json") for line in lines)
    for line in lines:  # options known to the installed wandb (--help with them parses them first)
        args = shlex.split(line)[1:]
        options = [a for a in args if a.startswith("-")]
        words = [a for a in args if not a.startswith("-") and not a.startswith("runs/")]
        help_text = subprocess.run([str(wandb_cli), *words, "--help"], capture_output=True, text=True,
                                   timeout=120).stdout
        assert all(o in help_text for o in options), (line, options)


def test_the_readme_table_is_the_rendered_main_table():
    """README's results table is results/tables/main.md byte for byte (make tables renders it), footnote included."""
    rendered = (ROOT / "results" / "tables" / "main.md").read_text().split("\n", 1)[1]
    readme = (ROOT / "README.md").read_text()
    assert rendered in readme
    # a type dense cannot do is flagged in the table and said in the caption; the retrained model has none
    flagged = "Avg w/o †" in rendered
    assert flagged == ("is marked `†`" in readme) and ("would be marked `†`" in readme) == (not flagged)


def test_documented_report_and_sweep_lines_parse():
    """``python -m harness.report`` / ``harness.sweep`` lines of the docs and the Makefile's report targets parse
    with those modules' own argument parsers (the harness and bench lines pass the key check above)."""
    import re
    import shlex

    from harness import report, sweep

    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"\\\n\s*", " ", doc.read_text())
        for match in re.finditer(r"python -m harness\.(report|sweep) ([^`#\n]*)", text):
            found.append((match.group(1), shlex.split(match.group(2).strip())))
    assert len(found) >= 3
    for module, args in found:
        if "..." in args or any("LABEL" in a for a in args):
            continue
        parse = {"report": report.parser, "sweep": sweep.parser}[module]()
        parse.parse_intermixed_args(args)  # SystemExit on a bad line


@pytest.mark.parametrize(
    "args, message",
    [
        (["out_dir=/proc/lazyattn-no/r"], "error: out_dir /proc/lazyattn-no/r cannot be written"),
        (["out_dir={tmp}/a_file/r"], "error: out_dir {tmp}/a_file/r cannot be made: {tmp}/a_file is a file"),
        (["-m", "method=lazy", "method.ratio=0.25,0.5", "sweep_root=/proc/lazyattn-no"],
         "error: sweep_root /proc/lazyattn-no cannot be written"),
        (["model=hf", "model.path={tmp}/ckpt", "out_dir={tmp}/r"],
         "error: {tmp}/ckpt has no processor files (one of preprocessor_config.json, processor_config.json) and no "
         "tokenizer files"),
        (["method=lazy", "method.ratio=1.5", "out_dir={tmp}/r"], "error: ratio must be a number in [0, 1)"),
        (["task.qtypes=[colour,smell]", "out_dir={tmp}/r"], "error: task.qtypes ['smell'] unknown"),
    ],
    ids=["proc", "file", "sweep_root", "no-processor", "method", "task"],
)
def test_refused_runs_are_one_line_and_leave_nothing_behind(tmp_path, args, message, monkeypatch, capfd):
    """A folder that cannot be written, a checkpoint without processor or tokenizer files (refused from
    its files, before any weights load) and bad settings: exit 2, one line, no traceback, and no
    out_dir/.hydra or empty log left behind (refused before Hydra writes, or cleaned after)."""
    (tmp_path / "a_file").write_text("x")
    ckpt = tmp_path / "ckpt"  # a model saved without its processor: config.json and weights only
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors"):
        (ckpt / name).write_bytes((ROOT / "harness/assets/llava_tiny" / name).read_bytes())
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.chdir(tmp_path)
    line = [*[a.format(tmp=tmp_path) for a in args], "model=llava_tiny_random" if "model=hf" not in args
            else "model.dtype=float32"]
    if args[0].startswith("task."):  # refused inside the run, after Hydra made the folder: Hydra's main
        status, _, err = harness_cli(line, monkeypatch, capfd)
    else:  # refused before Hydra: its checks, in this process
        status, err = harness_precheck(line, monkeypatch, capfd)
    assert status == 2, err[-2000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(message.format(tmp=tmp_path)), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out_dir, .hydra or __main__.log


def test_a_refused_run_keeps_an_earlier_runs_folder(tmp_path, monkeypatch, capfd):
    out = tmp_path / "r"
    out.mkdir()
    (out / "samples.partial.jsonl").write_text("")
    status, _, err = harness_cli(["model=llava_tiny_random", "task.qtypes=[colour,smell]", f"out_dir={out}"],
                                 monkeypatch, capfd, cwd=tmp_path)
    assert status == 2 and (out / "samples.partial.jsonl").exists(), err


def test_the_console_first_lines_say_what_ran(tmp_path, monkeypatch, capfd):
    # long answers cut at 2 tokens ("there are"): F1 0, a type dense cannot do, flagged on the console
    status, out, err = harness_cli(["+exp=llava_lazy", "method.layers=[2,3,5]", "limit=8", "batch_size=8",
                                    "task.max_new_tokens.long=2", "efficiency.new_tokens=2", "efficiency.repeats=1",
                                    "efficiency.warmup=0", f"out_dir={tmp_path}/r"], monkeypatch, capfd, cwd=tmp_path)
    assert status == 0, err[-2000:]
    lines = out.splitlines()
    assert lines[0].startswith("model: llava_tiny (12 layers, ") and "trained weights" in lines[0]
    assert lines[1] == ("method: Lazy r=0.25 (explicit) [lazy]: lazy layers 2 3 5 (anchors 2<-1 3<-1 5<-4; share=qk "
                        "scope=all)")
    assert lines[2].startswith("task: shapes, n=8 (limit); split=test; 8 question types (colour,")
    assert "multiturn=carry; seed=0; dense scored beside it" in lines[2]
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    kv_lines = [line for line in lines if "kv_cut" in line or "KV" in line]
    assert any(f"kv_cut_workload={result['headline']['kv_cut_workload']:.4f}" in line for line in kv_lines)
    assert any(f"kv_cut_timing_batch={result['headline']['kv_cut_timing_batch']:.4f}" in line for line in kv_lines)
    assert not any("reduction" in line and "kv_cut" not in line for line in lines)  # no unnamed KV figure
    long = next(line for line in lines if line.strip().startswith("long "))
    assert "† dense below 10%" in long and result["headline"]["dense_below_floor"] == ["long"]
