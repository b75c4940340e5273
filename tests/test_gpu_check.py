"""harness.gpu_check: the CPU part end to end, and the GPU part's bench, report and resume logic on CPU."""

import json
from pathlib import Path

import pytest
import torch

from harness import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_run_prints_one_line_and_writes_its_checks(tmp_path, capsys, monkeypatch):
    """``python -m harness.gpu_check`` without CUDA (its main, in this process; no CUDA device here)."""
    from harness import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    threads = torch.get_num_threads()
    try:
        assert gpu_check.main(["--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()

    cells = len(gpu_check.FAMILIES) * len(gpu_check.METHODS) * 2  # every family x method, padded and not
    assert cells == 120
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0] and f"{cells}/{cells} cells ok" in lines[0]
    checks = json.loads((tmp_path / "cpu_checks.json").read_text())
    assert checks["ok"] and checks["mask"]["ok"] and checks["timing_protocol"]["ok"]
    assert checks["timing_protocol"]["prefill_logits_positions"] == 1
    matrix = checks["correctness"]
    assert matrix["impls"] == ["sdpa", "eager"] and matrix["passed"] == matrix["total"] == 6 * len(gpu_check.METHODS) * 2
    assert {c["family"] for c in matrix["cells"]} == set(gpu_check.FAMILIES)
    assert all(c["kv_ok"] and c["errors"]["eager"] <= gpu_check.TOLERANCE["float32"] for c in matrix["cells"])


def test_correctness_matrix_resumes_and_reports_failures(tmp_path, monkeypatch):
    path = tmp_path / "correctness.json"
    torch.set_num_threads(1)
    first = gpu_check.correctness(torch.device("cpu"), ["float32"], ["sdpa", "eager"], path,
                                  families_=["llava_llama"], methods=["dense", "fastv"])
    assert first["passed"] == first["total"] == 4
    calls = []
    real = gpu_check.forced_run
    monkeypatch.setattr(gpu_check, "forced_run", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = gpu_check.correctness(torch.device("cpu"), ["float32"], ["sdpa", "eager"], path,
                                  families_=["llava_llama"], methods=["dense", "fastv"])
    assert calls == [] and again["passed"] == 4  # nothing redone
    monkeypatch.setattr(gpu_check, "TOLERANCE", {"float32": -1.0})  # nothing can pass
    failed = gpu_check.correctness(torch.device("cpu"), ["float32"], ["sdpa", "eager"], None,
                                   families_=["llava_qwen2"], methods=["lazy"])
    assert failed["passed"] == 0 and failed["total"] == 2


def test_benches_report_and_resume(tmp_path, monkeypatch, capsys):
    """The GPU part's bench step, with CPU-sized settings: README tables, summary, and a finished
    bench kept on the next run."""
    threads = torch.get_num_threads()
    tiny = ["model=llava_tiny_random", "device=cpu", "threads=1", "wandb.mode=disabled", "repeats=1", "warmup=0",
            "new_tokens=2", "batch_sizes=[1]", "context_lengths=[null]", "budget.reference_batch=2",
            "methods=['lazy ratio=0.5','sparsevlm budget=128']"]
    monkeypatch.setattr(gpu_check, "bench_configs", lambda out, quick: [("bench", [*tiny, f"out_dir={out / 'bench'}"])])
    try:
        benches = gpu_check.run_benches(tmp_path, quick=False)
    finally:
        torch.set_num_threads(threads)
    assert benches[0]["status"] == "complete" and len(benches[0]["rows"]) == 2
    matrix = {"device": "cpu", "impls": ["sdpa", "eager"], "tolerance": gpu_check.TOLERANCE, "passed": 1, "total": 1,
              "dtypes": ["float32"], "cells": [{"family": "llava_llama", "method": "dense", "dtype": "float32",
                                                 "padded": False, "errors": {"eager": 1e-7}, "kv_ok": True, "ok": True}]}
    readme = gpu_check.write_readme(tmp_path, matrix, benches).read_text()
    assert "lazy ratio=0.5" in readme and "E2E ×" in readme and "Predicted" in readme and "1 / 1 cells pass" in readme
    text = gpu_check.summary(matrix, benches)
    assert "Decode ×" in text and "sparsevlm budget=128" in text
    assert "host_sync" in benches[0]["rows"][1]  # SparseVLM's timing note
    capsys.readouterr()
    gpu_check.run_benches(tmp_path, quick=False)
    assert "finished earlier, kept" in capsys.readouterr().out


def test_bench_configs_cover_the_issue():
    (name, grid), (name_long, long) = gpu_check.bench_configs(Path("out"), quick=False)
    assert "batch_sizes=[1,8,32]" in grid and "context_lengths=[null,2048]" in grid and "new_tokens=128" in grid
    assert "budget.kind=memory" in grid and "budget.context_length=2048" in grid and "model=llava15_7b_random" in grid
    assert "new_tokens=512" in long
    assert len(gpu_check.bench_configs(Path("out"), quick=True)) == 1


def test_flash_is_skipped_without_cuda():
    assert not gpu_check.flash_available() or torch.cuda.is_available()
    assert gpu_check.device_slug(torch.device("cpu")) == "cpu"
