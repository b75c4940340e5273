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

TEXT = dict(layers=4, hidden=64, heads=4, kv_heads=2, mlp=128, backbone="llama")
CLIP = dict(layers=2, hidden=32, mlp=64, heads=2, patch=8, image_size=32)
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


def _always_explicit(impl, real, q_len, dtype):
    """The mask before the fix: always a 4D mask (causal and padding) for sdpa."""
    cols = torch.arange(real.shape[1])
    rows = torch.arange(q_len) + (real.shape[1] - q_len)
    return (cols[None, :] <= rows[:, None])[None, None] & real[:, None, None, :]


def _generate(model, inputs, method):
    RECORDED.clear()
    with lazyattn.build(method).apply(model), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return torch.stack(out.logits), list(RECORDED)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_unpadded_pruned_stages_get_no_mask(recording_model, name, monkeypatch):
    loaded = recording_model
    model, spec = loaded.model, METHODS[name]
    method = lazyattn.build(spec)
    first = min(getattr(method, "pruner", method).first_layers(len(decoder_layers(model))))
    inputs = _inputs(loaded, padded=False)
    assert bool(inputs["attention_mask"].all())
    logits, masks = _generate(model, inputs, spec)
    pruned = [m for layer, m in masks if layer >= first]
    assert pruned and all(m is None for m in pruned), "an unpadded pruned stage must leave SDPA's is_causal path"
    assert all(m is None for _, m in masks)  # as dense layers: nothing is padded
    monkeypatch.setattr(engine, "_stage_mask", _always_explicit)
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
