"""Lazy Attention against independent references."""

import math

import pytest
from helpers import shapes_inputs
import torch
from transformers import DynamicCache

from harness.generate import conversation, prompt_inputs
from harness.tasks import shapes
from lazyattn import LazyAttention, kv_cache_bytes, uniform_lazy_layers
from lazyattn.arch import UnsupportedModelError, decoder_layers


def inputs_for(loaded, n=3, offset=0):
    return shapes_inputs(loaded, n, offset)


@pytest.fixture(params=["sdpa", "eager"])
def model_and_inputs(request, tiny, tiny_eager):
    loaded = tiny if request.param == "sdpa" else tiny_eager
    return loaded, inputs_for(loaded)


@torch.no_grad()
def test_no_lazy_layers_equals_dense(model_and_inputs):
    loaded, inputs = model_and_inputs
    dense = loaded.model(**inputs).logits
    for method in (LazyAttention(layers=[]), LazyAttention(ratio=0.0)):
        with method.apply(loaded.model):
            out = loaded.model(**inputs).logits
        assert torch.allclose(out, dense, atol=1e-6, rtol=0)


@torch.no_grad()
def test_lazy_changes_the_model(tiny):
    inputs = inputs_for(tiny)
    dense = tiny.model(**inputs).logits
    with LazyAttention(layers=[2, 3]).apply(tiny.model):
        lazy = tiny.model(**inputs).logits
    assert (lazy - dense).abs().max() > 1e-3


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@torch.no_grad()
def test_lazy_layer_equals_hand_computed_attention(model_and_inputs):
    """Attn(Q_anchor, K_anchor, V_lazy) built from the weights here, not from lazyattn."""
    loaded, inputs = model_and_inputs
    model = loaded.model
    layers = decoder_layers(model)
    anchor, lazy = 4, 5
    captured = {}

    def keep_input(idx):
        def hook(module, args, kwargs):
            captured[f"in{idx}"] = kwargs["hidden_states"]
            captured["pos"] = kwargs["position_embeddings"]
            captured["mask"] = kwargs["attention_mask"]

        return hook

    def keep_output(module, args, kwargs, output):
        captured["out"] = output[0]

    handles = [
        layers[anchor].self_attn.register_forward_pre_hook(keep_input(anchor), with_kwargs=True),
        layers[lazy].self_attn.register_forward_pre_hook(keep_input(lazy), with_kwargs=True),
        layers[lazy].self_attn.register_forward_hook(keep_output, with_kwargs=True),
    ]
    try:
        with LazyAttention(layers=[lazy, 6]).apply(model):
            model(**inputs)
    finally:
        for h in handles:
            h.remove()

    a, l = layers[anchor].self_attn, layers[lazy].self_attn
    cfg = model.config.text_config
    n_heads, n_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, a.head_dim
    x_a, x_l = captured[f"in{anchor}"].double(), captured[f"in{lazy}"].double()
    b, t, _ = x_a.shape
    q = (x_a @ a.q_proj.weight.double().T).view(b, t, n_heads, d).transpose(1, 2)
    k = (x_a @ a.k_proj.weight.double().T).view(b, t, n_kv, d).transpose(1, 2)
    v = (x_l @ l.v_proj.weight.double().T).view(b, t, n_kv, d).transpose(1, 2)
    cos, sin = (c.double().unsqueeze(1) for c in captured["pos"])
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    k = k.repeat_interleave(n_heads // n_kv, dim=1)
    v = v.repeat_interleave(n_heads // n_kv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    pad = inputs["attention_mask"].bool()
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)
    ref = (probs @ v).transpose(1, 2).reshape(b, t, -1) @ l.o_proj.weight.double().T
    got = captured["out"].double()
    valid = pad  # rows of padding tokens are undefined in every backend
    assert torch.allclose(got[valid], ref[valid], atol=1e-5, rtol=1e-4), (got[valid] - ref[valid]).abs().max()


@torch.no_grad()
def test_anchor_output_unchanged(tiny):
    """The anchor's rewritten forward computes exactly what the model's own forward does."""
    inputs = inputs_for(tiny)
    layers = decoder_layers(tiny.model)
    outs = {}

    def hook(name):
        return lambda m, a, kw, o: outs.__setitem__(name, o[0])

    for name, ctx in (("dense", None), ("lazy", LazyAttention(layers=[7]))):
        h = layers[6].self_attn.register_forward_hook(hook(name), with_kwargs=True)
        if ctx is None:
            tiny.model(**inputs)
        else:
            with ctx.apply(tiny.model):
                tiny.model(**inputs)
        h.remove()
    assert torch.allclose(outs["dense"], outs["lazy"], atol=1e-6, rtol=0)


@torch.no_grad()
def test_cached_generation_equals_uncached_forward(tiny):
    inputs = inputs_for(tiny)
    model = tiny.model
    with LazyAttention(ratio=0.5).apply(model):
        image_id = model.config.image_token_id  # a generated <image> token could not be fed back
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6,
                             suppress_tokens=[image_id], return_dict_in_generate=True, output_scores=True)
        seq = out.sequences
        mask = torch.cat([inputs["attention_mask"], torch.ones(seq.shape[0], 6, dtype=torch.long)], dim=1)
        full = model(input_ids=seq, attention_mask=mask, pixel_values=inputs["pixel_values"]).logits
    n_prompt = inputs["input_ids"].shape[1]
    step_logits = torch.stack(out.scores, dim=1)
    full = full[:, n_prompt - 1 : -1]
    # generate's processors set these to -inf (suppressed <image>, eos before min_new_tokens)
    blocked = [image_id, tiny.processor.tokenizer.eos_token_id]
    full[..., blocked] = float("-inf")
    step_logits[..., blocked] = float("-inf")
    assert torch.allclose(full, step_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(full.argmax(-1), seq[:, n_prompt:])


@torch.no_grad()
def test_batched_left_padded_generation_equals_per_sample(tiny):
    samples = shapes.load_split("test", 6)
    histories = [conversation(s.questions[:1], []) for s in samples]
    images = [s.image(64) for s in samples]
    with LazyAttention(layers=[2, 3, 5, 9]).apply(tiny.model):
        batch = prompt_inputs(tiny.processor, histories, images, "cpu")
        assert (batch["attention_mask"] == 0).any(), "the batch must actually be padded"
        out = tiny.model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        new = out[:, batch["input_ids"].shape[1]:]
        for i in range(len(samples)):
            one = prompt_inputs(tiny.processor, histories[i : i + 1], images[i : i + 1], "cpu")
            single = tiny.model.generate(**one, max_new_tokens=5, min_new_tokens=5, do_sample=False)
            assert torch.equal(single[0, one["input_ids"].shape[1]:], new[i]), i
    assert len({tuple(r.tolist()) for r in new}) > 1, "outputs should differ between samples"


@pytest.mark.parametrize("lazy", [[1], [2, 3, 5, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
@torch.no_grad()
def test_kv_bytes_formula(tiny, lazy):
    inputs = inputs_for(tiny)
    model = tiny.model
    dense = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    with LazyAttention(layers=lazy).apply(model):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    n = tiny.n_layers
    dense_bytes, lazy_bytes = kv_cache_bytes(dense.past_key_values), kv_cache_bytes(out.past_key_values)
    seq = dense.sequences.shape[1] - 1  # the last token is sampled, not cached
    cfg = model.config.text_config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert dense_bytes == 2 * n * inputs["input_ids"].shape[0] * cfg.num_key_value_heads * seq * head_dim * 4
    assert lazy_bytes * (2 * n) == dense_bytes * (2 * n - len(lazy))
    for idx in lazy:
        assert out.past_key_values.layers[idx].keys is None


def test_kv_cache_bytes_counts_shared_tensor_once():
    cache = DynamicCache()
    k, v = torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)
    cache.update(k, v, 0)
    cache.layers.append(cache.layers[0])  # a second layer holding the very same tensors
    assert kv_cache_bytes(cache) == 2 * k.numel() * 4


def test_model_restored_after_context(tiny):
    model = tiny.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attn = [layer.self_attn for layer in decoder_layers(model)]
    with LazyAttention(ratio=0.7).apply(model):
        assert any("forward" in a.__dict__ for a in attn)
    assert not any("forward" in a.__dict__ for a in attn)
    assert all(not a._forward_hooks and not a._forward_pre_hooks for a in attn)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_model_restored_after_error(tiny):
    attn = [layer.self_attn for layer in decoder_layers(tiny.model)]
    with pytest.raises(RuntimeError, match="boom"):
        with LazyAttention(layers=[3]).apply(tiny.model):
            raise RuntimeError("boom")
    assert not any("forward" in a.__dict__ for a in attn)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers": [0, 2]}, "layer 0"),
        ({"layers": [2, 2]}, "duplicates"),
        ({"layers": [-1]}, ">= 1"),
        ({"layers": [1.5]}, "integer"),
        ({"ratio": 1.0}, r"\[0, 1\)"),
        ({"ratio": -0.1}, r"\[0, 1\)"),
        ({"ratio": float("nan")}, r"\[0, 1\)"),
        ({}, "at least one"),
        ({"layers": "1,2"}, "list of layer indices"),
        ({"layers": [1], "ratio": 1.5}, r"\[0, 1\)"),
    ],
)
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LazyAttention(**kwargs)


def test_explicit_layers_take_precedence_over_ratio():
    """With both, the layers are used; the ratio only records the budget they were chosen for."""
    method = LazyAttention(layers=(3, 1), ratio=0.5)
    assert method.lazy_layers(12) == [1, 3]
    assert method.params() == {"layers": [3, 1], "ratio": 0.5, "share": "qk", "scope": "all"}
    assert method.label(12) == "Lazy r=0.166667 (explicit)" and method.sort_key(12) == ("explicit", 2 / 12)
    uniform = LazyAttention(ratio=0.5)
    assert uniform.label(12) == "Lazy r=0.5 (uniform)" and uniform.sort_key(12) == ("uniform", 0.5)


def test_out_of_range_layer(tiny):
    with pytest.raises(ValueError, match="out of range.*12 decoder layers"):
        with LazyAttention(layers=[12]).apply(tiny.model):
            pass


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=20))
    with pytest.raises(UnsupportedModelError, match="Supported"):
        with LazyAttention(layers=[1]).apply(model):
            pass


def test_uniform_rule():
    assert uniform_lazy_layers(12, 0.5) == [1, 3, 5, 7, 9, 11]
    assert uniform_lazy_layers(12, 0.7) == [1, 2, 4, 5, 7, 8, 10, 11]
    assert uniform_lazy_layers(12, 0.0) == []
    for n in (2, 7, 12, 32):
        for r in (0.1, 0.25, 0.5, 0.75, 0.99):
            lazy = uniform_lazy_layers(n, r)
            assert 0 not in lazy and len(lazy) == min(round(r * n), n - 1) and len(set(lazy)) == len(lazy)


@torch.no_grad()
def test_q_cache_is_empty_between_forwards(tiny):
    """The Q Cache is a per-forward buffer: after a forward it holds no query or key."""
    from lazyattn import attention as attention_mod

    seen = []
    real = attention_mod.QCache

    class Spy(real):
        def __init__(self):
            super().__init__()
            seen.append(self)

    attention_mod.QCache = Spy
    try:
        with LazyAttention(layers=[2, 3, 6]).apply(tiny.model):
            tiny.model(**inputs_for(tiny, n=1))
            assert seen and seen[0].query is None and seen[0].key is None
    finally:
        attention_mod.QCache = real
