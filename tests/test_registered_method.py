"""A method registered from this file alone (``lazyattn.register``: no file in lazyattn/, no YAML in
conf/method/) runs through everything the harness has: ``run`` (and its composition with Lazy
Attention, which registering a token pruner makes), the efficiency benchmark, the correctness
matrix of the GPU check, and the report's table and figure. The harness learns what it does only
from its ``Plan``: nothing in the harness names it."""

import dataclasses
import json

import pytest
import torch

import lazyattn
from harness import bench, gpu_plan, report
from harness.gpu_check import checks, matrix
from harness.config import compose
from harness.run import run
from lazyattn.engine import Stage, TokenPruner


@dataclasses.dataclass
class HalfDrop(TokenPruner):
    """From layer ``k`` on, keep the first half of the image tokens (in reading order), drop the rest."""

    k: int = 2
    name = "halfdrop"

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"HalfDrop k must be an integer >= 1, got {self.k!r}.")

    def params(self):
        return {"k": self.k}

    def label(self, n_layers):
        return f"HalfDrop K={self.k}"

    def sort_key(self, n_layers):
        return (self.k,)

    def stage_layers(self, n_layers):
        if self.k >= n_layers:
            raise ValueError(f"HalfDrop k={self.k} is out of range for {n_layers} layers.")
        return [(self.k - 1, self.k)]

    def score_tokens(self, engine, state, stage_idx, module, query, key, stage: Stage):
        return torch.zeros(stage.real.shape, device=query.device)

    def select(self, engine, state, stage_idx, scores, prev: Stage, hidden):
        image = prev.image
        order = image.long().cumsum(dim=1)
        kept = ~image | (order <= image.sum(dim=1, keepdim=True) // 2)
        return kept.nonzero()[:, 1].view(kept.shape[0], -1), None


@pytest.fixture(scope="module", autouse=True)
def registered():
    added = [n for n in ("halfdrop", "lazy_halfdrop") if n not in lazyattn.METHODS]
    lazyattn.register("halfdrop", HalfDrop)
    yield
    for name in added:
        lazyattn.METHODS.pop(name, None)


def test_register_adds_the_method_and_its_composition():
    assert lazyattn.METHODS["halfdrop"] is HalfDrop and lazyattn.settings_of("lazy_halfdrop") == ["lazy", "halfdrop"]
    composed = lazyattn.build({"name": "lazy_halfdrop", "lazy": {"ratio": 0.5}, "halfdrop": {"k": 2}})
    plan = composed.plan(12)
    assert plan.pruner == "halfdrop" and plan.pruned_from == 2 and 2 not in plan.lazy_layers and len(plan.lazy_layers) == 6
    assert plan.series == "lazy_halfdrop" and composed.label(12) == "Lazy r=0.5 + HalfDrop K=2"
    with pytest.raises(ValueError, match="is registered already"):
        lazyattn.register("halfdrop", lambda **kw: None)
    assert compose(["method=halfdrop"]).method == {"name": "halfdrop", "k": 2}  # its preset: the defaults
    composed_preset = compose(["method=lazy_halfdrop"]).method  # the two parts' presets, nested
    assert composed_preset.halfdrop == {"k": 2} and composed_preset.lazy == {k: v for k, v in compose(
        ["method=lazy"]).method.items() if k != "name"}


def _run(tmp_path, *overrides):
    cfg = compose(["model=llava_tiny", "limit=4", "batch_size=2", "efficiency.enabled=false",
                  "wandb.mode=disabled", f"out_dir={tmp_path}", *overrides])
    return json.loads(run(cfg).read_text())


def test_run_bench_matrix_and_report(tmp_path):
    # run: the plan says what it did, in result.json and the console's schedule
    alone = _run(tmp_path / "results" / "halfdrop", "method=halfdrop", "method.k=3")
    assert alone["method"]["label"] == "HalfDrop K=3" and alone["method"]["series"] == "halfdrop"
    assert alone["method"]["plan"]["pruner"] == "halfdrop" and alone["method"]["plan"]["pruned_from"] == 3
    assert alone["method"]["lazy_layers"] == []
    both = _run(tmp_path / "results" / "lazy_halfdrop", "method=lazy_halfdrop", "method.lazy.ratio=0.5",
                "method.lazy.layers=null", "method.halfdrop.k=3")
    assert 3 not in both["method"]["lazy_layers"] and len(both["method"]["lazy_layers"]) == 6
    assert both["method"]["label"] == "Lazy r=0.5 + HalfDrop K=3"
    # the workload KV: half the image tokens gone from layer 3 on, less again with lazy layers
    cut = alone["headline"]["kv_cut_workload"]
    assert 0 < cut < both["headline"]["kv_cut_workload"] < 1

    # the efficiency benchmark, by preset name like a shipped method
    path = bench.run_bench(cfg_for_bench(tmp_path / "bench", "methods=['halfdrop k=3']"))
    rows = json.loads(path.read_text())["rows"]
    assert [r["label"] for r in rows] == ["halfdrop k=3"] and rows[0]["ratios"]["kv_fraction"] < 1

    # the correctness matrix: logits against sdpa, and the KV formula from the plan
    torch.set_num_threads(1)
    cells = matrix.correctness(torch.device("cpu"), ["float32"], ["sdpa", "eager"], None, families_=["llava_llama"],
                               methods=["halfdrop", "lazy_halfdrop"])
    assert cells["passed"] == cells["total"] == 4, [c for c in cells["cells"] if not c["ok"]]

    # the report: its rows come after the registered methods', its points form their own series
    results = report.collect(tmp_path / "results")
    header, rows = report.main_table(results)
    labels = [row[header.index("Method")] for row in rows]
    assert labels.index("HalfDrop K=3") < labels.index("Lazy r=0.5 + HalfDrop K=3"), labels
    points, _, _ = report.pareto_points(results)
    assert {s: [p[2] for p in pts] for s, pts in points.items()} == {
        "dense": ["Dense (in-run)"], "halfdrop": ["HalfDrop K=3"], "lazy_halfdrop": ["Lazy r=0.5 + HalfDrop K=3"]}
    assert report.pareto_figure(results, tmp_path / "out").exists()


def test_it_reaches_the_gpu_check_and_the_device_plan():
    """No edit in harness/gpu_check or harness/gpu_plan: the registry alone puts it in the correctness
    matrix (every family, with its composition), the mask check (it prunes) and the pruning phase."""
    for family in matrix.FAMILIES:
        found = matrix.entries(family)
        assert found["halfdrop"] == {"name": "halfdrop"}
        assert found["lazy_halfdrop"] == {"name": "lazy_halfdrop", "lazy": {"ratio": 0.5}, "halfdrop": {}}
    assert {"halfdrop", "lazy_halfdrop"} <= set(checks.pruning_entries())
    variants = gpu_plan.pruning_variants()
    assert variants[:len(gpu_plan.PRUNING_VARIANTS)] == gpu_plan.PRUNING_VARIANTS
    assert "halfdrop" in variants and "prumerge_plus" in variants and "hired" not in variants  # HiRED: LLaVA-NeXT


def cfg_for_bench(out, *overrides):
    return compose(["model=llava_tiny_random", "device=cpu", "batch_sizes=[1]", "context_lengths=[96]", "new_tokens=2",
                    "repeats=1", "warmup=0", "budget.enabled=false", f"out_dir={out}", "wandb.mode=disabled",
                    "threads=1", *overrides], config_name="bench")
