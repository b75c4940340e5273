"""Sweeps end to end: a multirun interrupted after its first point resumes without redoing it,
the local parallel launcher runs points side by side, and the tables render from the results."""

import json
import os
import sys
from pathlib import Path

import pytest
from helpers import harness_cli

from harness import report

ROOT = Path(__file__).resolve().parent.parent
FAST = [
    "model=llava_tiny_random",
    "limit=6",
    "batch_size=6",
    "efficiency.new_tokens=2",
    "efficiency.repeats=1",
    "efficiency.warmup=0",
    "calibration.samples=2",
    "task.qtypes=[colour,count,exist]",
]


def harness_cmd(*args):
    return [sys.executable, "-m", "harness", "-m", "+exp=sweep_lazy", *FAST, *args]


def env():
    return dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT))


def points(root: Path) -> dict[str, Path]:
    return {p.parent.name: p for p in root.rglob("result.json")}


def test_interrupted_sweep_resumes_without_redoing_finished_points(tmp_path, monkeypatch, capfd):
    """The multirun in this process (``python -m harness -m`` minus the start-up), interrupted as the
    second point starts; the same command then skips the finished point and runs the other."""
    import harness.__main__ as entry

    root = tmp_path / "sweep"
    args = ["-m", "+exp=sweep_lazy", *FAST, "method.ratio=0.25,0.5", "method.layers=null", f"sweep_root={root}"]
    real, calls = entry.run, []

    def interrupted(cfg):
        calls.append(cfg.method.ratio)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C right after point one
        return real(cfg)

    monkeypatch.setattr(entry, "run", interrupted)
    status, _, err = harness_cli(args, monkeypatch, capfd, cwd=tmp_path)
    assert status == 130, err[-2000:]
    finished = points(root)
    assert len(finished) == 1, f"expected exactly the first point finished, got {sorted(finished)}"
    (first_name, first_path), = finished.items()
    assert "method.ratio=0.25" in first_name
    before = first_path.stat().st_mtime_ns

    monkeypatch.setattr(entry, "run", real)
    status, out, err = harness_cli(args, monkeypatch, capfd, cwd=tmp_path)
    assert status == 0, out[-2000:] + err[-2000:]
    assert f"skipping finished point {first_path.parent}" in out
    assert first_path.stat().st_mtime_ns == before
    assert sorted(points(root)) == sorted([first_name, first_name.replace("ratio=0.25", "ratio=0.5")])
    for path in points(root).values():
        result = json.loads(path.read_text())
        # out_dir null: the point's folder is Hydra's job dir, sweep_root/<the point's overrides>
        assert result["config"]["out_dir"] is None and path.parent.parent == root
        assert f"method.ratio={result['method']['params']['ratio']:g}" in path.parent.name
        assert result["efficiency"]["kv_reduction"] == pytest.approx(len(result["method"]["lazy_layers"]) / 24)

    # tables and figures render from those files alone
    header, rows = report.main_table(report.collect(root))
    assert [r[0] for r in rows] == ["Lazy r=0.25 (uniform)", "Lazy r=0.5 (uniform)"]
    cut, delta = header.index("KV cut workload"), header.index("Δ Avg")
    assert rows[1][cut] == rows[1][delta] == "–"  # no dense point with the same settings: nothing is compared
    files = report.render("efficiency", root, tmp_path / "rendered") + report.render("pareto", root, tmp_path / "rendered")
    assert all(f.stat().st_size > 0 for f in files)
    assert "Lazy r=0.5 (uniform)" in (tmp_path / "rendered" / "tables" / "efficiency.md").read_text()


def _local_launcher_command(tmp):
    root = tmp / "sweep"
    cmd = harness_cmd(
        "method.ratio=0.25,0.5", "method.layers=auto", f"sweep_root={root}",
        "hydra/launcher=local", "hydra.launcher.n_jobs=2", "threads=1",
    )
    return {"args": cmd, "cwd": tmp, "env": env(), "timeout": 400}, root


@pytest.mark.real_process(prepare=_local_launcher_command)
def test_local_launcher_runs_points_in_parallel(real_process, tmp_path):
    """``python -m harness -m`` with a launcher, in a real process (its command runs beside the
    in-process tests, tests/conftest.py)."""
    out, root, _ = real_process
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Joblib" in out.stdout + out.stderr  # hydra's joblib launcher ran the points
    found = points(root)
    assert len(found) == 2
    results = report.collect(root)
    assert all(r["method"]["calibration"] for r in results)
    figure = report.layers_figure(results, tmp_path / "rendered")
    assert figure.stat().st_size > 0


def _report_command(tmp):
    out = tmp / "rendered"
    return {"args": [sys.executable, "-m", "harness.report", "main", "--results", "results/tiny", "--out", str(out)],
            "cwd": ROOT, "env": env(), "timeout": 300}, out


@pytest.mark.real_process(prepare=_report_command)
def test_the_report_command_in_a_real_process(real_process):
    """``python -m harness.report`` itself (its one real-process test; the rest call its code): the main
    table of the committed results, its two files printed, the same rows in both. The command runs
    beside the in-process tests (tests/conftest.py)."""
    proc, out, _ = real_process
    assert proc.returncode == 0, proc.stderr[-2000:]
    md, tex = out / "tables" / "main.md", out / "tables" / "main.tex"
    assert proc.stdout.split() == [str(md), str(tex)]
    assert md.read_text().startswith("<!-- rendered by `python -m harness.report` from results/tiny;")
    rows = [line for line in md.read_text().splitlines() if line.startswith("| ")][1:]  # the header aside
    tex_rows = [line for line in tex.read_text().splitlines() if line.endswith("\\\\")]
    assert len(rows) > 10 and len(tex_rows) == len(rows) + 1  # the LaTeX header row ends the same way


def test_report_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the sweeps first"):
        report.collect(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no result.json"):
        report.collect(tmp_path / "empty")


def test_multirun_without_a_sweep_experiment_keeps_every_point_under_sweep_root(tmp_path, monkeypatch, capfd):
    """Each point's result.json lands in sweep_root/<its overrides>, none in the working directory,
    and a default single run goes under runs_root, outside the working directory."""
    work = tmp_path / "work"
    work.mkdir()
    run_env = {"LAZYATTN_RUNS": str(tmp_path / "runs")}
    common = ("model=llava_tiny_random", "method=lazy", "limit=2", "efficiency.enabled=false", "compare_dense=false",
              f"calibration.dir={tmp_path / 'calib'}")
    status, _, err = harness_cli(["-m", *common, "method.ratio=0.25,0.5", f"sweep_root={tmp_path / 'sweep'}"],
                                 monkeypatch, capfd, cwd=work, env=run_env)
    assert status == 0, err[-2000:]
    found = sorted(p.parent.name for p in (tmp_path / "sweep").rglob("result.json"))
    assert len(found) == 2 and all("method.ratio=" in name for name in found)
    status, _, err = harness_cli(list(common), monkeypatch, capfd, cwd=work, env=run_env)
    assert status == 0, err[-2000:]
    assert len(list((tmp_path / "runs").rglob("result.json"))) == 1
    assert not list(work.iterdir())  # nothing written into the working directory


def test_plain_multirun_resumes_by_its_own_command(tmp_path, monkeypatch, capfd):
    """Issue 34, item 1: a multirun that no sweep_* experiment marks (skip_finished=false), Ctrl-C
    half-way through its second point. The same command again skips the finished point, resumes the
    partial one from its kept samples, and says which; a single run into a finished out_dir still
    refuses without overwrite=true."""
    import harness.tasks as tasks_mod

    root = tmp_path / "sweep"
    args = ["-m", "model=llava_tiny_random", "method=lazy", "method.layers=null", "method.ratio=0.25,0.5", "limit=4",
            "batch_size=1", "efficiency.enabled=false", "compare_dense=false", f"sweep_root={root}"]
    real, asked = tasks_mod.answer, []

    def interrupted(model, processor, conversations, *a, **k):
        conversations = list(conversations)
        asked.append(len(conversations))
        for i, ans in enumerate(real(model, processor, conversations, *a, **k)):
            if sum(asked) > 4 and i == 2:  # the second point, two samples answered
                raise KeyboardInterrupt
            yield ans

    monkeypatch.setattr(tasks_mod, "answer", interrupted)
    status, _, err = harness_cli(args, monkeypatch, capfd, cwd=tmp_path)
    assert status == 130, err[-2000:]
    assert "re-run the same command to resume the sweep" in err.strip().splitlines()[-1]
    (first,) = points(root).values()
    before = first.stat().st_mtime_ns
    asked.clear()
    monkeypatch.setattr(tasks_mod, "answer", _counting(real, asked))
    status, out, err = harness_cli(args, monkeypatch, capfd, cwd=tmp_path)
    assert status == 0, out[-2000:] + err[-2000:]
    assert f"skipping finished point {first.parent} (a sweep skips its finished points" in out
    assert "resuming " in out and "2 finished sample(s)" in out
    assert first.stat().st_mtime_ns == before and len(points(root)) == 2
    assert sum(asked) == 2  # only the partial point's two unanswered samples were generated

    single = ["model=llava_tiny_random", "limit=2", "efficiency.enabled=false", "compare_dense=false",
              f"out_dir='{first.parent}'"]  # quoted: the point's folder name holds '='
    status, _, err = harness_cli(single, monkeypatch, capfd, cwd=tmp_path)
    assert status == 2 and "already holds a finished run; pass overwrite=true" in err, err[-3000:]


def _counting(real, asked):
    def answer(model, processor, conversations, *a, **k):
        conversations = list(conversations)
        asked.append(len(conversations))
        yield from real(model, processor, conversations, *a, **k)
    return answer


def test_submitit_local_rehearses_a_slurm_sweep(tmp_path, monkeypatch, capfd):
    """hydra/launcher=submitit_local: the SLURM launcher's machinery (submitit, a job folder per
    point, pickled jobs) with the jobs as local processes; a 2-point sweep finishes, each point in
    sweep_root/<its overrides>, and the literal .submitit/%j folder submitit makes is gone."""
    root = tmp_path / "sweep"
    args = ["-m", "model=llava_tiny_random", "method=lazy", "method.layers=null", "method.ratio=0.25,0.5", "limit=1",
            "batch_size=1", "efficiency.enabled=false", "compare_dense=false", "hydra/launcher=submitit_local",
            "threads=1", f"sweep_root={root}"]
    status, out, err = harness_cli(args, monkeypatch, capfd, cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert status == 0, out[-2000:] + err[-2000:]
    assert "Submitit 'local' sweep output dir" in out + err and "sweep summary: 2 point(s)" in out
    assert len(points(root)) == 2
    logs = [p for p in (root / ".submitit").iterdir()]
    assert logs and "%j" not in [p.name for p in logs]  # the jobs' own folders only
