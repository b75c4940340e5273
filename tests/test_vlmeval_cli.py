"""``python -m harness task=vlmeval ...`` from the project's own Python: it re-executes itself in
VLMEvalKit's environment (.venv-vlmeval, built by ``make test`` / ``make vlmeval-install``), writes
result.json and VLMEvalKit's files. The backend's own tests, its one-line refusals from the command
line's code included, are in tests/vlmevalkit (run in that environment)."""

import json
import os
import sys

import pytest

from harness.vlmeval import VENV, wants_vlmeval
from helpers import OFFLINE, ROOT

needs_env = pytest.mark.skipif(not (VENV / "bin" / "python").exists(),
                               reason="VLMEvalKit's environment is not built (make vlmeval-install)")


def test_wants_vlmeval():
    assert wants_vlmeval(["model=llava_tiny", "task=vlmeval"]) and wants_vlmeval(["task.backend=vlmeval"])
    assert not wants_vlmeval(["task=shapes", "task.datasets=[vlmeval]"])


def _documented_command(tmp):
    """The TSVs, from the exporter's command-line code in this process (it needs pandas, not VLMEvalKit;
    tests/vlmevalkit reads what it writes with VLMEvalKit's own dataset classes), then the command."""
    import contextlib
    import io

    from harness.vlmeval import export_shapes

    if not (VENV / "bin" / "python").exists():
        return None, None  # the test is skipped: nothing to run
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        export_shapes.main(["--out", str(tmp / "lmu"), "--n", "8"])
    out = tmp / "run"
    args = [sys.executable, "-m", "harness", "model=llava_tiny", "method=lazy", "task=vlmeval",
            "task.datasets=[shapes_yorn,shapes_mcq]", f"task.data_dir={tmp / 'lmu'}", "limit=4", f"out_dir={out}",
            "efficiency.repeats=1", "efficiency.new_tokens=4"]
    return {"args": args, "cwd": ROOT, "timeout": 600, "env": {**os.environ, **OFFLINE, "LMUData": str(tmp)}}, (
        printed.getvalue(), out)


@needs_env
@pytest.mark.real_process(prepare=_documented_command)
def test_the_documented_command_runs_in_vlmevalkits_environment(real_process):
    """The command runs beside the in-process tests (tests/conftest.py)."""
    proc, (exported, out), _ = real_process
    assert "shapes_mcq" in exported
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "running in VLMEvalKit's environment" in proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["tasks"]["shapes_yorn"]["n"] == 4 and result["efficiency"]["kv_reduction"] > 0
    assert result["vlmeval"]["version"] == "0.0.20"
    assert (out / "vlmeval" / "method" / "lazyattn_shapes_yorn_auxmatch.xlsx").is_file()
    assert (out / "vlmeval" / "dense" / "lazyattn_shapes_mcq_exact_matching_result.xlsx").is_file()
