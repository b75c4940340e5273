"""The efficiency table's in-process ratios: each with its spread, and a warning when dense timed
against itself drifts."""

import pytest

from harness import report


def efficiency(speedup, method_tps, method_iqr, dense_tps, dense_iqr):
    side = lambda tps, iqr: {"decode_tokens_per_s": tps, "decode_tokens_per_s_iqr": iqr,  # noqa: E731
                              "e2e_tokens_per_s": tps, "e2e_tokens_per_s_iqr": iqr,
                              "prefill_ms": 10.0, "prefill_ms_iqr": 0.0, "kv_cache_bytes": 2**20,
                              "peak_memory_bytes": None}
    return {"method": side(method_tps, method_iqr), "dense": side(dense_tps, dense_iqr), "decode_speedup": speedup,
            "e2e_speedup": speedup, "prefill_speedup": 1.0, "kv_reduction": 0.0, "device": "cpu",
            "batch_size": 4, "prompt_tokens": 20}


def test_ratio_spread_combines_both_sides_relative_half_iqrs():
    eff = efficiency(1.5, 150.0, 30.0, 100.0, 10.0)
    # 1.5 x (30 / (2 * 150) + 10 / (2 * 100)) = 1.5 x 0.15
    assert report.ratio_spread(eff, "decode_speedup", "decode_tokens_per_s") == pytest.approx(0.225)
    assert report.speedup_cell(eff, "decode_speedup", "decode_tokens_per_s") == "1.50 ± 0.23"
    old = {**eff, "method": {k: v for k, v in eff["method"].items() if not k.endswith("_iqr")}}
    assert report.ratio_spread(old, "decode_speedup", "decode_tokens_per_s") is None  # results without IQRs
    assert report.speedup_cell(old, "decode_speedup", "decode_tokens_per_s") == "1.50"


def test_dense_against_itself_that_drifts_is_named(capsys):
    steady = {"_path": "a/result.json", "method": {"name": "dense"}, "efficiency": efficiency(1.02, 100, 2, 98, 2)}
    drifting = {"_path": "b/result.json", "method": {"name": "dense"}, "efficiency": efficiency(1.89, 189, 4, 100, 4)}
    method = {"_path": "c/result.json", "method": {"name": "lazy"}, "efficiency": efficiency(1.89, 189, 4, 100, 4)}
    warnings = report.timing_drift([steady, drifting, method])
    assert len(warnings) == 2  # decode and e2e of the drifting dense point; a method may differ from dense
    assert all(w.startswith("warning: b/result.json: dense timed against itself gave") for w in warnings)
    noisy = {**drifting, "efficiency": efficiency(1.2, 120, 60, 100, 60)}  # within its own (huge) spread
    assert report.timing_drift([noisy]) == []


def test_tables_use_an_in_run_dense_row_and_name_points_without_a_baseline(tmp_path, capsys):
    """A single compare_dense=true run keeps its dense row ("Dense (in-run)"); a method point whose
    only dense point has another limit gets a blank Δ and a note naming the difference."""
    from helpers import cfg_for

    from harness.run import run

    def point(sub, *extra):
        run(cfg_for("model=llava_tiny_random", "batch_size=2", "efficiency.enabled=false", "wandb.mode=disabled",
                    f"out_dir={tmp_path / sub}", *extra))

    point("single/lazy", "method=lazy", "limit=2", "compare_dense=true")
    header, rows = report.main_table(report.collect(tmp_path / "single"))
    assert [row[0] for row in rows] == ["Dense (in-run)", "Lazy r=0.5 (uniform)"]
    n = header.index("n")
    assert rows[0][n] == rows[1][n] == "2" and rows[1][header.index("Δ Avg")] not in ("", "–")
    assert header[1] == "Model" and rows[0][1] == rows[1][1] == "llava_tiny_random" and "Seed" not in header

    point("mixed/dense", "method=dense", "limit=4")
    point("mixed/fastv", "method=fastv", "limit=2", "compare_dense=false")
    capsys.readouterr()
    header, rows = report.main_table(report.collect(tmp_path / "mixed"))
    fastv = next(row for row in rows if row[0].startswith("FastV"))
    assert fastv[header.index("n")] == "2" and fastv[header.index("Δ Avg")] == "–"
    err = capsys.readouterr().err
    assert "note: FastV K=2 R=0.5" in err and "the dense points differ in limit" in err


def test_two_models_and_seeds_are_told_apart_and_left_out_points_named(tmp_path, capsys):
    """Two models in one tree: a Model column tells their rows apart, a Seed column appears with two
    seeds, a point of another protocol is named on stderr, and the Pareto figure never joins protocols."""
    from helpers import cfg_for

    from harness.run import run

    def point(sub, *extra):
        run(cfg_for("batch_size=2", "limit=2", "efficiency.enabled=false", "wandb.mode=disabled", "compare_dense=true",
                    "method=fastv", f"out_dir={tmp_path / sub}", *extra))

    point("a", "model=llava_tiny_deep")
    point("b", "model=llava_tiny")
    point("c", "model=llava_tiny", "seed=1")
    point("d", "model=llava_tiny", "task.multiturn=reencode")
    capsys.readouterr()
    results = report.collect(tmp_path)
    header, rows = report.main_table(results)
    assert header[:3] == ["Method", "Model", "Seed"]
    keyed = sorted((r[0], r[1], r[2]) for r in rows)
    assert len(keyed) == len(set(keyed)) == 6  # dense (in-run) and FastV for each model and seed
    err = capsys.readouterr().err
    assert "note: main table leaves out FastV K=2 R=0.5 [llava_tiny]" in err and "multiturn=reencode" in err
    import harness.figures as figures

    seen = {}
    real = figures.pareto_png
    figures.pareto_png = lambda points, path, title, **kw: seen.update(points) or real(points, path, title, **kw)
    try:
        report.pareto_figure(results, tmp_path / "out")
    finally:
        figures.pareto_png = real
    # dense and FastV under three protocols: six series of one point each, none joined across protocols
    assert len(seen) == 6 and all(len(pts) == 1 for pts in seen.values())
    assert {k for k in seen if k.startswith("fastv")} == {"fastv [llava_tiny_deep, n=2, limit=2, seed=0]",
                                                          "fastv [llava_tiny, n=2, limit=2, seed=0]",
                                                          "fastv [llava_tiny, n=2, limit=2, seed=1]"}
