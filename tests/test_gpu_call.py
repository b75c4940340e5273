"""tools/gpu_call.py (the one device command) and harness/gpu_plan/: deadline, ordering, resume,
phase isolation and the return limits, with fake phases (each test takes seconds; no GPU)."""

import importlib.util
import json
import os
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from harness import gpu_plan

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_call", ROOT / "tools" / "gpu_call.py")
gpu_call = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_call)

# A stand-in for harness.gpu_plan: each phase does what FAKE_PLAN says, writes OUT/<phase>.json as
# the real phases do, and appends "phase:tier" to FAKE_ORDER.
FAKE = '''
import json, os, signal, sys, time
from pathlib import Path

phase, out, tier = sys.argv[1], Path(sys.argv[3]), int(sys.argv[5])
with open(os.environ["FAKE_ORDER"], "a") as f:
    f.write(f"{phase}:{tier}\\n")
what = json.loads(os.environ.get("FAKE_PLAN", "{}")).get(f"{phase}:{tier}", "ok")
path = out / f"{phase}.json"
data = json.loads(path.read_text()) if path.exists() else {"phase": phase, "points": {}}
tiers = [1, 2] if phase in ("throughput", "pruning", "budget") else [1]
data.update(plan=[{"key": "ab"[t - 1], "tier": t} for t in tiers], device_slug="cpu", status="running")
def save():
    left = {p["tier"] for p in data["plan"] if p["key"] not in data["points"]}
    data["complete_tiers"] = sorted({p["tier"] for p in data["plan"]} - left)
    data["not_run"] = [p["key"] for p in data["plan"] if p["key"] not in data["points"]]
    path.write_text(json.dumps(data))
save()
if what == "hang_after_one":
    data["points"]["a" if tier == 1 else "b"] = {"x": 1}  # one point finished, then it hangs
    save()
    time.sleep(1000)
if what == "hang":
    time.sleep(1000)
if what == "hang_ignoring_term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(1000)
if what == "crash":
    os.abort()  # as a CUDA device-side assert takes a process down
if what == "litter":
    (out / "extra.bin").write_bytes(b"x" * 100)
    (out / "deep" / "er" / "still").mkdir(parents=True)
    (out / "deep" / "er" / "still" / "f.txt").write_text("x")
    print("y" * 5_000_000)
data["points"]["a" if tier == 1 else "b"] = {"x": 1}
data["status"] = "done"
save()
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "fakephase.py").write_text(FAKE)
    order = tmp_path / "order.txt"
    order.write_text("")
    monkeypatch.setenv("PYTHONPATH", str(mod))
    monkeypatch.setenv("FAKE_ORDER", str(order))
    monkeypatch.setattr(gpu_call, "device_slug", lambda: "cpu")

    def run(out, deadline=30.0, plan=None, resume=None, steps=None):
        monkeypatch.setenv("FAKE_PLAN", json.dumps(plan or {}))
        argv = ["--out", str(out), "--deadline", str(deadline), "--wheels", str(tmp_path / "nowheels"),
                "--phase-module", "fakephase", "--profile", "cpu"]
        argv += ["--resume", str(resume)] if resume else []
        start = time.time()
        code = gpu_call.main(argv, steps=steps)
        return code, time.time() - start, json.loads((out / "summary.json").read_text())

    run.order = lambda: order.read_text().split()
    return run


def statuses(summary):
    return {s["step"]: s["status"] for s in summary["steps"]}


def test_steps_run_in_plan_order_and_write_the_summary(fake, tmp_path):
    code, _, summary = fake(tmp_path / "out")
    assert code == 0 and summary["finished"]
    assert fake.order() == ["env:1", "throughput:1", "correctness:1", "pruning:1", "budget:1", "throughput:2",
                            "pruning:2", "budget:2"]
    assert set(statuses(summary).values()) == {"done"}
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "| throughput | done |" in readme and "## Not run" in readme and "Nothing." in readme


def test_a_hanging_phase_is_killed_and_the_summary_still_lands_before_the_deadline(fake, tmp_path):
    code, elapsed, summary = fake(tmp_path / "out", deadline=8.0,
                                  plan={"throughput:1": "hang_after_one", "throughput:2": "hang"})
    assert elapsed < 8.0  # every step's timeout leaves the summary's reserve
    st = statuses(summary)
    assert st["env"] == "done" and st["throughput"] == "partial"  # its finished point is kept
    # the first-tier steps after it had their reserved time (0 for budget: it takes what is left)
    assert st["correctness"] == "done" and st["pruning"] == "done"
    step = next(s for s in summary["steps"] if s["step"] == "throughput")
    assert "killed" in step["note"] and step["seconds"] < 8.0
    assert "throughput: b" in summary["not_run"]
    assert code == 0  # cut by the deadline is not a failure


def test_a_phase_that_ignores_sigterm_is_killed_too(fake, tmp_path):
    steps = [("env", "env", 1, 0.0), ("throughput", "throughput", 1, 0.0)]
    code, elapsed, summary = fake(tmp_path / "out", deadline=5.0, plan={"env:1": "hang_ignoring_term"}, steps=steps)
    assert elapsed < 5.0 + 1.0 and summary["finished"]
    assert statuses(summary)["env"] in ("not run", "partial") and statuses(summary)["throughput"] == "not run"


def test_a_crashing_phase_loses_nothing_else(fake, tmp_path):
    code, _, summary = fake(tmp_path / "out", plan={"correctness:1": "crash"})
    st = statuses(summary)
    assert st["correctness"] == "failed" and "exited with" in next(
        s["note"] for s in summary["steps"] if s["step"] == "correctness")
    assert st["throughput"] == st["pruning"] == st["budget"] == st["budget-2"] == "done"
    assert code == 1  # a failed step makes the command fail, after the summary is written
    assert (tmp_path / "out" / "README.md").exists()


def test_resume_from_a_partial_folder_skips_what_finished(fake, tmp_path):
    first = tmp_path / "first"
    _, _, one = fake(first, deadline=8.0, plan={"throughput:1": "hang_after_one", "throughput:2": "hang"})
    left = [s["step"] for s in one["steps"] if s["status"] in ("partial", "not run")]
    assert left[:2] == ["throughput", "throughput-2"]  # throughput's point a kept, b not run; maybe more after it
    before = fake.order()
    # the results come back and are copied to results/gpu/<device>/; the next call resumes from there
    results = tmp_path / "results" / "gpu"
    dest = gpu_call.collect(first, results)
    assert dest == results / "cpu" and (dest / "throughput.json").exists()
    code, _, summary = fake(tmp_path / "second", resume=results)
    ran = fake.order()[len(before):]
    st = statuses(summary)
    assert summary["resumed_from"] == str(dest) and len(summary["calls"]) == 2
    assert st["throughput"] == "kept" and st["correctness"] == "kept" and st["pruning"] == "kept"
    # the environment always; then only what had not finished: throughput's second tier and the steps after it
    assert ran == ["env:1"] + [f"{s.split('-')[0]}:2" for s in left[1:]]
    assert summary["not_run"] == [] and code == 0


def test_steps_without_time_left_are_listed_not_run(fake, tmp_path):
    steps = [("env", "env", 1, 0.0), ("throughput", "throughput", 1, 0.9)]  # 90 % held back for throughput
    code, _, summary = fake(tmp_path / "out", deadline=2.0, steps=steps, plan={"throughput:1": "hang"})
    st = statuses(summary)
    assert st["env"] == "not run" and "before the deadline" in summary["steps"][0]["note"]
    assert "env: every point" in summary["not_run"] or st["env"] == "not run"


def test_the_results_folder_stays_within_the_return_limits(fake, tmp_path):
    out = tmp_path / "out"
    code, _, summary = fake(out, plan={"env:1": "litter"})
    assert gpu_call.check_folder(out) == []
    assert {p.name for p in out.iterdir()} <= set(gpu_call.FILES) and len(list(out.iterdir())) <= 8
    assert any("extra.bin" in m for m in summary["moved_out"]) and any("deep" in m for m in summary["moved_out"])
    assert (out / "log.txt").stat().st_size <= gpu_call.LOG_CAP + 200


def test_check_folder_finds_what_would_not_come_back(tmp_path):
    for i in range(9):
        (tmp_path / f"f{i}.json").write_text("{}")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "x.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    problems = gpu_call.check_folder(tmp_path)
    assert any("more than 8" in p for p in problems) and any("too deep" in p for p in problems)
    assert any("odd name" in p for p in problems) and any("no summary.json" in p for p in problems)


def test_wheels_install_by_unzip_when_pip_fails(tmp_path, monkeypatch):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "demo_pkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("demo_pkg/__init__.py", "VALUE = 7\n")
        z.writestr("demo_pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n")
    real = gpu_call.subprocess.run

    def no_pip(cmd, *a, **k):
        if "pip" in cmd:
            raise OSError("no pip here")
        return real(cmd, *a, **k)

    monkeypatch.setattr(gpu_call.subprocess, "run", no_pip)
    site = tmp_path / "site"
    res = gpu_call.install_wheels(wheels, site, 30)
    assert res["how"] == "unzip" and "no pip" in res["note"]
    assert (site / "demo_pkg" / "__init__.py").read_text() == "VALUE = 7\n"


# ---- the plan ----------------------------------------------------------------------------------------


def test_plan_is_point_major_and_by_value():
    # the first tier holds the comparisons the closing note quotes: batch 8 and 32
    tier1 = [(b, c) for b, c, t in gpu_plan.THROUGHPUT_POINTS if t == 1]
    assert tier1 == [(8, None), (32, 2048)]
    assert {(b, c) for b, c, _ in gpu_plan.THROUGHPUT_POINTS} == {(b, c) for b in (1, 8, 32) for c in (None, 2048)}
    assert [s[1] for s in gpu_call.STEPS[:5]] == ["env", "throughput", "correctness", "pruning", "budget"]
    assert all(s[2] == 2 and s[3] == 0 for s in gpu_call.STEPS[5:])  # the second tier reserves nothing
    assert sum(s[3] for s in gpu_call.STEPS) < 1.0
    assert gpu_plan.LAZY_VARIANTS == ["lazy ratio=0.5", "lazy ratio=0.7", "lazy ratio=0.35 share=qkv"]
    assert {"fastv ratio=0.5", "sparsevlm budget=128", "vtw k=16", "lazy_fastv"} == set(gpu_plan.PRUNING_VARIANTS)


def test_estimates_grow_with_the_work():
    e = gpu_plan.estimate_point_s
    assert e(4, 1, 584) < e(4, 8, 584) <= e(4, 32, 584) < e(4, 32, 2048) and e(4, 8, 584) < e(5, 8, 584)
    assert 30 < e(4, 8, 584) < 200  # about a minute for four variants x (warm-up + 5 repeats) of 128 tokens


def test_phase_file_resumes_and_drops_other_devices(tmp_path):
    ph = gpu_plan.Phase("throughput", tmp_path, "gpu", 1, None)
    ph.use_device("NVIDIA H100 80GB HBM3")
    ph.plan([("B8/prompt", 1), ("B32/2048", 1), ("B1/prompt", 2)])
    ph.record("B8/prompt", {"seconds": 60.0}, estimate_s=60.0)
    ph.finish("partial")
    again = gpu_plan.Phase("throughput", tmp_path, "gpu", 1, None)
    again.use_device("NVIDIA H100 80GB HBM3")
    assert again.todo() == ["B32/2048"] and again.data["complete_tiers"] == []
    other = gpu_plan.Phase("throughput", tmp_path, "gpu", 1, None)
    other.use_device("NVIDIA H200")  # another card: its numbers are not comparable, so redone
    assert other.todo() == ["B8/prompt", "B32/2048"] and other.data["dropped_from"] == "nvidia-h100-80gb-hbm3"


def test_a_phase_stops_before_a_point_it_cannot_finish(tmp_path):
    ph = gpu_plan.Phase("throughput", tmp_path, "gpu", 1, stop_at=time.time() + 100)
    assert ph.fits(50) and not ph.fits(150)
    ph.record("x", {"seconds": 120.0}, estimate_s=60.0)  # this card runs at half the estimated speed
    assert not ph.fits(60) and ph.fits(40)


def test_the_phase_modules_import_only_the_standard_library_at_their_top():
    """``python -m harness.gpu_plan env`` must run (and say what is broken) on a machine whose packages
    are broken: every module of the package imports the standard library and its siblings at its top,
    torch, Hydra and the rest of the harness inside the functions that need them."""
    import ast

    for path in sorted((ROOT / "harness" / "gpu_plan").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for name in names:
                    top = name.split(".")[0]
                    assert top in sys.stdlib_module_names or name.startswith("harness.gpu_plan"), (path.name, name)


def test_cpu_profile_throughput_runs_and_resumes(tmp_path, monkeypatch):
    import torch

    threads = torch.get_num_threads()
    try:
        assert gpu_plan.main(["throughput", "--out", str(tmp_path), "--profile", "cpu"]) == 0
        data = json.loads((tmp_path / "throughput.json").read_text())
        assert data["status"] == "skipped" and list(data["points"]) == ["B1/prompt"]
        assert data["not_run"] == ["B2/prompt"]
        point = data["points"]["B1/prompt"]
        assert point["variants"][0] == "dense" and set(point["rows"]) == {"dense", "dense dynamic", *gpu_plan.LAZY_VARIANTS,
                                                                       *gpu_plan.CONTROL_VARIANTS}
        assert point["rows"]["dense"]["cache"] == "static" and point["rows"]["dense dynamic"]["cache"] == "dynamic"
        assert point["rows"]["lazy ratio=0.5"]["kv_fraction"] < 1.0 and point["order"] == "abba"
        monkeypatch.setattr(gpu_plan.phases, "time_point", lambda *a, **k: pytest.fail("a finished point was redone"))
        assert gpu_plan.main(["throughput", "--out", str(tmp_path), "--profile", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
