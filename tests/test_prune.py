"""FastV, SparseVLM and their composition with Lazy Attention, against independent references.

The references here never call the pruning code: a dropped token is emulated by *masking* its
key column in every layer from the pruning layer on (same weights, same positions), which must
give the same logits at the kept positions as physically dropping it.
"""

import pytest
from helpers import shapes_inputs
import torch
from transformers import DynamicCache

from harness.generate import conversation, prompt_inputs
from harness.tasks import shapes
from lazyattn import FastV, LazyAttention, SparseVLM, compose, kv_cache_bytes
from lazyattn.arch import decoder_layers
from lazyattn.compose import Composed, resolve_lazy_layers
from lazyattn.engine import PruneEngine
from lazyattn.sparsevlm import dpc_knn_merge

N_IMAGE = 64  # the tiny LLaVA's image tokens


def inputs_for(loaded, n=3, offset=0):
    # Different question types give prompts of different lengths, so the batch is left-padded.
    return shapes_inputs(loaded, n, offset, ["colour", "count", "exist"])


@pytest.fixture(params=["sdpa", "eager"])
def model_and_inputs(request, tiny, tiny_eager):
    loaded = tiny if request.param == "sdpa" else tiny_eager
    return loaded, inputs_for(loaded)


def masked_reference(model, inputs, first_layer_keep: dict[int, torch.Tensor], extra_ids=None):
    """Dense forward where, from each given layer on, only the columns in ``keep`` (B, L) bool
    can be attended; the mask is built here from scratch (causal, padding, kept columns)."""
    layers = decoder_layers(model)
    ids = inputs["input_ids"] if extra_ids is None else torch.cat([inputs["input_ids"], extra_ids], dim=1)
    pad = inputs["attention_mask"].bool()
    if extra_ids is not None:
        pad = torch.cat([pad, torch.ones_like(extra_ids, dtype=torch.bool)], dim=1)
    length = ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    impl = model.config.get_text_config(decoder=True)._attn_implementation

    def make_mask(cols):
        allowed = causal[None, None] & cols[:, None, None, :]
        if impl == "eager":
            return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
        return allowed

    starts = sorted(first_layer_keep)
    patched = []
    for idx, layer in enumerate(layers):
        active = [s for s in starts if s <= idx]
        if not active:
            continue
        cols = pad.clone()
        for s in active:
            keep = first_layer_keep[s]
            if extra_ids is not None:
                keep = torch.cat([keep, torch.ones_like(extra_ids, dtype=torch.bool)], dim=1)
            cols &= keep
        mask = make_mask(cols)
        original = type(layer).forward

        def forward(hidden_states, _layer=layer, _mask=mask, _orig=original, **kwargs):
            kwargs["attention_mask"] = _mask
            return _orig(_layer, hidden_states, **kwargs)

        layer.forward = forward
        patched.append(layer)
    try:
        if extra_ids is None:  # the prompt alone: the model derives its own positions
            return model(**inputs).logits
        full = dict(inputs, input_ids=ids, attention_mask=pad.long())
        positions = (pad.long().cumsum(-1) - 1).masked_fill(~pad, 1)
        return model(**full, position_ids=positions).logits
    finally:
        for layer in patched:
            del layer.forward


def engine_for(model, method):
    """The engine ``method.apply(model)`` installs, built here so that a test can read the
    prompt's stages (``engine.stages``) inside ``with engine.install():``."""
    if isinstance(method, Composed):
        n = len(decoder_layers(model))
        return PruneEngine(model, method.pruner, LazyAttention(layers=method.lazy_layers(n)).anchors(n))
    return PruneEngine(model, method)


def prefill_kv_lengths(model, inputs):
    """Logits of a prefill, and the number of tokens each layer's KV cache holds after it."""
    cache = DynamicCache(config=model.config)
    logits = model(**inputs, past_key_values=cache, use_cache=True).logits
    return logits, [layer.keys.shape[-2] for layer in cache.layers]


def kept_columns(stage, length):
    keep = torch.zeros(stage.source.shape[0], length, dtype=torch.bool)
    keep.scatter_(1, stage.source.clamp(min=0), True)
    return keep


@torch.no_grad()
def test_fastv_ratio_zero_equals_dense(model_and_inputs):
    loaded, inputs = model_and_inputs
    dense = loaded.model(**inputs).logits
    for score in ("last_token", "mean"):
        with FastV(k=2, ratio=0.0, score=score).apply(loaded.model):
            out, kv_lengths = prefill_kv_lengths(loaded.model, inputs)
        assert kv_lengths == [inputs["input_ids"].shape[1]] * 12
        assert torch.allclose(out, dense, atol=1e-5, rtol=0)


@torch.no_grad()
def test_sparsevlm_keep_all_equals_dense(model_and_inputs):
    loaded, inputs = model_and_inputs
    dense = loaded.model(**inputs).logits
    method = SparseVLM(keep=[N_IMAGE, N_IMAGE, N_IMAGE], layers=[1, 2, 6], positions="contiguous")
    with method.apply(loaded.model):
        out, kv_lengths = prefill_kv_lengths(loaded.model, inputs)
    assert kv_lengths == [inputs["input_ids"].shape[1]] * 12
    assert torch.allclose(out, dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize("score", ["last_token", "mean"])
@torch.no_grad()
def test_fastv_drop_equals_mask(model_and_inputs, score):
    loaded, inputs = model_and_inputs
    length = inputs["input_ids"].shape[1]
    engine = engine_for(loaded.model, FastV(k=3, ratio=0.5, score=score))
    with engine.install():
        pruned = loaded.model(**inputs).logits
        (stage,) = engine.stages
    assert pruned.shape[1] == length - N_IMAGE // 2
    reference = masked_reference(loaded.model, inputs, {3: kept_columns(stage, length)})
    b_idx = torch.arange(pruned.shape[0])[:, None]
    real = stage.real
    assert torch.allclose(pruned[real], reference[b_idx, stage.source][real], atol=1e-4, rtol=0)


@torch.no_grad()
def test_fastv_keeps_the_tokens_the_last_row_attends_to(tiny_eager):
    """The scoring row, recomputed here from layer k-1's attention weights (eager, output_attentions)."""
    inputs = inputs_for(tiny_eager)
    out = tiny_eager.model(**inputs, output_attentions=True)
    row = out.attentions[1][:, :, -1].mean(dim=1)  # layer k-1 = 1, last prompt token, head-averaged
    image = inputs["input_ids"] == tiny_eager.model.config.image_token_id
    expected = row.masked_fill(~image, -1).topk(N_IMAGE // 4, dim=1).indices.sort(dim=1).values
    engine = engine_for(tiny_eager.model, FastV(k=2, ratio=0.75))
    with engine.install():
        tiny_eager.model(**inputs)
        (stage,) = engine.stages
    kept_image = stage.source[stage.image].view(3, -1)
    assert torch.equal(kept_image, expected)


@torch.no_grad()
def test_sparsevlm_drop_equals_mask_without_recycling(tiny):
    """With original positions and no merged tokens, SparseVLM's three stages are three maskings."""
    inputs = inputs_for(tiny)
    length = inputs["input_ids"].shape[1]
    method = SparseVLM(keep=[40, 20, 8], layers=[1, 3, 6], recycle=0.0, positions="original")
    engine = engine_for(tiny.model, method)
    with engine.install():
        pruned, kv_lengths = prefill_kv_lengths(tiny.model, inputs)
        stages = engine.stages
    assert [s.first_layer for s in stages] == [2, 4, 7]
    assert kv_lengths == [length] * 2 + [length - 24] * 2 + [length - 44] * 3 + [length - 56] * 5
    reference = masked_reference(tiny.model, inputs, {s.first_layer: kept_columns(s, length) for s in stages})
    b_idx = torch.arange(3)[:, None]
    last = stages[-1]
    assert torch.allclose(pruned[last.real], reference[b_idx, last.source][last.real], atol=1e-4, rtol=0)


@torch.no_grad()
def test_sparsevlm_recycles_merged_tokens_after_the_kept_visual_tokens(tiny):
    inputs = inputs_for(tiny)
    length = inputs["input_ids"].shape[1]
    engine = engine_for(tiny.model, SparseVLM(budget=192))
    with engine.install():
        tiny.model(**inputs)
        stages = engine.stages
    # 192 budget scaled to 64 image tokens: keep 33, 22, 12; layers 2, 6, 15 scaled to 12 layers: 1, 2, 6.
    assert [s.first_layer for s in stages] == [2, 3, 7]
    # visual tokens = kept + int(m / 10) + 1 merged, m = int(0.3 * dropped) + 1 (merged tokens of
    # earlier stages are candidates like any other): 64 -> 33 + 2, 35 -> 22 + 1, 23 -> 12 + 1
    assert [int(s.image.sum(dim=1)[0]) for s in stages] == [35, 23, 13]
    assert [int((s.source == -1).sum(dim=1)[0]) for s in stages][0] == 2
    for stage in stages:
        assert bool((stage.image.sum(dim=1) == stage.image.sum(dim=1)[0]).all())
        # contiguous positions over real tokens
        real_pos = stage.positions[0][stage.real[0]]
        assert torch.equal(real_pos, torch.arange(len(real_pos)))
    # the first stage's merged tokens sit right after the last kept visual token, before the text
    row = stages[0].source[0]
    merged_at = (row == -1).nonzero()[:, 0]
    assert torch.equal(merged_at, merged_at[0] + torch.arange(2))
    assert bool(stages[0].image[0, merged_at[0] - 1]) and not bool(stages[0].image[0, merged_at[-1] + 1])
    assert stages[-1].length < length


def _greedy_with_cache(model, inputs, steps):
    def pick(logits):  # greedy, never the image placeholder (it would need pixels)
        return logits.index_fill(-1, torch.tensor([model.config.image_token_id]), float("-inf")).argmax(-1, keepdim=True)

    cache = DynamicCache(config=model.config)
    out = model(**inputs, past_key_values=cache, use_cache=True)
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    tokens, logits = [], []
    nxt = pick(out.logits[:, -1])
    for _ in range(steps):
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        pos = positions[:, -1:] + 1
        positions = torch.cat([positions, pos], dim=1)
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        nxt = pick(out.logits[:, -1])
    return torch.cat(tokens, dim=1), torch.stack(logits, dim=1), cache


@pytest.mark.parametrize("method", ["fastv", "lazy_fastv"])
@torch.no_grad()
def test_cached_decoding_equals_recomputation(model_and_inputs, method):
    loaded, inputs = model_and_inputs
    length = inputs["input_ids"].shape[1]
    fastv = FastV(k=2, ratio=0.5)
    m = fastv if method == "fastv" else compose(LazyAttention(layers=[1, 3, 5, 7]), fastv)
    engine = engine_for(loaded.model, m)
    with engine.install():
        tokens, logits, cache = _greedy_with_cache(loaded.model, inputs, steps=5)
        (stage,) = engine.stages
    with m.apply(loaded.model):  # what the method installs is that engine
        applied_tokens, applied_logits, _ = _greedy_with_cache(loaded.model, inputs, steps=5)
    assert torch.equal(applied_tokens, tokens) and torch.equal(applied_logits, logits)
    keep = kept_columns(stage, length)
    if method == "fastv":
        reference = masked_reference(loaded.model, inputs, {2: keep}, extra_ids=tokens)
    else:
        with LazyAttention(layers=[1, 3, 5, 7]).apply(loaded.model):
            reference = masked_reference(loaded.model, inputs, {2: keep}, extra_ids=tokens)
    # logits after each generated token (positions length .. length+3) predict the next one
    assert torch.allclose(logits[:, :-1], reference[:, length:-1], atol=1e-4, rtol=0)
    image_id = loaded.model.config.image_token_id
    chosen = reference[:, length - 1 :].index_fill(-1, torch.tensor([image_id]), float("-inf")).argmax(-1)
    assert torch.equal(chosen[:, : tokens.shape[1]], tokens)
    # KV: layers 0..1 hold every token, layers 2.. the kept ones; lazy layers hold no keys
    kv_len = [layer.get_seq_length() for layer in cache.layers]
    assert kv_len == [length + 5] * 2 + [length - N_IMAGE // 2 + 5] * 10


@torch.no_grad()
def test_kv_bytes_follow_the_formulas(tiny):
    inputs = inputs_for(tiny)
    batch, length = inputs["input_ids"].shape
    text = tiny.model.config.text_config
    per_token_layer = batch * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4  # fp32
    with FastV(k=2, ratio=0.75).apply(tiny.model):
        cache = DynamicCache(config=tiny.model.config)
        tiny.model(**inputs, past_key_values=cache, use_cache=True)
    kept = length - 48
    assert kv_cache_bytes(cache) == 2 * per_token_layer * (2 * length + 10 * kept)

    method = compose(LazyAttention(layers=[1, 3, 5, 7, 9, 11]), FastV(k=2, ratio=0.75))
    with method.apply(tiny.model):
        cache = DynamicCache(config=tiny.model.config)
        tiny.model(**inputs, past_key_values=cache, use_cache=True)
    keys = length * 1 + kept * 5  # anchors: 0 (full) and 2, 4, 6, 8, 10 (kept)
    values = length * 2 + kept * 10
    assert kv_cache_bytes(cache) == per_token_layer * (keys + values)

    with SparseVLM(keep=[40, 20, 8], layers=[1, 3, 6], recycle=0.0).apply(tiny.model):
        cache = DynamicCache(config=tiny.model.config)
        tiny.model(**inputs, past_key_values=cache, use_cache=True)
    lengths = [length] * 2 + [length - 24] * 2 + [length - 44] * 3 + [length - 56] * 5
    assert kv_cache_bytes(cache) == 2 * per_token_layer * sum(lengths)


def test_composition_refuses_or_moves_a_lazy_pruning_layer():
    with pytest.raises(ValueError, match=r"lazy layers \[2\] are layers where token pruning takes effect"):
        resolve_lazy_layers(LazyAttention(layers=[1, 2, 3]), [2], 12)
    moved = resolve_lazy_layers(LazyAttention(ratio=0.5), [3], 12)  # uniform: 1, 3, 5, 7, 9, 11
    assert 3 not in moved and len(moved) == 6 and 0 not in moved
    assert moved == [1, 4, 5, 7, 9, 11]
    with pytest.raises(ValueError, match="exactly one LazyAttention"):
        compose(FastV(), SparseVLM())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: FastV(k=0), "k must be an integer >= 1"),
        (lambda: FastV(ratio=1.0), r"ratio .* must be a number in \[0, 1\)"),
        (lambda: FastV(ratio=-0.1), r"must be a number in \[0, 1\)"),
        (lambda: FastV(score="max"), "score must be"),
        (lambda: SparseVLM(budget=100), "budget must be one of"),
        (lambda: SparseVLM(keep=[0]), "positive integers"),
        (lambda: SparseVLM(layers=[6, 2], keep=[1, 1]), "increasing"),
    ],
)
def test_bad_settings_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@torch.no_grad()
def test_bad_settings_for_the_model_are_refused(tiny):
    inputs = inputs_for(tiny)
    with pytest.raises(ValueError, match="k=12 is out of range"):
        with FastV(k=12).apply(tiny.model):
            pass
    with pytest.raises(ValueError, match="keeps 65 visual tokens but the image has only 64"):
        with SparseVLM(keep=[65, 10, 5]).apply(tiny.model):
            tiny.model(**inputs)
    with pytest.raises(ValueError, match="out of range for 12 decoder layers"):
        with SparseVLM(keep=[10], layers=[11]).apply(tiny.model):
            pass
    # the model is restored after each refusal
    assert all("forward" not in vars(layer) for layer in decoder_layers(tiny.model))
    assert all("forward" not in vars(layer.self_attn) for layer in decoder_layers(tiny.model))


def test_dpc_knn_merges_clusters():
    torch.manual_seed(0)
    a = torch.randn(6, 8) * 0.01 + 5
    b = torch.randn(4, 8) * 0.01 - 5
    merged = dpc_knn_merge(torch.cat([a, b]), 2)
    means = sorted(merged[:, 0].tolist())
    assert means[0] == pytest.approx(b[:, 0].mean().item(), abs=1e-5)
    assert means[1] == pytest.approx(a[:, 0].mean().item(), abs=1e-5)


@pytest.mark.parametrize("n", [1, 3])  # one prompt: no padding mask reaches the decoder; three: left-padded
@torch.no_grad()
def test_generate_matches_the_manual_cached_loop(tiny, n):
    inputs = inputs_for(tiny, n=n)
    image_id = tiny.model.config.image_token_id
    for method in (FastV(k=2, ratio=0.5), SparseVLM(budget=128), compose(LazyAttention(ratio=0.5), FastV())):
        with method.apply(tiny.model):
            tokens, _, _ = _greedy_with_cache(tiny.model, inputs, steps=6)
            out = tiny.model.generate(
                **inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, suppress_tokens=[image_id]
            )
        assert torch.equal(out[:, inputs["input_ids"].shape[1] :], tokens)


FAMILIES = ["llava_mistral", "llava_next_mistral", "llava_qwen2", "qwen2_vl", "qwen2_5_vl"]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_pruning_on_every_family(family):
    """Keep-all equals dense, and drop equals mask, on LLaVA-NeXT and the M-RoPE Qwen families too."""
    from harness.models import families
    from test_families import CASES

    kind, text, vision = CASES[family]
    loaded = families.build_random(kind, text, vision, initializer_range=0.2)
    samples = shapes.load_split("test", 3, ["colour", "count", "exist"])
    histories = [conversation(s.questions[:1], []) for s in samples]
    inputs = prompt_inputs(loaded.processor, histories, [s.image(64) for s in samples], "cpu")
    length = inputs["input_ids"].shape[1]
    n_image = int((inputs["input_ids"][0] == loaded.model.config.image_token_id).sum())
    dense = loaded.model(**inputs).logits
    with FastV(k=1, ratio=0.0).apply(loaded.model):
        assert torch.allclose(loaded.model(**inputs).logits, dense, atol=1e-5, rtol=0)
    engine = engine_for(loaded.model, FastV(k=2, ratio=0.5))
    with engine.install():
        pruned = loaded.model(**inputs).logits
        (stage,) = engine.stages
    assert stage.length == length - (n_image - round(n_image * 0.5))
    reference = masked_reference(loaded.model, inputs, {2: kept_columns(stage, length)})
    b_idx = torch.arange(3)[:, None]
    assert torch.allclose(pruned[stage.real], reference[b_idx, stage.source][stage.real], atol=1e-4, rtol=0)
