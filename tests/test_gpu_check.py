"""harness.gpu_check: the CPU part end to end, and the GPU part's bench, report and resume logic on CPU."""

import json
from pathlib import Path

import torch

from harness.gpu_check import benches, cli, matrix, readme

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_run_prints_one_line_and_writes_its_checks(tmp_path, capsys, monkeypatch):
    """``python -m harness.gpu_check`` without CUDA (its main, in this process; no CUDA device here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    threads = torch.get_num_threads()
    try:
        assert cli.main(["--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()

    # every family x every registered method defined for it, padded and not
    cells = 2 * sum(len(matrix.entries(family)) for family in matrix.FAMILIES)
    assert cells == 2 * (6 * 12 + 3 * 2 + 1 * 2)  # 12 on every family; PruMerge+ (and with lazy) on the 3 LLaVA, HiRED on LLaVA-NeXT
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0] and f"{cells}/{cells} cells ok" in lines[0]
    checks = json.loads((tmp_path / "cpu_checks.json").read_text())
    assert checks["ok"] and checks["mask"]["ok"] and checks["timing_protocol"]["ok"]
    assert checks["timing_protocol"]["prefill_logits_positions"] == 1
    found = checks["correctness"]
    assert found["impls"] == ["sdpa", "eager"] and found["passed"] == found["total"] == cells
    assert {c["family"] for c in found["cells"]} == set(matrix.FAMILIES)
    assert {c["method"] for c in found["cells"] if c["family"] == "llava_next_mistral"} >= {"hired", "lazy_hired"}
    assert all(c["kv_ok"] and c["errors"]["eager"] <= matrix.TOLERANCE["float32"] for c in found["cells"])
    assert set(checks["mask"]["methods"]) >= {"fastv", "sparsevlm", "vtw", "prumerge_plus", "lazy_fastv"}


def test_correctness_matrix_resumes_and_reports_failures(tmp_path, monkeypatch):
    path = tmp_path / "correctness.json"
    torch.set_num_threads(1)
    first = matrix.correctness(torch.device("cpu"), ["float32"], ["sdpa", "eager"], path,
                                  families_=["llava_llama"], methods=["dense", "fastv"])
    assert first["passed"] == first["total"] == 4
    calls = []
    real = matrix.forced_run
    monkeypatch.setattr(matrix, "forced_run", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = matrix.correctness(torch.device("cpu"), ["float32"], ["sdpa", "eager"], path,
                                  families_=["llava_llama"], methods=["dense", "fastv"])
    assert calls == [] and again["passed"] == 4  # nothing redone
    monkeypatch.setattr(matrix, "TOLERANCE", {"float32": -1.0})  # nothing can pass
    failed = matrix.correctness(torch.device("cpu"), ["float32"], ["sdpa", "eager"], None,
                                   families_=["llava_qwen2"], methods=["lazy"])
    assert failed["passed"] == 0 and failed["total"] == 2


def test_benches_report_and_resume(tmp_path, monkeypatch, capsys):
    """The GPU part's bench step, with CPU-sized settings: README tables, summary, and a finished
    bench kept on the next run."""
    threads = torch.get_num_threads()
    tiny = ["model=llava_tiny_random", "device=cpu", "threads=1", "wandb.mode=disabled", "repeats=1", "warmup=0",
            "new_tokens=2", "batch_sizes=[1]", "context_lengths=[null]", "budget.reference_batch=2",
            "methods=['lazy ratio=0.5','sparsevlm budget=128']"]
    monkeypatch.setattr(benches, "bench_configs", lambda out, quick: [("bench", [*tiny, f"out_dir={out / 'bench'}"])])
    try:
        done = benches.run_benches(tmp_path, quick=False)
    finally:
        torch.set_num_threads(threads)
    assert done[0]["status"] == "complete" and len(done[0]["rows"]) == 2
    cells = {"device": "cpu", "impls": ["sdpa", "eager"], "tolerance": matrix.TOLERANCE, "passed": 1, "total": 1,
              "dtypes": ["float32"], "cells": [{"family": "llava_llama", "method": "dense", "dtype": "float32",
                                                 "padded": False, "errors": {"eager": 1e-7}, "kv_ok": True, "ok": True}]}
    text = readme.write_readme(tmp_path, cells, done).read_text()
    assert "lazy ratio=0.5" in text and "E2E ×" in text and "Predicted" in text and "1 / 1 cells pass" in text
    text = readme.summary(cells, done)
    assert "Decode ×" in text and "sparsevlm budget=128" in text
    assert "host_sync" in done[0]["rows"][1]  # SparseVLM's timing note
    capsys.readouterr()
    benches.run_benches(tmp_path, quick=False)
    assert "finished earlier, kept" in capsys.readouterr().out


def test_bench_configs_cover_the_issue():
    (name, grid), (name_long, long) = benches.bench_configs(Path("out"), quick=False)
    assert "batch_sizes=[1,8,32]" in grid and "context_lengths=[null,2048]" in grid and "new_tokens=128" in grid
    assert "budget.kind=memory" in grid and "budget.context_length=2048" in grid and "model=llava15_7b_random" in grid
    assert "new_tokens=512" in long
    assert len(benches.bench_configs(Path("out"), quick=True)) == 1


def test_flash_is_skipped_without_cuda():
    assert not matrix.flash_available() or torch.cuda.is_available()
    assert cli.device_slug(torch.device("cpu")) == "cpu"


def test_a_call_the_flash_kernel_cannot_take_is_not_applicable_not_a_failure():
    """``sdpa_flash`` forces SDPA's flash kernel: Lazy Attention's ``visual_scores`` reading attends with
    queries and keys twice the values' head size, which that kernel cannot run (unforced, SDPA picks
    another). The cell records it as not applicable and passes; dense's flash cell still compares numbers."""
    torch.set_num_threads(1)
    found = matrix.correctness(torch.device("cpu"), ["float32"], ["sdpa", "sdpa_flash"], None,
                               families_=["llava_llama"], methods=["dense", "lazy_visual_scores"])
    cells = {(c["method"], c["padded"]): c for c in found["cells"]}
    scores = cells[("lazy_visual_scores", False)]
    assert scores["ok"] and scores["not_applicable"] == {"sdpa_flash": matrix.NO_FLASH_KERNEL}
    assert "sdpa_flash" not in scores["errors"] and not scores["impl_errors"]
    assert cells[("dense", False)]["errors"]["sdpa_flash"] <= matrix.TOLERANCE["float32"]
    assert "not_applicable" not in cells[("dense", False)]
    _, rows = readme.correctness_table({**found, "impls": ["sdpa", "sdpa_flash"]})
    assert ["llava_llama", "lazy_visual_scores", "float32", "no", "n/a", "ok", "ok"] in rows
