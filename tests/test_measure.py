"""Measurement defects that would bias GPU numbers, checked on CPU: the pruned stages' attention
masks, the timed prefill, the timing protocol (ABBA order, IQR, end-to-end throughput), peak
device memory, bandwidth, and batched generation grouped by image-token count."""

import contextlib

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import lazyattn
from harness import generate, measure
from harness.generate import conversation, prompt_inputs
from harness.models import families
from harness.tasks import shapes
from lazyattn import engine
from lazyattn.arch import decoder_layers
from lazyattn.base import Plan

TEXT = {**families.TINY_TEXT, "backbone": "llama"}
CLIP = families.TINY_CLIP
RECORDED: list[tuple[int, object]] = []


def recording_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa, recording (layer, mask) of every call."""
    if getattr(module, "layer_idx", None) is not None:  # decoder layers only, not the vision tower
        RECORDED.append((module.layer_idx, attention_mask))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("recording_sdpa", recording_sdpa)
AttentionMaskInterface.register("recording_sdpa", sdpa_mask)

METHODS = {
    "fastv": {"name": "fastv", "k": 2, "ratio": 0.5},
    "sparsevlm": {"name": "sparsevlm", "budget": 64},
    "lazy_fastv": {"name": "lazy_fastv", "lazy": {"layers": [3]}, "fastv": {"k": 2, "ratio": 0.5}},
}


@pytest.fixture(scope="module")
def recording_model():
    return families.build_random("llava", TEXT, CLIP, attn_implementation="recording_sdpa", initializer_range=0.2)


def _inputs(loaded, padded: bool):
    samples = shapes.load_split("test", 6)
    questions = [samples[0].questions[0], samples[0].questions[0]]
    if padded:
        questions[1] = questions[1] + " please answer now"
    histories = [conversation([q], []) for q in questions]
    return prompt_inputs(loaded.processor, histories, [samples[0].image(64)] * 2, "cpu")


def _generate(model, inputs, method):
    RECORDED.clear()
    with lazyattn.build(method).apply(model), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return torch.stack(out.logits), list(RECORDED)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_unpadded_pruned_stages_get_no_mask(recording_model, name):
    loaded = recording_model
    model, spec = loaded.model, METHODS[name]
    method = lazyattn.build(spec)
    first = method.plan(len(decoder_layers(model))).pruned_from
    inputs = _inputs(loaded, padded=False)
    assert bool(inputs["attention_mask"].all())
    logits, masks = _generate(model, inputs, spec)
    pruned = [m for layer, m in masks if layer >= first]
    assert pruned and all(m is None for m in pruned), "an unpadded pruned stage must leave SDPA's is_causal path"
    assert all(m is None for _, m in masks)  # as dense layers: nothing is padded
    with engine.explicit_stage_masks():  # the mask before the fix: always a 4D mask (causal and padding)
        explicit, masks = _generate(model, inputs, spec)
    assert all(m is not None for layer, m in masks if layer >= first)
    torch.testing.assert_close(logits, explicit, atol=1e-5, rtol=1e-5)


def test_padded_pruned_stages_keep_their_mask(recording_model):
    loaded = recording_model
    inputs = _inputs(loaded, padded=True)
    assert not bool(inputs["attention_mask"].all())
    _, masks = _generate(loaded.model, inputs, METHODS["fastv"])
    assert all(m is not None for layer, m in masks if layer >= 2)


def test_stage_mask_rules():
    real = torch.ones(2, 5, dtype=torch.bool)
    assert engine._stage_mask("sdpa", real, 5, torch.float32) is None  # prefill: is_causal
    assert engine._stage_mask("sdpa", real, 1, torch.float32) is None  # decode: every column
    assert engine._stage_mask("sdpa", real, 3, torch.float32) is not None  # a chunk after a cache: bottom-right causal
    assert engine._stage_mask("eager", real, 5, torch.float32) is not None  # eager has no is_causal
    assert engine._stage_mask("flash_attention_2", real, 5, torch.float32) is None
    real[0, 0] = False
    assert engine._stage_mask("sdpa", real, 1, torch.float32).shape == (2, 1, 1, 5)


# ---- the timed run and the timing protocol ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return families.build_random("llava", TEXT, CLIP, initializer_range=0.2)


def test_timed_prefill_keeps_the_last_logits_only(tiny, monkeypatch):
    model = tiny.model
    cache_arg = generate.cache_kwarg(model)
    seen = []
    real_forward = model.forward

    def forward(*args, **kwargs):
        seen.append(kwargs.get("logits_to_keep"))
        out = real_forward(*args, **kwargs)
        seen.append(out.logits.shape[1])
        return out

    monkeypatch.setattr(model, "forward", forward)
    monkeypatch.setattr(generate, "cache_kwarg", lambda m: cache_arg)  # the wrapper hides the signature
    run = measure.generate_once(model, _inputs(tiny, padded=False), 2)
    assert seen[:2] == [1, 1]  # prefill: asked for one position, got one
    assert len(seen) == 2 * 3 and run["decode_steps"] == 2  # one prefill, then one forward per new token
    assert run["peak_memory_bytes"] is None and run["kv_read_bytes"] > 0 and run["cache"] == "static"


def test_abba_order_iqr_and_e2e(tiny, monkeypatch):
    order = []
    times = {"dense": iter([(0.1, 1.0), (0.1, 1.2), (0.1, 0.8)]), "method": iter([(0.05, 0.5), (0.05, 0.6), (0.05, 0.4)])}

    class Recorded(lazyattn.Dense):  # a method that only says when it is applied, and plans layer 1 lazy (qk)
        name = "recorded"

        def plan(self, n_layers):
            return Plan(lazy_layers=(1,), anchors={1: 0})

        @contextlib.contextmanager
        def apply(self, model):
            monkeypatch.setattr(measure, "_current", "method", raising=False)
            yield model
            monkeypatch.setattr(measure, "_current", "dense", raising=False)

    monkeypatch.setattr(measure, "_current", "dense", raising=False)

    def fake_once(model, inputs, new_tokens, cache="static", compile=False):
        name = measure._current
        if new_tokens == 10:  # a timed run (the warm-up runs min(new_tokens, 4))
            order.append(name)
            prefill, decode = next(times[name])
        else:
            prefill, decode = 1.0, 1.0
        return {"prefill_s": prefill, "decode_s": decode, "kv_cache_bytes": 100 if name == "dense" else 60,
                "peak_memory_bytes": None, "kv_read_bytes": 1000}

    monkeypatch.setattr(measure, "generate_once", fake_once)
    inputs = {"input_ids": torch.zeros(2, 5, dtype=torch.long)}
    res = measure.time_against_dense(tiny.model, inputs, Recorded(), new_tokens=10, repeats=3, warmup=1)
    assert order == ["dense", "method", "method", "dense", "dense", "method"]
    assert measure.abba_order(["a", "b"], 4) == ["a", "b", "b", "a", "a", "b", "b", "a"]
    d, m = res["dense"], res["method"]
    assert d["repeats"] == 3 and d["decode_tokens_per_s"] == pytest.approx(20 / 1.0)
    assert d["e2e_tokens_per_s"] == pytest.approx(20 / 1.1) and m["e2e_tokens_per_s"] == pytest.approx(20 / 0.55)
    assert d["decode_tokens_per_s_iqr"] == pytest.approx((20 / 0.8 - 20 / 1.2) / 2)  # inclusive quartiles of 3
    assert d["prefill_ms_iqr"] == pytest.approx(0.0, abs=1e-9) and "e2e_tokens_per_s_iqr" in m
    assert res["e2e_speedup"] == pytest.approx(1.1 / 0.55) and res["decode_speedup"] == pytest.approx(2.0)
    assert res["prefill_speedup"] == pytest.approx(2.0)  # dense ms / method ms: higher is better
    assert d["peak_memory_bytes"] is None and res["order"] == "abba"
    assert m["lazy_layers"] == [1] and res["cache"] == "static"
    # the same KV read (the fake runs read the same); the weights each step reads, counted once per variant from
    # its plan: the lazy layer skips q_proj and k_proj
    layers = decoder_layers(tiny.model)
    weights = {v: measure.decode_weight_bytes(tiny.model, layers, p) for v, p in (("d", Plan()), ("m", Plan(lazy_layers=(1,), anchors={1: 0})))}
    attn = layers[1].self_attn
    assert weights["d"] - weights["m"] == sum(p.numel() * p.element_size() for proj in (attn.q_proj, attn.k_proj)
                                              for p in proj.parameters())
    assert d["decode_weight_bytes"] == weights["d"] and m["decode_weight_bytes"] == weights["m"]
    kv = 1000 / 10
    predicted = (weights["d"] + kv) / (weights["m"] + kv)
    assert res["predicted_decode_speedup"] == pytest.approx(predicted)
    assert res["decode_speedup_of_predicted"] == pytest.approx(2.0 / predicted)
    assert "host_sync" not in res


def test_e2e_formula_and_iqr():
    assert measure.e2e_tokens_per_s(8, 128, 0.5, 1.5) == 8 * 128 / 2.0
    assert measure.iqr([1.0]) == 0.0 and measure.iqr([1, 2, 3, 4, 5]) == 2.0
    assert measure.repeats_for("cpu", 3) == 3 and measure.repeats_for("cuda", 3) == 5 and measure.repeats_for("cuda", 7) == 7


def test_peak_bandwidth_table():
    assert measure.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert measure.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert measure.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert measure.peak_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert measure.peak_bandwidth("Tesla T4") is None and measure.peak_bandwidth(None) is None


def test_compare_on_cpu_records_new_figures_and_notes(tiny):
    model = tiny.model
    inputs = _inputs(tiny, padded=False)
    lazy = lazyattn.build({"name": "lazy", "layers": [1, 3]})
    res = measure.time_against_dense(model, inputs, lazy, new_tokens=2, repeats=1, warmup=0)
    for side in ("dense", "method"):
        e = res[side]
        assert e["peak_memory_bytes"] is None and e["e2e_tokens_per_s"] > 0 and e["decode_tokens_per_s_iqr"] == 0.0
        assert e["bandwidth_utilisation"] is None and e["decode_bandwidth_bytes_per_s"] > 0
    assert res["method"]["lazy_layers"] == [1, 3] and res["dense"]["lazy_layers"] == []
    # a lazy layer skips q_proj and k_proj and half its KV
    assert res["dense"]["decode_step_bytes"] > res["method"]["decode_step_bytes"]
    d, m = res["dense"], res["method"]
    attn = [layer.self_attn for layer in tiny.model.model.language_model.layers]
    qk = sum(p.numel() * p.element_size() for i in (1, 3) for p in (*attn[i].q_proj.parameters(), *attn[i].k_proj.parameters()))
    assert d["decode_weight_bytes"] - m["decode_weight_bytes"] == qk  # the two lazy layers skip q_proj and k_proj
    assert m["decode_kv_read_bytes"] < d["decode_kv_read_bytes"]  # they read values and the anchor's probabilities
    assert res["predicted_decode_speedup"] == pytest.approx(d["decode_step_bytes"] / m["decode_step_bytes"], rel=1e-6)
    assert res["predicted_decode_speedup"] > 1
    sparse = lazyattn.build({"name": "sparsevlm", "budget": 64})
    res = measure.time_against_dense(model, inputs, sparse, new_tokens=1, repeats=1, warmup=0)
    assert "host_sync" in res and res["kv_reduction"] > 0


# ---- batched generation grouped by image-token count --------------------------------------------


def test_batches_group_by_key_in_order():
    assert generate.batches([5, 7, 5, 5, 7, 5], 2) == [[0, 2], [1, 4], [3, 5]]
    assert generate.batches([1, 1, 1], 2) == [[0, 1], [2]]


def test_mixed_image_token_counts_run_batched_with_unchanged_predictions(monkeypatch):
    loaded = families.build_random("llava_next", {**TEXT, "backbone": "mistral"}, CLIP, initializer_range=0.2)
    model, processor = loaded.model, loaded.processor
    sizes = [(64, 64), (96, 64), (64, 64), (96, 64), (64, 64)]
    asked = [generate.Conversation.of_questions(s.id, s.questions, [3], [s.image(64).resize(size)])
             for s, size in zip(shapes.load_split("test", 5), sizes)]
    counts = [int((generate.prompt_inputs(processor, [c.history], c.images, "cpu")["input_ids"]
                   == model.config.image_token_id).sum()) for c in asked]
    assert len(set(counts)) == 2, counts
    fastv = lazyattn.build({"name": "fastv", "k": 2, "ratio": 0.5})

    def predictions(batch_size):
        answers = list(generate.answer(model, processor, asked, batch_size, "cpu"))
        assert [a.id for a in answers] == [c.id for c in asked]  # in order, whatever the batches
        return [a.prediction for a in answers]

    with fastv.apply(model):
        one = predictions(1)
        assert predictions(3) == one
        monkeypatch.setattr(generate, "batches", lambda keys, b: [list(range(i, min(i + b, len(keys))))
                                                                   for i in range(0, len(keys), b)])
        with pytest.raises(ValueError, match="same number of image tokens"):
            predictions(3)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_prompts_processed_one_by_one_stack_into_the_processors_batch(family):
    """generate.answer processes each first turn once and stacks a batch from those: the same
    tensors as the processor makes of the batch (left padding, images concatenated), per family."""
    vision = families.TINY_QWEN_VISION if family.startswith("qwen") else CLIP
    text = {**families.TINY_TEXT, "mrope_section": [2, 3, 3]} if family.startswith("qwen") else TEXT
    processor = families.build_random(family, text, vision).processor
    samples = shapes.load_split("test", 3, ["colour", "describe", "count"])
    histories = [generate.conversation(s.questions[:1], []) for s in samples]
    histories[1] = generate.conversation(["a much longer question than the others , so the batch pads it ?"], [])
    images = [s.image(64) for s in samples]
    one_by_one = [generate.prompt_inputs(processor, [h], [i], "cpu") for h, i in zip(histories, images)]
    stacked = generate.collate(one_by_one, processor.tokenizer.pad_token_id)
    joint = generate.prompt_inputs(processor, histories, images, "cpu")
    assert stacked is not None and stacked.keys() == joint.keys()
    assert len({x["input_ids"].shape[1] for x in one_by_one}) > 1  # padding is exercised
    for key in joint:
        assert torch.equal(stacked[key], joint[key]), key
