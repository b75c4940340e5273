"""``python -m harness.reproduce``: committed points re-run from their own saved config, every
prediction compared with the committed samples.jsonl."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from harness import reproduce

ROOT = Path(__file__).resolve().parent.parent
POINTS = [  # one point of each results folder that holds runs
    ROOT / "results/tiny/lazy/method.layers=null,method.ratio=0.5",
    ROOT / "results/tiny_deep/fastv/method=fastv,model=llava_tiny_deep",
]


@pytest.mark.parametrize("point", POINTS, ids=lambda p: p.parent.parent.name)
def test_committed_points_reproduce(point, tmp_path, capsys):
    assert reproduce.main([str(point), "limit=8", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert ": 8 predictions compared, 0 differ" in out


def _reproduce_command(tmp):
    return {"args": [sys.executable, "-m", "harness.reproduce", str(POINTS[0]), "limit=1", "--out", str(tmp / "out")],
            "cwd": ROOT, "timeout": 300, "env": {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}}, None


@pytest.mark.real_process(prepare=_reproduce_command)
def test_the_command_in_a_real_process(real_process):
    """``python -m harness.reproduce`` itself (its one real-process test; the cases above call ``main``):
    a committed point re-run on its first sample, exit status 0, the comparison line on stdout. The
    command runs beside the in-process tests (tests/conftest.py)."""
    proc, _, tmp = real_process
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith(f"{POINTS[0]}: 1 predictions compared, 0 differ")
    assert (tmp / "out" / "result.json").is_file()


def test_a_key_added_since_is_filled_from_todays_defaults_and_said(tmp_path, capsys):
    point = tmp_path / "point"
    shutil.copytree(POINTS[0], point)
    result = json.loads((point / "result.json").read_text())
    del result["config"]["cache"]  # as in a point saved before the setting existed
    (point / "result.json").write_text(json.dumps(result))
    assert reproduce.main([str(point), "limit=2", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "filled from today's defaults" in out and "cache" in out and "2 predictions compared, 0 differ" in out


def test_a_changed_prediction_is_reported(tmp_path, capsys):
    point = tmp_path / "point"
    shutil.copytree(POINTS[0], point)
    rows = [json.loads(line) for line in (point / "samples.jsonl").read_text().splitlines()]
    rows[0]["prediction"] = rows[0]["turns"][-1] = "something else"
    (point / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert reproduce.main([str(point), "limit=2", "--out", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert f"differs: method {rows[0]['id']}: committed" in out and "2 predictions compared, 1 differ" in out


def test_unreadable_points_fail_in_one_line(tmp_path, capsys):
    assert reproduce.main([str(tmp_path)]) == 2
    assert "has no result.json" in capsys.readouterr().err
    assert reproduce.main([str(POINTS[0]), "limt=3"]) == 2
    assert "unknown setting 'limt'" in capsys.readouterr().err
    # the walking skeleton ran a model kind that no longer exists: refused, not guessed
    assert reproduce.main([str(ROOT / "results/skeleton_tiny_random/lazy_r0.5"), "limit=2"]) == 2
    assert "unknown model.kind 'tiny_random'" in capsys.readouterr().err
