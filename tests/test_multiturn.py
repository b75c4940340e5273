"""The evaluation protocol: carried-cache multi-turn, fidelity to dense, workload KV, intervals."""

import json

import pytest
import torch
from helpers import cfg_for
from test_prune import kept_columns, masked_reference

import lazyattn
from harness import compare
from harness.generate import Generator, conversation
from harness.models import load_model
from harness.run import run
from harness.tasks import build as build_task
from lazyattn import FastV, LazyAttention, PruneEngine


@pytest.fixture(scope="module")
def trained():
    return load_model(cfg_for("model=llava_tiny").model, "cpu")


def multiturn_task(*extra):
    return build_task(cfg_for("task.qtypes=[multiturn,dialogue]", *extra).task)


@torch.no_grad()
def test_dense_carry_equals_reencode_and_carry_is_batch_invariant(trained):
    task = multiturn_task()
    samples = task.samples(12)
    assert max(len(s.questions) for s in samples) >= 4
    runs = {}
    for mode in ("carry", "reencode"):
        for batch_size in (1, 8):
            task.multiturn = mode
            runs[mode, batch_size] = task.predictions(trained.model, trained.processor, samples, batch_size, "cpu")
    assert runs["carry", 1] == runs["carry", 8]
    assert runs["reencode", 1] == runs["reencode", 8]
    assert runs["carry", 8] == runs["reencode", 8]


@pytest.mark.parametrize("kind", ["lazy", "fastv"])
@torch.no_grad()
def test_carried_second_turn_equals_a_full_length_reference(tiny, kind):
    """Turn 2 answered from the carried cache: its first logits equal an independent forward over
    the whole conversation (lazy: under the same lazy layers; FastV: dense with the image tokens
    turn 1's prefill dropped masked from layer k on)."""
    model, processor = tiny.model, tiny.processor
    sample = next(s for s in multiturn_task().samples(10) if len(s.questions) == 2)
    method = LazyAttention(layers=[1, 3, 5, 7]) if kind == "lazy" else FastV(k=2, ratio=0.5)
    engine = PruneEngine(model, method) if kind == "fastv" else None
    gen = Generator(model, processor, "cpu")
    fed = []
    forward = gen._forward
    gen._forward = lambda dialogue, ids, mask, **extra: fed.append(ids) or forward(dialogue, ids, mask, **extra)
    context = engine.install() if engine else method.apply(model)
    with context:
        dialogue, (first,) = gen.first_turn([conversation(sample.questions[:1], [])], [sample.image(64)], [4])
        stages = list(engine.stages) if engine else None
        answer = gen.text(first)
        continuation = gen.continuation(dialogue, 0, sample.questions, [answer], first)
        ids = torch.tensor([continuation])
        carried = gen._forward(dialogue, ids, torch.ones_like(ids))
    assert not bool((dialogue.mask == 0).any())  # one row, no padding: positions are 0 .. L-1
    full = torch.cat(fed, dim=1)  # every chunk fed, the continuation included
    pixels = processor.image_processor(images=[sample.image(64)], return_tensors="pt")["pixel_values"]
    inputs = {"input_ids": full, "attention_mask": torch.ones_like(full), "pixel_values": pixels}
    if kind == "lazy":
        with method.apply(model):
            reference = model(**inputs).logits[:, -1]
    else:
        prompt_length = fed[0].shape[1]
        keep = torch.ones_like(full, dtype=torch.bool)
        keep[:, :prompt_length] = kept_columns(stages[0], prompt_length)
        reference = masked_reference(model, inputs, {2: keep})[:, -1]
    assert torch.allclose(carried, reference, atol=1e-4, rtol=0)


def test_no_lazy_layers_match_dense_exactly(tmp_path):
    path = run(cfg_for("model=llava_tiny", "method=lazy", "method.layers=[]", "task.qtypes=[multiturn,long]",
                       "limit=4", "batch_size=2", "efficiency.enabled=false", "wandb.mode=disabled",
                       f"out_dir={tmp_path}"))
    result = json.loads(path.read_text())
    assert result["fidelity"]["exact_match"] == 1.0 and result["fidelity"]["first_divergence_median"] is None
    assert result["kv_workload"]["reduction"] == 0.0
    assert result["kv_workload"]["method_bytes_mean"] == result["kv_workload"]["dense_bytes_mean"] > 0
    shapes = result["tasks"]["shapes"]
    assert shapes["delta"] == 0.0 and shapes["delta_ci95"] == [0.0, 0.0]
    for qtype in ("multiturn", "long"):
        assert shapes[qtype]["delta_ci95"] == [0.0, 0.0]
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert all(len(r["kv_bytes"]) == len(r["questions"]) for r in rows)
    assert all(r["fidelity"]["exact"] for r in rows if r["variant"] == "method")


def test_pruning_keeps_less_kv_on_the_workload_than_dense(tmp_path):
    path = run(cfg_for("model=llava_tiny", "method=fastv", "task.qtypes=[colour]", "limit=4",
                       "efficiency.enabled=false", "wandb.mode=disabled", f"out_dir={tmp_path}"))
    kv = json.loads(path.read_text())["kv_workload"]
    # FastV drops half the 16 image tokens from layer 2 on: 10 of 12 layers hold 8 fewer tokens
    assert kv["dense_bytes_mean"] - kv["method_bytes_mean"] == 10 * 8 * 2 * 2 * 32 * 4


def test_intervals_bracket_their_estimate():
    for k, n in [(0, 10), (3, 10), (10, 10), (27, 50)]:
        lo, hi = compare.wilson(k, n)
        assert 0 <= lo <= k / n <= hi <= 1 and hi - lo > 0
    assert compare.wilson(27, 50)[1] - compare.wilson(27, 50)[0] > compare.wilson(270, 500)[1] - compare.wilson(270, 500)[0]
    values = [0.2, 0.9, 0.5, 0.7, 1.0, 0.0]
    lo, hi = compare.bootstrap(values)
    assert lo <= sum(values) / len(values) <= hi
    same = compare.paired_delta([1, 0, 1, 1], [1, 0, 1, 1])
    assert same["delta"] == 0.0 and same["delta_ci95"] == [0.0, 0.0]
    worse = compare.paired_delta([0] * 30 + [1] * 10, [1] * 40)
    assert worse["delta"] == pytest.approx(-0.75) and worse["delta_ci95"][1] < 0


def test_fidelity_counts_the_common_prefix():
    dense = [{"id": "a", "qtype": "long", "turns": ["x y z w"]}, {"id": "b", "qtype": "long", "turns": ["p q"]}]
    method = [{"id": "a", "qtype": "long", "turns": ["x y q w"]}, {"id": "b", "qtype": "long", "turns": ["p q"]}]
    summary, per = compare.fidelity(method, dense)
    assert per[0] == {"exact": False, "prefix_agreement": 0.5, "first_divergence": 2, "dense_tokens": 4}
    assert summary["exact_match"] == 0.5 and summary["prefix_agreement"] == 0.75
    assert summary["first_divergence_median"] == 2 and summary["long"]["n"] == 2
    assert compare.agreement_curve(per, 4) == [1.0, 1.0, 0.0, 0.0]  # t=3, 4: only sample a is that long


def test_carry_is_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match="task.multiturn must be one of"):
        multiturn_task("task.multiturn=sometimes")
    with pytest.raises(ValueError, match="min_new_tokens"):
        multiturn_task("task.min_new_tokens=-1")
    assert lazyattn.build({"name": "lazy", "layers": []}).lazy_layers(12) == []
