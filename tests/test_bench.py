"""The efficiency benchmark (harness.bench) on the tiny random model, with tiny settings."""

import json
from pathlib import Path

import pytest

import lazyattn
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness import bench

CONF = Path(__file__).resolve().parent.parent / "conf"


@pytest.fixture(autouse=True)
def keep_threads():
    """The bench runs with threads=1 (fast on a busy 2-core machine); the suite keeps its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def bench_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="bench",
            overrides=[
                "model=llava_tiny_random", "device=cpu", "batch_sizes=[1,2]", "context_lengths=[96]",
                "new_tokens=2", "repeats=1", "warmup=0", "budget.reference_batch=3", f"out_dir={tmp_path}",
                "wandb.mode=disabled", "threads=1", *overrides,
            ],
        )


def test_bench_rows_and_budget(tmp_path, capsys):
    path = bench.run_bench(bench_cfg(tmp_path, "methods=['lazy ratio=0.5',{config:fastv,overrides:{ratio:0.5}}]"))
    result = json.loads(path.read_text())
    assert result["status"] == "complete" and result["env"]["git_sha"] and result["device"]["name"]
    assert [(r["label"], r["batch_size"]) for r in result["rows"]] == [
        ("lazy ratio=0.5", 1), ("lazy ratio=0.5", 2), ("fastv ratio=0.5", 1), ("fastv ratio=0.5", 2)
    ]
    n = result["model"]["n_layers"]
    for row in result["rows"]:
        assert row["prompt_tokens"] == 96 and row["context_length"] == 96 and row["new_tokens"] == 2
        assert row["device"] == "cpu" and row["device_name"] == result["device"]["name"]
        assert row["prefill_ms"] > 0 and row["decode_tokens_per_s"] > 0 and row["dense"]["decode_tokens_per_s"] > 0
        assert row["ratios"]["kv_fraction"] == row["kv_cache_bytes"] / row["dense"]["kv_cache_bytes"]
        # one convention: method over dense, higher is better
        x = row["ratios"]
        assert x["prefill_speedup"] == pytest.approx(row["dense"]["prefill_ms"] / row["prefill_ms"])
        assert x["decode_speedup"] == pytest.approx(row["decode_tokens_per_s"] / row["dense"]["decode_tokens_per_s"])
        assert x["e2e_speedup"] == pytest.approx(row["e2e_tokens_per_s"] / row["dense"]["e2e_tokens_per_s"])
        assert row["e2e_tokens_per_s"] < row["decode_tokens_per_s"]  # the prefill counts too
        for side in (row, row["dense"]):
            assert side["peak_memory_bytes"] is None  # no CUDA
            assert all(side[f"{t}_iqr"] == 0.0 for t in bench.TIMINGS)  # one repeat
        assert x["memory_fraction"] is None and row["order"] == "abba"
        if row["method"] == "lazy":
            n_lazy = len(row["lazy_layers"])
            assert n_lazy == 6
            # exactly: method * 2n == dense * (2n - n_lazy), in integer bytes
            assert row["kv_cache_bytes"] * 2 * n == row["dense"]["kv_cache_bytes"] * (2 * n - n_lazy)
            assert row["ratios"]["kv_fraction"] == pytest.approx(1 - n_lazy / (2 * n), rel=0, abs=1e-15)
            # bytes-based prediction: dense's bytes per decode step over the method's (weights touched + KV read)
            d, m = row["dense"], row
            assert m["decode_kv_read_bytes"] < d["decode_kv_read_bytes"] and m["decode_weight_bytes"] < d["decode_weight_bytes"]
            assert row["predicted_decode_speedup"] == pytest.approx(d["decode_step_bytes"] / m["decode_step_bytes"], rel=1e-6)
            assert row["decode_speedup_of_predicted"] == pytest.approx(x["decode_speedup"] / row["predicted_decode_speedup"])
            assert row["cache"] == "static"
        else:
            assert row["kv_cache_bytes"] < row["dense"]["kv_cache_bytes"]
    one, two = result["rows"][0], result["rows"][1]
    assert two["dense"]["kv_cache_bytes"] == 2 * one["dense"]["kv_cache_bytes"]

    budget = result["budget"]
    entries = {e["label"]: e for e in budget["entries"]}
    assert budget["complete"] and budget["device"] == "cpu" and budget["prompt_tokens"] == 96
    assert budget["bytes"] == 3 * entries["dense"]["per_sample_kv_bytes"] and entries["dense"]["max_batch"] == 3
    assert entries["lazy ratio=0.5"]["max_batch"] >= entries["dense"]["max_batch"]
    assert entries["lazy ratio=0.5"]["max_batch"] == 4  # 3 / 0.75
    for e in entries.values():
        assert e["verified_kv_cache_bytes"] <= budget["bytes"] and e["kv_cache_bytes"] <= budget["bytes"]
        assert e["decode_tokens_per_s"] > 0 and e["decode_speedup"] > 0 and e["e2e_speedup"] > 0
        assert e["e2e_tokens_per_s"] > 0 and "e2e_tokens_per_s_iqr" in e
    assert budget["kind"] == "kv" and entries["dense"]["decode_speedup"] == 1.0
    out = capsys.readouterr().out
    assert "KV budget" in out and "lazy ratio=0.5" in out and "e2e x" in out


def test_bench_resumes_after_interruption(tmp_path, monkeypatch):
    calls = []
    real = bench.measure.time_against_dense

    def flaky(*args, **kwargs):
        calls.append(args[1]["input_ids"].shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench.measure, "time_against_dense", flaky)
    cfg = bench_cfg(tmp_path, "methods=['lazy ratio=0.5']", "budget.enabled=false")
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(cfg)
    partial = json.loads((tmp_path / "bench.json").read_text())
    assert partial["status"] == "running" and [r["batch_size"] for r in partial["rows"]] == [1]
    bench.run_bench(cfg)
    assert calls == [1, 2, 2]  # batch 1 was not redone
    final = json.loads((tmp_path / "bench.json").read_text())
    assert final["status"] == "complete" and [r["batch_size"] for r in final["rows"]] == [1, 2]
    with pytest.raises(bench.BenchError, match="already holds a finished bench"):
        bench.run_bench(cfg)


def test_bench_errors_are_clear(tmp_path):
    with pytest.raises(bench.BenchError, match="unknown method preset 'nope'.*known: dense, dense_explicit, fastv, .*lazy, "):
        bench.run_bench(bench_cfg(tmp_path, "methods=[nope]"))
    with pytest.raises(bench.BenchError, match="Could not override 'method.ratoi'"):
        bench.run_bench(bench_cfg(tmp_path, "methods=['lazy ratoi=0.5']"))
    with pytest.raises(bench.BenchError, match="KV budget of 1000 bytes cannot hold one sequence of 'dense'"):
        bench.run_bench(bench_cfg(tmp_path, "methods=['lazy ratio=0.5']", "budget.bytes=1000"))
    assert not (tmp_path / "bench.json").exists()  # refused before any point was timed
    with pytest.raises(bench.BenchError, match="shorter than the unpadded prompt"):
        bench.run_bench(bench_cfg(tmp_path, "context_lengths=[8]"))
    with pytest.raises(bench.BenchError, match="budget.kind=memory needs a CUDA device"):
        bench.run_bench(bench_cfg(tmp_path, "budget.kind=memory"))
    with pytest.raises(bench.BenchError, match="budget.kind must be kv"):
        bench.run_bench(bench_cfg(tmp_path, "budget.kind=gpu"))


def test_budget_steps_down_when_the_prediction_overshoots(monkeypatch):
    """Should KV not be linear in the batch, the verified batch is the largest that fits."""

    class FakePrompts:
        def inputs(self, words, batch):
            return {"batch": batch}

    monkeypatch.setattr(bench.budget, "_peak", lambda model, v, inputs, n, kind, cache="static": 100 * inputs["batch"] + 50 * (inputs["batch"] > 3))
    monkeypatch.setattr(
        bench.measure, "interleaved",
        lambda model, variants, **kw: {k: {"kv_cache_bytes": 100 * inp["batch"], "prefill_ms": 1.0, "repeats": 1,
                                           "decode_tokens_per_s": float(inp["batch"]), "e2e_tokens_per_s": 1.0}
                                       for k, (inp, _) in variants.items()},
    )
    variants = [bench.Variant("dense", "dense", lazyattn.Dense())]
    plan = {"bytes": 420, "max_batch_cap": 256, "device": "cpu",
            "entries": [{"label": "dense", "method": "dense", "per_sample_kv_bytes": 100}]}
    out = bench.run_budget(None, FakePrompts(), {"extra_words": 0}, variants, plan,
                           {"new_tokens": 2, "repeats": 1, "warmup": 0}, "cpu")
    entry = out["entries"][0]
    assert entry["predicted_max_batch"] == 4 and entry["max_batch"] == 3 and entry["steps_down"] == 1
    assert entry["verified_kv_cache_bytes"] == 300 <= 420


def test_memory_budget_counts_the_fixed_part(monkeypatch):
    """Device memory is weights + per-sequence cost: the prediction subtracts the fixed part."""

    class FakePrompts:
        def inputs(self, words, batch):
            return {"batch": batch}

    memory = {"dense": (1000, 100), "lazy": (1000, 50)}  # (fixed, per sequence)
    monkeypatch.setattr(bench.budget, "_peak", lambda model, v, inputs, n, kind, cache="static": memory[v.label][0] + memory[v.label][1] * inputs["batch"])
    monkeypatch.setattr(
        bench.measure, "interleaved",
        lambda model, variants, **kw: {k: {"kv_cache_bytes": 1, "peak_memory_bytes": 5, "prefill_ms": 1.0, "repeats": 5,
                                           "decode_tokens_per_s": float(inp["batch"]),
                                           "e2e_tokens_per_s": float(inp["batch"]) / 2}
                                       for k, (inp, _) in variants.items()},
    )
    variants = [bench.Variant("dense", "dense", lazyattn.Dense()), bench.Variant("lazy", "lazy", lazyattn.Dense())]
    cfg = OmegaConf.create({"kind": "memory", "bytes": None, "reference_batch": 8, "max_batch": 256})
    plan = bench.budget_plan(None, FakePrompts(), {"extra_words": 0, "context_length": None, "prompt_tokens": 10},
                             variants, cfg, 4, {"device": "cuda", "name": "fake"})
    assert plan["kind"] == "memory" and plan["bytes"] == 1800
    out = bench.run_budget(None, FakePrompts(), {"extra_words": 0}, variants, plan,
                           {"new_tokens": 4, "repeats": 5, "warmup": 0}, "cuda")
    dense, lazy = out["entries"]
    assert dense["max_batch"] == 8 and lazy["max_batch"] == 16 and lazy["fixed_bytes"] == 1000
    assert lazy["batch_ratio"] == 2.0 and lazy["decode_speedup"] == 2.0 and lazy["e2e_speedup"] == 2.0


def test_presets_compose_and_the_paper_preset_runs_scaled_down(tmp_path):
    """+preset=kv (the KV-bound CPU preset), +preset=paper (80 GB of device memory at 2,048 tokens)
    and +preset=paper_cpu compose over conf/bench.yaml; paper_cpu runs end to end (shortened)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        kv = compose(config_name="bench", overrides=["+preset=kv"])
        paper = compose(config_name="bench", overrides=["+preset=paper"])
    t = kv.model.text
    kv_bytes = 2 * t.layers * 8 * 2048 * t.hidden * 4  # float32 keys and values at batch 8 x 2,048 tokens
    weights = t.layers * (4 * t.hidden**2 + 3 * t.hidden * t.mlp) * 4
    assert kv.model.dtype == "float32" and kv.context_lengths == [2048] and kv_bytes >= 3 * weights
    assert kv.compare_caches and kv.budget.kind == "kv"
    assert paper.budget.kind == "memory" and paper.budget.bytes == 80e9 and paper.context_lengths == [2048]
    assert paper.model.name == "llava15_7b_random" and paper.model.dtype == "float16"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="bench", overrides=[
            "+preset=paper_cpu", "device=cpu", "context_lengths=[128]", "budget.context_length=128", "new_tokens=2",
            "repeats=1", "warmup=0", "methods=['lazy ratio=0.5']", "budget.max_batch=16", f"out_dir={tmp_path}",
            "wandb.mode=disabled", "threads=1", "compare_caches=true"])
    result = json.loads(bench.run_bench(cfg).read_text())
    assert result["status"] == "complete" and result["budget"]["complete"] and result["rows"][0]["cache"] == "static"
    caches = result["caches"]["entries"]
    assert [e["label"] for e in caches] == ["dense", "lazy ratio=0.5"]
    assert all(e["static"]["kv_cache_bytes"] == e["dynamic"]["kv_cache_bytes"] for e in caches)  # same tokens held


def _bench_command(tmp):
    import os
    import sys

    return {"args": [sys.executable, "-m", "harness.bench", "--cfg", "job", "model=llava_tiny_random"], "cwd": tmp,
            "timeout": 300, "env": {**os.environ, "PYTHONPATH": str(CONF.parent), "WANDB_MODE": "disabled"}}, None


@pytest.mark.real_process(prepare=_bench_command)
def test_the_command_finds_its_config(real_process):
    """``python -m harness.bench`` composes conf/bench.yaml from the package's entry point (Hydra's
    config path is resolved from where ``main`` is defined, so moving it must not lose the config).
    Its command runs beside the in-process tests (tests/conftest.py)."""
    proc, _, _ = real_process
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "batch_sizes:" in proc.stdout and "methods:" in proc.stdout


def test_compile_both_times_every_point_eager_then_compiled_side_by_side(tmp_path, monkeypatch):
    """``compile=both``: each point twice (eager, then compiled with at least one warm-up: compiling is
    not decoding), rows keyed by both, and the table's compiled-vs-eager section pairs them. The
    compiled timing itself is the compiled-decode tests' business: here the calls run eagerly."""
    calls = []
    real = bench.measure.time_against_dense

    def recorded(*args, **kwargs):
        calls.append((kwargs["compile"], kwargs["warmup"]))
        return {**real(*args, **{**kwargs, "compile": False}), "compiled": kwargs["compile"]}

    monkeypatch.setattr(bench.measure, "time_against_dense", recorded)
    cfg = bench_cfg(tmp_path, "methods=['lazy ratio=0.5']", "budget.enabled=false", "batch_sizes=[1]", "compile=both")
    result = json.loads(bench.run_bench(cfg).read_text())
    assert calls == [(False, 0), (True, 1)]
    assert [(r["label"], r["compiled"]) for r in result["rows"]] == [("lazy ratio=0.5", False), ("lazy ratio=0.5", True)]
    table = bench.format_table(result).splitlines()
    start = next(i for i, line in enumerate(table) if line.startswith("compiled (one static graph"))
    pair = table[start + 2:start + 4]
    assert pair[0].startswith("lazy ratio=0.5 ") and pair[1].startswith("  its dense")
    assert any(v in pair[0] for v in ("within noise", "compiled faster", "compiled SLOWER beyond noise"))
    assert any(line.startswith("lazy ratio=0.5 compiled") for line in table)
    with pytest.raises(bench.BenchError, match="compile must be false, true or both, got 'sometimes'"):
        bench.run_bench(bench_cfg(tmp_path / "x", "compile=sometimes"))
