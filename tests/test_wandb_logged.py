"""What W&B gets, read back from the offline run files a sweep leaves: each point's ``headline/*``
keys equal its result.json ``headline`` and the report's table cells, its scores and samples
tables are there, and the sweep's summary run holds a table of its points (the same numbers) and
W&B scatter charts of accuracy and throughput against the KV cut, one per model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import harness_cli

from harness import headline, report

ROOT = Path(__file__).resolve().parent.parent
WANDB = Path(sys.executable).with_name("wandb")


def inspect(run_dir: Path) -> dict:
    """``wandb leet inspect --summary --json DIR``: the documented way to read an offline run."""
    proc = subprocess.run([str(WANDB), "leet", "inspect", "--summary", "--json", str(run_dir)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def records(run_dir: Path) -> list[dict]:
    proc = subprocess.run([str(WANDB), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def table(run_dir: Path, key: str) -> dict:
    """A logged wandb.Table, read from the run's files (``media/table/<key>_*.table.json``)."""
    found = sorted((run_dir / "files" / "media" / "table").glob(f"{key}_*.table.json"))
    assert found, f"no table {key} in {run_dir}"
    return json.loads(found[-1].read_text())


def same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-9, abs=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The sweep, run in this process (``python -m harness -m ...`` without the start-up; the real
    process is test_harness.py's offline W&B run)."""
    tmp = tmp_path_factory.mktemp("wandb_sweep")
    root = tmp / "sweep"
    args = ["-m", "+exp=sweep_lazy", "limit=6", "batch_size=6",
            "task.qtypes=[colour,count,long]", "task.max_new_tokens.long=2", "efficiency.new_tokens=2",
            "efficiency.repeats=1", "efficiency.warmup=0", "method.layers=null", "method.ratio=0.25,0.5",
            "compare_dense=true", f"sweep_root={root}"]
    with pytest.MonkeyPatch.context() as monkeypatch:
        status, out, err = harness_cli(args, monkeypatch, None, cwd=tmp,
                                       env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert status == 0, out[-3000:] + err[-3000:]
    return root, out


def test_each_run_logs_the_headline_of_its_result_json(sweep):
    root, _ = sweep
    results = report.collect(root)
    assert len(results) == 2
    for result in results:
        head = result["headline"]
        assert head["dense_below_floor"] == ["long"]  # long cut at 2 tokens ("there are"): F1 0, a type dense cannot do
        assert head["acc_mean_types_capable"] is not None and head["kv_cut_workload"] is not None
        run_dir, = (Path(result["_path"]).parent / "wandb").glob("offline-run-*")
        logged = inspect(run_dir)
        assert logged["state"] == "finished" and logged["name"] == result["method"]["label"]
        summary = logged["summary"]
        for key in headline.KEYS:
            if head.get(key) is None:
                assert summary.get(f"headline/{key}") is None, key
            else:
                assert same(summary[f"headline/{key}"], head[key]), (key, summary.get(f"headline/{key}"), head[key])
        assert summary["headline/model"] == "llava_tiny" and summary["headline/label"] == result["method"]["label"]

        # the same numbers as the main table's row of this point
        header, rows = report.main_table(results)
        row = next(r for r in rows if r[0] == result["method"]["label"])
        assert row[header.index("Model")] == "llava_tiny"
        assert row[header.index("Avg")] == headline.percent(summary["headline/acc_mean_types"])
        assert row[header.index("Avg w/o †")] == headline.percent(summary["headline/acc_mean_types_capable"])
        assert row[header.index("KV cut workload")] == f"{100 * summary['headline/kv_cut_workload']:.1f} %"
        assert row[header.index("Δ Avg")].startswith(f"{100 * summary['headline/delta_score']:+.1f} ± ")
        assert "long F1 †" in header

        # per-type scores with their intervals, and the samples
        scores = table(run_dir, "scores")
        by_type = {r[scores["columns"].index("type")]: dict(zip(scores["columns"], r)) for r in scores["data"]}
        assert set(by_type) == {"colour", "count", "long", "all"}
        for qtype in ("colour", "count", "long"):
            mine = result["tasks"]["shapes"][qtype]
            metric = "f1" if "f1" in mine else "acc"
            assert by_type[qtype]["metric"] == metric and same(by_type[qtype]["score"], mine[metric])
            assert same([by_type[qtype]["ci95_lo"], by_type[qtype]["ci95_hi"]], mine[f"{metric}_ci95"])
            assert by_type[qtype]["dense_below_floor"] == (qtype == "long")
        samples = table(run_dir, "samples")
        assert len(samples["data"]) == 12  # 6 samples, dense and method


def test_the_sweep_logs_a_summary_run_with_its_points_and_charts(sweep):
    root, stdout = sweep
    assert "sweep summary: 2 point(s)" in stdout and "| model | label |" in stdout
    run_dir, = (root / "wandb").glob("offline-run-*")
    logged = inspect(run_dir)
    assert logged["state"] == "finished" and logged["summary"]["sweep/n_points"] == 2
    points = table(run_dir, "sweep/points")
    results = {r["method"]["label"]: r for r in report.collect(root)}
    assert len(points["data"]) == 2
    for data in points["data"]:
        row = dict(zip(points["columns"], data))
        head = results[row["label"]]["headline"]
        assert row["model"] == "llava_tiny" and row["dense_below_floor"] == "long"
        for key in ("acc_mean_types", "acc_mean_types_capable", "delta_score", "kv_cut_workload", "kv_cut_timing_batch",
                    "decode_speedup_timing_batch"):
            assert same(row[key], head[key]), key
    # W&B's own scatter charts, one set per model, each naming the keys it plots
    charts = {}
    for record in records(run_dir):
        for item in (record.get("config") or {}).get("update", {}).items() if record.get("type") == "config" else []:
            charts[item[0]] = item[1]
    prefix = "_wandb.visualize.charts/llava_tiny/"
    for y, x in (("acc_mean_types", "kv_cut_workload"), ("acc_mean_types_capable", "kv_cut_workload"),
                 ("decode_speedup_timing_batch", "kv_cut_timing_batch")):
        spec = charts[f"{prefix}{y}_vs_{x}"]["panel_config"]
        assert spec["panelDefId"] == "wandb/scatter/v0" and spec["fieldSettings"] == {"x": x, "y": y}
        assert y in spec["stringSettings"]["title"] and x in spec["stringSettings"]["title"]
    chart_table = table(run_dir, f"charts/llava_tiny/acc_mean_types_vs_kv_cut_workload_table")
    assert sorted(r[1] for r in chart_table["data"]) == sorted(r["headline"]["kv_cut_workload"] for r in results.values())
