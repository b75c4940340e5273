"""Sweeps end to end: a multirun interrupted after its first point resumes without redoing it,
the local parallel launcher runs points side by side, and the tables render from the results."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def test_interrupted_sweep_resumes_without_redoing_finished_points(tmp_path):
    root = tmp_path / "sweep"
    cmd = harness_cmd("method.ratio=0.25,0.5", "method.layers=null", f"sweep_root={root}")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 240
    while not points(root) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # interrupted as hard as it gets, right after point one
    proc.wait()
    finished = points(root)
    assert len(finished) == 1, f"expected exactly the first point finished, got {sorted(finished)}"
    (first_name, first_path), = finished.items()
    assert "method.ratio=0.25" in first_name
    before = first_path.stat().st_mtime_ns

    out = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"skipping finished point {first_path.parent}" in out.stdout
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


def test_local_launcher_runs_points_in_parallel(tmp_path):
    root = tmp_path / "sweep"
    cmd = harness_cmd(
        "method.ratio=0.25,0.5", "method.layers=auto", f"sweep_root={root}",
        "hydra/launcher=local", "hydra.launcher.n_jobs=2", "threads=1",
    )
    out = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Joblib" in out.stdout + out.stderr  # hydra's joblib launcher ran the points
    found = points(root)
    assert len(found) == 2
    results = report.collect(root)
    assert all(r["method"]["calibration"] for r in results)
    figure = report.layers_figure(results, tmp_path / "rendered")
    assert figure.stat().st_size > 0


def test_report_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the sweeps first"):
        report.collect(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no result.json"):
        report.collect(tmp_path / "empty")


def test_multirun_without_a_sweep_experiment_keeps_every_point_under_sweep_root(tmp_path):
    """Each point's result.json lands in sweep_root/<its overrides>, none in the working directory,
    and a default single run goes under runs_root, outside the working directory."""
    work = tmp_path / "work"
    work.mkdir()
    run_env = {**env(), "LAZYATTN_RUNS": str(tmp_path / "runs")}
    common = ("model=llava_tiny_random", "method=lazy", "limit=2", "efficiency.enabled=false", "compare_dense=false",
              f"calibration.dir={tmp_path / 'calib'}")
    proc = subprocess.run([sys.executable, "-m", "harness", "-m", *common, "method.ratio=0.25,0.5",
                           f"sweep_root={tmp_path / 'sweep'}"], cwd=work, env=run_env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = sorted(p.parent.name for p in (tmp_path / "sweep").rglob("result.json"))
    assert len(found) == 2 and all("method.ratio=" in name for name in found)
    proc = subprocess.run([sys.executable, "-m", "harness", *common], cwd=work, env=run_env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "runs").rglob("result.json"))) == 1
    assert not list(work.iterdir())  # nothing written into the working directory
