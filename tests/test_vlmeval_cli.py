"""``python -m harness task=vlmeval ...`` from the project's own Python: it re-executes itself in
VLMEvalKit's environment (.venv-vlmeval, built by ``make test`` / ``make vlmeval-install``), writes
result.json and VLMEvalKit's files. The backend's own tests, its one-line refusals from the command
line's code included, are in tests/vlmevalkit (run in that environment)."""

import json
import os
import subprocess
import sys

import pytest

from harness.vlmeval import VENV, wants_vlmeval
from helpers import OFFLINE, ROOT

needs_env = pytest.mark.skipif(not (VENV / "bin" / "python").exists(),
                               reason="VLMEvalKit's environment is not built (make vlmeval-install)")


def harness(*args, tmp_path):
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False, env={**os.environ, **OFFLINE, "LMUData": str(tmp_path)})


def test_wants_vlmeval():
    assert wants_vlmeval(["model=llava_tiny", "task=vlmeval"]) and wants_vlmeval(["task.backend=vlmeval"])
    assert not wants_vlmeval(["task=shapes", "task.datasets=[vlmeval]"])


@needs_env
def test_the_documented_command_runs_in_vlmevalkits_environment(tmp_path):
    export = subprocess.run([str(VENV / "bin" / "python"), "-m", "harness.vlmeval.export_shapes", "--out",
                             str(tmp_path / "lmu"), "--n", "8"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "shapes_mcq" in export.stdout
    out = tmp_path / "run"
    proc = harness("model=llava_tiny", "method=lazy", "task=vlmeval", "task.datasets=[shapes_yorn,shapes_mcq]",
                   f"task.data_dir={tmp_path / 'lmu'}", "limit=4", f"out_dir={out}", "efficiency.repeats=1",
                   "efficiency.new_tokens=4", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "running in VLMEvalKit's environment" in proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["tasks"]["shapes_yorn"]["n"] == 4 and result["efficiency"]["kv_reduction"] > 0
    assert result["vlmeval"]["version"] == "0.0.20"
    assert (out / "vlmeval" / "method" / "lazyattn_shapes_yorn_auxmatch.xlsx").is_file()
    assert (out / "vlmeval" / "dense" / "lazyattn_shapes_mcq_exact_matching_result.xlsx").is_file()
