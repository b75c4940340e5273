"""Issue 34: a workflow that cannot mislead. One writer per out_dir (a lock naming its holder, a
stale one taken over), degenerate settings refused before the model loads, noisy timings flagged,
one-line errors that leave nothing behind. Everything in this process (``harness_cli``)."""

import json
import platform
import subprocess
from pathlib import Path

import pytest
from helpers import harness_cli

from harness.results import LOCK_NAME, RunLock, RunLocked

QUICK = ["model=llava_tiny_random", "limit=2", "batch_size=2", "efficiency.enabled=false", "compare_dense=false"]


def write_lock(out_dir, **holder):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / LOCK_NAME).write_text(json.dumps({"since": "2026-01-01T00:00:00+00:00", **holder}))


def test_a_second_writer_is_refused_in_one_line_and_leaves_nothing(tmp_path, monkeypatch, capfd):
    out = tmp_path / "r"
    holder = subprocess.Popen(["sleep", "60"])  # a live process on this host holds the lock
    try:
        write_lock(out, host=platform.node(), pid=holder.pid)
        status, stdout, err = harness_cli([*QUICK, f"out_dir={out}"], monkeypatch, capfd, cwd=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert status == 2, err
    assert err.strip().count("\n") == 0 and err.startswith("error: ")
    assert f"pid {holder.pid}" in err and platform.node() in err and "one writer per out_dir" in err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # no .hydra/, no log, the lock untouched

    write_lock(out, host="some-other-node", pid=1)  # another host: liveness unknown, so live
    status, _, err = harness_cli([*QUICK, f"out_dir={out}"], monkeypatch, capfd, cwd=tmp_path)
    assert status == 2 and "host some-other-node" in err


def test_a_stale_lock_is_taken_over_and_said(tmp_path, monkeypatch, capfd):
    out = tmp_path / "r"
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid now names no process: a killed run's lock
    write_lock(out, host=platform.node(), pid=gone.pid)
    status, _, err = harness_cli([*QUICK, f"out_dir={out}"], monkeypatch, capfd, cwd=tmp_path)
    assert status == 0, err[-2000:]
    assert f"took over a stale lock in {out} (host {platform.node()}, pid {gone.pid}" in err
    assert (out / "result.json").exists() and not (out / LOCK_NAME).exists()  # released at the end


def test_lock_is_exclusive_and_released(tmp_path):
    with RunLock(tmp_path) as first:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] > 0
        with pytest.raises(RunLocked, match="in use by another run"):
            RunLock(tmp_path).acquire()
        assert first.held
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path):  # free again
        pass


# --- item 2: degenerate settings refused before the model loads; limit above the data said;
# a task dense cannot do flagged wherever the numbers go

@pytest.mark.parametrize("setting, said", [
    ("calibration.threshold=-1", "calibration.threshold must be a JS divergence >= 0"),
    ("calibration.samples=0", "calibration.samples must be an integer >= 1"),
    ("task.n=0", "task.n must be an integer >= 1"),
])
def test_meaningless_settings_are_refused_in_one_line(setting, said, tmp_path, monkeypatch, capfd):
    out = tmp_path / "r"
    status, stdout, err = harness_cli(["+exp=llava_lazy", "model=llava_tiny_random", setting, f"out_dir={out}"],
                                      monkeypatch, capfd, cwd=tmp_path)
    assert status == 2, stdout[-1000:] + err[-1000:]
    assert err.strip().startswith("error: ") and said in err and err.strip().count("\n") == 0
    assert "model:" not in stdout  # refused before the model loaded
    assert not out.exists()  # nothing left behind


def test_an_empty_vlmevalkit_tsv_is_refused(tmp_path):
    from harness.vlmeval import data as vdata

    (tmp_path / "Empty.tsv").write_text("index\tquestion\tanswer\timage\n")
    with pytest.raises(ValueError, match="holds a header and no rows; nothing to score"):
        vdata.locate_all(["Empty"], str(tmp_path))


def test_a_limit_above_the_data_is_said():
    from harness.console import limit_notes, samples_scored

    class EightRows:  # a task whose one set holds 8 rows (as VlmevalDatasets.sizes says)
        def sizes(self):
            return {"POPE": 8}

    assert limit_notes(50, EightRows()) == ["note: limit=50 exceeds the 8 row(s) of POPE: 8 will be scored"]
    assert limit_notes(4, EightRows()) == [] and limit_notes(None, EightRows()) == []
    assert samples_scored(50, EightRows()) == "n=8 (limit=50 or fewer rows)"
    assert samples_scored(None, EightRows()) == "n=8 (every row)"

    class Generated:  # the shapes sets: any limit is there
        n = 400

        def sizes(self):
            return None

    assert samples_scored(None, Generated()) == "n=400 (task.n, the task's default)"
    assert samples_scored(16, Generated()) == "n=16 (limit)"


def test_a_task_dense_cannot_do_is_flagged_everywhere(tmp_path, monkeypatch, capfd):
    """The random model cannot name a colour: dense scores 0 on the whole task. The console, result.json
    (top level and headline), W&B's score rows and the main table all say so."""
    from harness import report, tracking

    out = tmp_path / "r"
    status, stdout, err = harness_cli(
        ["model=llava_tiny_random", "method=lazy", "method.layers=null", "limit=2", "batch_size=2",
         "task.qtypes=[colour]", "efficiency.repeats=1", "efficiency.warmup=0", "efficiency.new_tokens=2",
         f"out_dir={out}"], monkeypatch, capfd, cwd=tmp_path)
    assert status == 0, err[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert result["tasks_dense"]["shapes"]["acc"] == 0.0
    assert result["dense_below_floor_tasks"] == ["shapes"] and result["headline"]["dense_task_below_floor"] is True
    assert "on the whole task: one dense cannot do" in stdout
    assert "one timed repeat" in stdout  # efficiency.repeats=1: no spread to judge
    assert [row for row in tracking.score_rows(result) if row[1] == "all"][0][-1] is True
    header, rows = report.main_table(report.collect(out))
    delta = header.index("Δ Avg")
    lazy = [row for row in rows if row[0].startswith("Lazy")][0]
    assert lazy[delta].endswith(" §")
    assert report.table_notes(header, rows)[-1].startswith("§ dense scores below 10% on the whole task")

    # item 3 in the tables: the same point with an implausible achieved share is marked ‡
    assert result["efficiency"]["noisy"] is False and result["headline"]["timing_noisy"] is False
    result["efficiency"]["decode_speedup_of_predicted"] = 3.05
    del result["efficiency"]["noisy"], result["efficiency"]["noise"]  # as timed before the verdict: results.load's
    (out / "result.json").write_text(json.dumps(result))
    header, rows = report.efficiency_table(report.collect(out))
    assert rows[0][header.index("Decode ×")].endswith(" ‡")
    assert report.table_notes(header, rows)[0].startswith("‡ timing is noise")


# --- item 3: timing carries its own noise verdict

def timing(decode=(100.0, 5.0), method=(300.0, 6.0), achieved=1.0):
    return {"device": "cpu", "batch_size": 1, "prompt_tokens": 10, "new_tokens": 4, "kv_reduction": 0.5,
            "decode_speedup": method[0] / decode[0], "prefill_speedup": 1.0, "e2e_speedup": 1.0,
            "decode_speedup_of_predicted": achieved, "predicted_decode_speedup": 1.0,
            "dense": {"kv_cache_bytes": 2, "prefill_ms": 50.0, "prefill_ms_iqr": 1.0, "decode_tokens_per_s": decode[0],
                      "decode_tokens_per_s_iqr": decode[1], "e2e_tokens_per_s": 1.0, "e2e_tokens_per_s_iqr": 0.0,
                      "repeats": 3},
            "method": {"kv_cache_bytes": 1, "prefill_ms": 50.0, "prefill_ms_iqr": 1.0, "decode_tokens_per_s": method[0],
                       "decode_tokens_per_s_iqr": method[1], "e2e_tokens_per_s": 1.0, "e2e_tokens_per_s_iqr": 0.0,
                       "repeats": 3}}


def test_timing_noise_verdict():
    from harness.measure import timing_verdict

    assert timing_verdict(timing()) == (False, None)
    noisy, why = timing_verdict(timing(decode=(100.0, 90.0)))  # dense's IQR 90 % of its median
    assert noisy and why.startswith("decode_speedup 3.00 ± ")
    noisy, why = timing_verdict(timing(achieved=3.05))  # the "achieved 305 % of it"
    assert noisy and "achieved 305% of what its bytes predict" in why
    assert timing_verdict(None) == (None, None)


def test_noisy_timing_is_said_and_marked(capsys):
    from harness import report
    from harness.headline import compute
    from harness.measure import timing_verdict
    from harness.console import print_summary

    eff = timing(achieved=3.05)
    eff["noisy"], eff["noise"] = timing_verdict(eff)
    result = {"method": {"name": "lazy", "label": "Lazy r=0.5"}, "tasks": {}, "efficiency": eff,
              "model": {"name": "m"}, "_path": "x/result.json"}
    result["headline"] = compute(result)
    assert result["headline"]["timing_noisy"] is True and "305%" in result["headline"]["timing_noise"]
    print_summary(result)
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if "warning: timing is noise" in line]
    assert len(warning) == 1 and "305%" in warning[0]
    assert "timing_noisy=True" in out and "timing_noise=" not in out  # the headline block: the flag, once


# --- item 5: one-line errors that leave nothing behind

def checkpoint_copy(tmp_path, name="ckpt"):
    import shutil

    from harness.results import REPO_ROOT

    dest = tmp_path / name
    shutil.copytree(REPO_ROOT / "harness" / "assets" / "llava_tiny", dest)
    return dest


@pytest.mark.parametrize("damage", ["cut", "header"])
def test_a_corrupted_safetensors_is_one_line_and_leaves_nothing(damage, tmp_path, monkeypatch, capfd):
    ckpt = checkpoint_copy(tmp_path)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "cut" else b"\xff" * 64 + data[64:])
    out = tmp_path / "r"
    status, stdout, err = harness_cli(["model=hf", f"model.path={ckpt}", "limit=2", f"out_dir={out}"],
                                      monkeypatch, capfd, cwd=tmp_path)
    assert status == 2 and err.strip().count("\n") == 0 and "Traceback" not in err, err[-3000:]
    assert f"error: {weights}" in err and "download or save the weights again" in err
    assert not out.exists()  # refused before Hydra: no .hydra/, no empty log


def test_a_text_only_checkpoint_is_told_so_first(tmp_path, monkeypatch, capfd):
    ckpt = checkpoint_copy(tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config["text_config"], "model_type": "llama"}))
    (ckpt / "processor_config.json").unlink()  # the processor files missing too: the model type is said first
    status, _, err = harness_cli(["model=hf", f"model.path={ckpt}", f"out_dir={tmp_path / 'r'}"],
                                 monkeypatch, capfd, cwd=tmp_path)
    assert status == 2 and "holds a 'llama' model, which is not an image-text-to-text model" in err, err


def test_float16_on_a_cpu_is_refused_and_the_dtype_shown(tmp_path, monkeypatch, capfd):
    status, _, err = harness_cli([*QUICK, "model.dtype=float16", "device=cpu", f"out_dir={tmp_path / 'r'}"],
                                 monkeypatch, capfd, cwd=tmp_path)
    assert status == 2 and err.startswith("error: model.dtype=float16 on a CPU") and err.strip().count("\n") == 0
    ckpt = checkpoint_copy(tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "torch_dtype": "float16"}))
    status, _, err = harness_cli(["model=hf", f"model.path={ckpt}", "device=cpu", f"out_dir={tmp_path / 'r'}"],
                                 monkeypatch, capfd, cwd=tmp_path)
    assert status == 2 and "model.dtype=float16 (model.dtype=auto: config.json) on a CPU" in err
    status, out, err = harness_cli([*QUICK, f"out_dir={tmp_path / 'ok'}"], monkeypatch, capfd, cwd=tmp_path)
    assert status == 0 and " float32, RANDOM weights)" in out.splitlines()[0], out[:500] + err[-1000:]


def test_slurm_without_slurm_names_the_rehearsal(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    status, _, err = harness_cli(["-m", *QUICK, "hydra/launcher=slurm", f"sweep_root={tmp_path / 's'}"],
                                 monkeypatch, capfd, cwd=tmp_path)
    assert status == 2 and err.strip().count("\n") == 0, err[-2000:]
    assert "needs SLURM" in err and "hydra/launcher=submitit_local" in err
    assert not (tmp_path / "s").exists()
    status, _, err = harness_cli([*QUICK, "hydra/launcher=local", f"out_dir={tmp_path / 'r'}"],
                                 monkeypatch, capfd, cwd=tmp_path)
    assert status == 2 and "add -m" in err


# --- item 6: the README tour as written: limits, nothing inside the repository; CLI names

def tour_lines():
    import shlex

    from harness.results import REPO_ROOT

    text = (REPO_ROOT / "README.md").read_text()
    block = text.split("## A 5-minute tour", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line.split("  #")[0]) for line in block.splitlines() if line.startswith("python -m ")]


def test_the_readme_tour_is_limited_and_writes_outside_the_repository(tmp_path, monkeypatch, capsys):
    from helpers import harness_precheck

    from harness.results import REPO_ROOT

    lines = tour_lines()
    runs = [argv[3:] for argv in lines if argv[2] == "harness"]
    assert len(runs) >= 10
    for args in runs:
        assert any(a.startswith("limit=") for a in args), args  # under a minute each (about 25 s on one core)
        for a in args:
            if a.startswith(("out_dir=", "runs_root=", "sweep_root=")):
                path = Path(a.split("=", 1)[1]).expanduser()
                assert path.is_absolute() and REPO_ROOT not in path.parents, a
        # checked into tmp_path: a finished run of the tour in /tmp must not fail this test
        local = [f"out_dir={tmp_path / 'r'}" if a.startswith("out_dir=") else a for a in args]
        status, err = harness_precheck(local, monkeypatch, capsys)
        assert status is None, (args, err)  # every line composes and passes the checks
    for argv in lines:
        if argv[2] == "harness.report":
            out = Path(argv[argv.index("--out") + 1])
            assert out.is_absolute() and REPO_ROOT not in out.parents


def test_module_clis_name_themselves():
    from harness import sweep
    from harness.report import cli

    assert cli.parser().format_usage().startswith("usage: python -m harness.report ")
    assert sweep.parser().format_usage().startswith("usage: python -m harness.sweep ")


def test_a_result_timed_before_the_verdict_gets_it_when_loaded(tmp_path):
    """results.load gives a result whose efficiency lacks the noise verdict the one its numbers give
    (measure.timing_verdict), so the headline, W&B and the tables read it the same way."""
    import json

    from harness import results
    from harness.measure import timing_verdict

    eff = timing(achieved=3.05)
    (tmp_path / "result.json").write_text(json.dumps({"schema_version": 5, "method": {"name": "lazy"}, "tasks": {},
                                                      "efficiency": eff}))
    loaded = results.load(tmp_path / "result.json")["efficiency"]
    assert (loaded["noisy"], loaded["noise"]) == timing_verdict(eff) and loaded["noisy"] is True
    eff.update(noisy=False, noise=None)  # a verdict recorded is kept as it was
    (tmp_path / "result.json").write_text(json.dumps({"schema_version": 5, "method": {"name": "lazy"}, "tasks": {},
                                                      "efficiency": eff}))
    assert results.load(tmp_path / "result.json")["efficiency"]["noisy"] is False
