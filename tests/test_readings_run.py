"""The readings, VTW and anchor calibration through the harness: presets, auto settings, records,
labels, and how tables and figures group them."""

import json
from pathlib import Path

import pytest
from helpers import cfg_for

import lazyattn
from harness import report, results
from harness.settings import RunError
from harness.method import RunMethod, method_settings
from harness.run import run
from lazyattn import choose_withdrawal_layer

PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "conf" / "method").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_method_preset_builds_or_asks_for_calibration(preset):
    cfg = cfg_for(f"method={preset}")
    if RunMethod.from_config(cfg.method).auto:
        assert preset in ("lazy_calibrated", "vtw", "lazy_vtw")
    else:
        assert lazyattn.build(method_settings(cfg.method)).name == cfg.method.name


def small(tmp_path, *extra):
    return cfg_for("+exp=llava_lazy", "model=llava_tiny_random", "limit=4", "batch_size=2", f"out_dir={tmp_path}",
                   "efficiency.enabled=false", "wandb.mode=disabled", "calibration.samples=2",
                   f"calibration.dir={tmp_path.parent / 'calib'}", *extra)


def test_vtw_auto_chooses_k_by_kl_and_records_it(tmp_path):
    result = json.loads(run(small(tmp_path / "a", "method=vtw", "method.eta=0.5")).read_text())
    method = result["method"]
    kl = method["calibration"]["kl"]
    # the released rule: searched from layer 5 of 32, scaled to 2 of the tiny model's 12
    assert len(kl) == result["model"]["n_layers"] and kl[-1] == 0.0 and kl[0] is None and min(kl[1:-1]) > 0
    k = choose_withdrawal_layer(kl, 0.5)
    assert method["params"] == {"k": k, "rule": "release", "eta": 0.5} and method["calibration"]["k"] == k
    assert method["calibration"]["start"] == 2 and method["calibration"]["direction"] == "KL(withdrawn||dense)"
    assert method["label"] == f"VTW K={k} (KL<=0.5 from L2, scaled)" and method["sort_key"] == [-k]
    # the harness's earlier rule, by name, calibrated and cached apart
    suffix = json.loads(run(small(tmp_path / "s", "method=vtw", "method.rule=suffix", "method.eta=0.5")).read_text())
    cal = suffix["method"]["calibration"]
    assert cal["key"] != method["calibration"]["key"] and cal["kl"][0] is not None
    assert cal["k"] == choose_withdrawal_layer(cal["kl"], 0.5, rule="suffix")
    assert suffix["method"]["label"] == f"VTW K={cal['k']} (suffix KL<=0.5)"
    # composed: lazy (qkv reading) with VTW at its auto k, which must be an anchor
    composed = json.loads(run(small(tmp_path / "b", "method=lazy_vtw", "method.lazy.share=qkv",
                                    "method.vtw.eta=0.5")).read_text())["method"]
    assert composed["params"]["vtw"] == {"k": k, "rule": "release", "eta": 0.5} and k not in composed["lazy_layers"]
    assert composed["label"] == f"Lazy QKV r=0.5 + VTW K={k} (KL<=0.5 from L2, scaled)"


def test_anchor_calibration_is_recorded_and_cached_apart(tmp_path):
    pairwise = json.loads(run(small(tmp_path / "p")).read_text())["method"]
    anchor = json.loads(run(small(tmp_path / "a", "calibration.select=anchor",
                                  "calibration.max_per_anchor=2")).read_text())["method"]
    cal = anchor["calibration"]
    assert cal["select"] == "anchor" and cal["max_per_anchor"] == 2 and cal["key"] != pairwise["calibration"]["key"]
    assert len(anchor["lazy_layers"]) == 6 and len(cal["chosen_js"]) == 6
    assert {int(k): v for k, v in cal["anchor_of"].items()} == lazyattn.LazyAttention(
        layers=anchor["lazy_layers"]).anchors(12)
    served = list(cal["anchor_of"].values())
    assert max(served.count(a) for a in served) <= 2
    assert anchor["label"] == "Lazy r=0.5 (anchor-calibrated, <=2/anchor)"
    assert pairwise["label"] == "Lazy r=0.5 (calibrated)" and pairwise["calibration"]["select"] == "pairwise"
    # the dense model's divergence of each lazy layer to its anchor, recomputed from the matrix
    assert report.anchor_js({"method": anchor}, cal["divergence"]) == pytest.approx(
        {int(k): v for k, v in cal["anchor_js"].items()})


def test_readings_have_their_own_labels_and_figure_series(tmp_path):
    qkv = json.loads(run(small(tmp_path / "q", "method=lazy", "method.share=qkv")).read_text())
    visual = json.loads(run(small(tmp_path / "v", "method.scope=visual")).read_text())
    assert qkv["method"]["label"] == "Lazy QKV r=0.5 (uniform)" and qkv["method"]["series"] == "lazy qkv (uniform)"
    assert visual["method"]["label"] == "Lazy VLA r=0.5 (calibrated)"
    assert visual["method"]["series"] == "lazy visual (calibrated)"
    scores = json.loads(run(small(tmp_path / "s", "method=lazy", "method.scope=visual_scores")).read_text())
    assert scores["method"]["label"] == "Lazy visual-scores r=0.5 (uniform)"
    assert scores["method"]["series"] == "lazy visual_scores (uniform)"
    for r in (qkv, visual, scores):  # a result file from before series were recorded is upgraded to the same
        assert results._series_from_sort_key(r["method"]["name"], r["method"]["sort_key"]) == r["method"]["series"]
    assert scores["kv_workload"]["reduction"] == pytest.approx(visual["kv_workload"]["reduction"], rel=0.2)
    assert qkv["kv_workload"]["reduction"] == pytest.approx(0.5)  # 6 of 12 layers keep no cache
    assert 0 < visual["kv_workload"]["reduction"] < 0.25  # only the lazy layers' image keys go


def test_calibration_table_compares_the_rules(tmp_path):
    for sub, extra in (("u", ("method=lazy",)), ("p", ()), ("a", ("calibration.select=anchor",))):
        run(small(tmp_path / "sweep" / sub, *extra, "compare_dense=true"))
    results = report.collect(tmp_path / "sweep")
    header, rows = report.calibration_table(results)
    assert header[0] == "Model" and all(row[0] == "llava_tiny_random" for row in rows)
    rows = [row[1:] for row in rows]  # the columns after Model
    assert [row[1] for row in rows] == ["anchor", "pairwise", "uniform"]
    assert all(row[0] == "0.5" and len(row[2].split()) == 6 for row in rows)
    assert all(float(row[3]) <= float(row[4]) for row in rows)  # mean <= max divergence to the anchor
    assert rows[2][2] == "1 3 5 7 9 11"
    # method against method, sample by sample: the mean of the per-sample differences
    by_rule = {row[1]: row for row in rows}
    labels = {r["method"]["label"]: r for r in results}
    a, b = "Lazy r=0.5 (anchor-calibrated)", "Lazy r=0.5 (uniform)"
    d = report.versus(results, a, b)
    score = {lab: {row["id"]: report.metrics_of(labels[lab]).row_score(row) for row in report.rows_of(labels[lab])} for lab in (a, b)}
    assert d["n"] == 4 and d["delta"] == pytest.approx(sum(score[a][i] - score[b][i] for i in score[a]) / 4)
    assert d["delta_ci95"][0] <= d["delta"] <= d["delta_ci95"][1] and by_rule["anchor"]
    with pytest.raises(ValueError, match="no main-protocol point labelled"):
        report.versus(results, a, "Lazy r=0.9 (uniform)")


@pytest.mark.parametrize("overrides, message", [
    (("+exp=llava_lazy", "method.share=v"), "share must be one of"),
    (("+exp=llava_lazy", "method.share=qkv", "method.scope=visual"), "has no scope='visual' reading"),
    (("method=lazy_vtw", "method.lazy.scope=visual"), "cannot be composed with token pruning"),
    (("method=vtw", "method.k=0"), "VTW k must be an integer >= 1"),
    (("+exp=llava_lazy", "calibration.select=adjacent"), "calibration.select must be pairwise, anchor or blocks"),
    (("+exp=llava_lazy", "calibration.max_per_anchor=0"), "calibration.max_per_anchor must be an integer >= 1"),
    (("method=vtw", "method.eta=-1"), "VTW eta .the KL threshold, nats. must be a number >= 0"),
    (("+exp=llava_lazy", "method.share=qkv"), None),  # valid settings get as far as the model
])
def test_bad_reading_settings_fail_before_the_model_loads(tmp_path, monkeypatch, overrides, message):
    import harness.run

    monkeypatch.setattr(harness.run, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    cfg = cfg_for(*overrides, "limit=2", "wandb.mode=disabled", f"out_dir={tmp_path}",
                  f"calibration.dir={tmp_path / 'calib'}")
    if message is None:
        with pytest.raises(AssertionError, match="loaded"):
            run(cfg)
        return
    with pytest.raises((ValueError, RunError), match=message) as err:
        run(cfg)
    assert "\n" not in str(err.value)


def test_anchor_calibration_runs_under_the_methods_scope(tmp_path):
    """select=anchor measures each candidate in the partially lazy model under the method's own
    reading: VLA (scope=visual) records its own calibration, cached apart from GLA's."""
    common = ("calibration.select=anchor", "method.ratio=0.25", "efficiency.enabled=false")
    gla = json.loads(run(small(tmp_path / "g", *common)).read_text())["method"]["calibration"]
    vla = json.loads(run(small(tmp_path / "v", *common, "method.scope=visual")).read_text())["method"]
    cal = vla["calibration"]
    assert (cal["share"], cal["scope"], gla["scope"]) == ("qk", "visual", "all")
    assert cal["key"] != gla["key"]
    assert cal["chosen_js"][0] == pytest.approx(gla["chosen_js"][0])  # the first pick: nothing lazy yet, both dense
    assert cal["chosen_js"] != pytest.approx(gla["chosen_js"])  # later picks: measured under each reading
    assert vla["label"] == "Lazy VLA r=0.25 (anchor-calibrated)"
