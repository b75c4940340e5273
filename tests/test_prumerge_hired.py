"""PruMerge(+) and HiRED, methods that shrink the image tokens before the language model.

The references here never call the methods' code: the [CLS] attention is recomputed from the
vision tower's hidden states and weights, the kept tokens and merged features follow the
released code's loops (numpy percentiles, per-token cosine top-k), and the language model is
run densely over the reduced sequence built by hand (contiguous positions). Batches (samples
keeping different counts, padded) are compared with one sample at a time.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import cfg_for, shapes_inputs
from transformers import DynamicCache

import lazyattn
from lazyattn import HiRED, LazyAttention, PruMerge, compose, kv_cache_bytes
from lazyattn.engine import PruneEngine

# ------------------------------------------------------------------------------ references


def tower_states(model, pixel_values):
    tower = model.model.vision_tower
    return tower(pixel_values, output_hidden_states=True).hidden_states


def encoder_layers(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers


def prumerge_reference(model, pixel_values, plus=True, k=32):
    """Per image: (kept indices in the released order, reduced features pre-projector), after the
    released token_prune_merge_advanced[_plus] (adaptive), written here from its description; each
    kept token merges its ``k`` nearest other tokens (the release: 32 of 576)."""
    states = tower_states(model, pixel_values)
    x = states[-2]  # LLaVA's features, [CLS] first
    layer = encoder_layers(model)[-1]  # the layer that reads them
    h = layer.layer_norm1(x)
    wide = torch.promote_types(x.dtype, torch.float32)
    q = layer.self_attn.q_proj(h).to(wide)
    key = layer.self_attn.k_proj(h).to(wide)
    out = []
    for b in range(x.shape[0]):
        feats = x[b, 1:].to(wide)
        n, c = feats.shape
        attn = torch.softmax(q[b] @ key[b].T * c**-0.5, dim=-1)[0, 1:]
        a = attn.numpy().astype(np.float64)
        q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
        n_out = max(1, int((a > q3 + 1.5 * (q3 - q1)).sum()))
        idx = attn.topk(n_out).indices.tolist()
        if plus:
            step = max(1, (n // n_out) // 3)
            idx += [s for s in range(0, n - 1, step) if s not in idx]
        rest_pruned = [j for j in range(n) if j not in idx]
        unit = F.normalize(key[b, 1:], dim=-1)
        merged = []
        for i in idx:
            others = [j for j in idx if j != i] + rest_pruned
            sims = torch.stack([unit[i] @ unit[j] for j in others])
            near = [others[t] for t in sims.topk(k).indices.tolist()]
            merged.append(feats[i] + sum(attn[j] * feats[j] for j in near))
        if rest_pruned:
            merged.append(sum(attn[j] * feats[j] for j in rest_pruned))
        out.append((idx, torch.stack(merged)))
    return out


def lm_logits(model, embeds):
    """The language model run densely over ``embeds`` (1, L, C) at positions 0..L-1."""
    positions = torch.arange(embeds.shape[1])[None]
    hidden = model.model.language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
    return model.lm_head(hidden)


def reduced_embeds(model, ids, image_vectors):
    """One prompt's embeddings with its image tokens replaced by ``image_vectors`` (M, C)."""
    image = ids == model.config.image_token_id
    first = int(image.nonzero()[0, 0])
    text = model.get_input_embeddings()(ids)
    return torch.cat([text[:first], image_vectors.to(text.dtype), text[first:][~image[first:]]])[None]


@pytest.fixture(scope="module")
def tiny64(tiny):
    """The tiny random model in float64: the wide init makes it chaotic, so float32 rounding (which
    differs between CPUs' kernels) can move a logit by 1e-3 between two equal computations; in
    float64 equal computations agree to 1e-10, and the tolerances below test the method, not the CPU."""
    import copy

    return dataclasses.replace(tiny, model=copy.deepcopy(tiny.model).double())


def unpadded(inputs, b):
    """Sample ``b`` of a left-padded batch, alone."""
    keep = inputs["attention_mask"][b].bool()
    one = {"input_ids": inputs["input_ids"][b : b + 1, keep], "attention_mask": inputs["attention_mask"][b : b + 1, keep],
           "pixel_values": inputs["pixel_values"][b : b + 1]}
    if "image_sizes" in inputs:
        one["image_sizes"] = inputs["image_sizes"][b : b + 1]
    return one


@pytest.fixture(scope="module")
def next_model():
    """A tiny LLaVA-NeXT with a 3-layer CLIP tower: HiRED's early (0) and final (1) layers differ."""
    from harness.models import families

    family, text, vision = families.TINY_SHAPES["llava_next_mistral"]
    return families.build_random(family, text, {**vision, "layers": 3}, initializer_range=0.2)


def hired_reference(model, pixel_values, image_size, budget=0.2, alpha=0.5, regions="raster"):
    """(P, N) kept mask of one square image after the released HiRED_token_selection, written here
    from scratch; the sub-image regions as released (``raster``: the full image's raster-ordered
    tokens cut into as many equal consecutive runs as there are sub-images, run j credited to
    sub-image j) or taken spatially (``spatial``: the full image's tile-sized areas)."""
    states = tower_states(model, pixel_values)
    layers = encoder_layers(model)
    n_heads = layers[0].self_attn.num_heads

    def cls(i):
        h = layers[i].layer_norm1(states[i])
        q = layers[i].self_attn.q_proj(h).float()
        kk = layers[i].self_attn.k_proj(h).float()
        p, length, c = q.shape
        d = c // n_heads
        qh = q.view(p, length, n_heads, d).transpose(1, 2)
        kh = kk.view(p, length, n_heads, d).transpose(1, 2)
        return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)[:, :, 0, 1:].sum(dim=1)

    early, final = cls(0), cls(len(layers) - 2)
    p, n = final.shape
    side = math.isqrt(n)
    grid = image_size // model.config.vision_config.image_size  # square image, square grid of tiles
    mask = torch.zeros(p, n, dtype=torch.bool)
    total = int(p * n * budget)
    full = min(int(total * alpha), n)
    sub = min(total - full, (p - 1) * n)
    mask[0, final[0].topk(full).indices] = True
    chosen = early[0].topk(int(n * (1 - alpha))).indices.tolist()
    counts = [0] * (grid * grid)
    for t in chosen:
        if regions == "raster":
            counts[t // (n // (grid * grid))] += 1
        else:
            r, c = divmod(t, side)
            counts[(r * grid // side) * grid + c * grid // side] += 1
    for j in range(grid * grid):
        mask[j + 1, final[j + 1].topk(min(n, int(torch.tensor(counts[j] / sum(counts)).float() * sub))).indices] = True
    return mask, grid


def packed_order(mask, grid, side):
    """LLaVA-NeXT's packed image tokens of a square image (no unpadding): the full image, then the
    tiles' grid row by row, a newline after each row; ``(partition, token)`` or None for a newline."""
    order = [(0, t) for t in range(side * side)]
    for row in range(grid * side):
        for col in range(grid * side):
            tile = (row // side) * grid + col // side
            order.append((1 + tile, (row % side) * side + col % side))
        order.append(None)
    return order


# ------------------------------------------------------------------------------ PruMerge


# The tiny model's images have 64 tokens. The release merges 32 of 576 neighbours: the same fraction
# of 64 is round(32 * 64 / 576) = round(3.56) = 4 (neighbours_rule=scaled, the default); capped at
# N - 1 = 63 the harness's earlier count (neighbours_rule=capped) stays 32.
@pytest.mark.parametrize("plus, rule, k", [(True, "scaled", 4), (False, "scaled", 4), (True, "capped", 32),
                                           (False, "capped", 32)])
@torch.no_grad()
def test_prumerge_keeps_and_merges_as_released_and_the_lm_sees_that_sequence(tiny64, plus, rule, k):
    model = tiny64.model
    inputs = shapes_inputs(tiny64, 3)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    engine = PruneEngine(model, PruMerge(plus=plus, neighbours_rule=rule))
    with engine.install():
        batched = model(**inputs).logits
        (stage,) = engine.stages
    counts = []
    for b in range(3):
        one = unpadded(inputs, b)
        (ref_idx, ref_feats), = prumerge_reference(model, one["pixel_values"], plus=plus, k=k)
        with engine.install():
            single = model(**one).logits
            assert engine.prompt_state["kept"][0].tolist() == ref_idx
        vectors = model.model.multi_modal_projector(ref_feats)
        reference = lm_logits(model, reduced_embeds(model, one["input_ids"][0], vectors))
        assert single.shape == reference.shape
        assert torch.allclose(single, reference, atol=1e-4, rtol=0)
        real = stage.real[b]
        assert torch.allclose(batched[b, real], single[0], atol=1e-4, rtol=0)  # batch (padded) = alone
        counts.append(len(ref_idx) + (len(ref_idx) < 64))
    assert stage.real.sum(dim=1).tolist() == [int(inputs["attention_mask"][b].sum()) - 64 + counts[b] for b in range(3)]
    assert len(set(counts)) > 1  # the samples keep different counts here, so the batch is padded


@torch.no_grad()
def test_prumerge_keeping_everything_unmerged_equals_dense(tiny):
    inputs = shapes_inputs(tiny, 3)
    dense = tiny.model(**inputs).logits
    image_id = tiny.model.config.image_token_id
    with PruMerge(iqr=-math.inf, neighbours=0, order="spatial").apply(tiny.model):
        logits = tiny.model(**inputs).logits
        out = tiny.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, suppress_tokens=[image_id])
    assert torch.allclose(logits, dense, atol=1e-5, rtol=0)
    plain = tiny.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, suppress_tokens=[image_id])
    assert torch.equal(out, plain)


@pytest.mark.parametrize("lazy", [False, True])
@torch.no_grad()
def test_prumerge_cached_decoding_equals_the_reduced_sequence_recomputed(tiny64, lazy):
    """generate() with the cache = a dense (or Lazy) forward over the hand-built reduced prompt plus
    the generated tokens; the KV cache holds the reduced prompt in every layer (keys: anchors only)."""
    model = tiny64.model
    image_id = model.config.image_token_id
    one = unpadded(shapes_inputs(tiny64, 3), 1)
    one["pixel_values"] = one["pixel_values"].double()
    lazy_part = LazyAttention(layers=[1, 3, 5, 7, 9, 11])
    method = compose(lazy_part, PruMerge()) if lazy else PruMerge()
    with method.apply(model):
        out = model.generate(**one, max_new_tokens=5, min_new_tokens=5, do_sample=False, suppress_tokens=[image_id],
                             output_logits=True, return_dict_in_generate=True)
        cache = DynamicCache(config=model.config)
        model(**one, past_key_values=cache, use_cache=True)
    (ref_idx, ref_feats), = prumerge_reference(model, one["pixel_values"], k=4)  # 32 of 576 -> 4 of 64
    embeds = reduced_embeds(model, one["input_ids"][0], model.model.multi_modal_projector(ref_feats))
    new = out.sequences[:, one["input_ids"].shape[1] :]
    full = torch.cat([embeds, model.get_input_embeddings()(new[:, :-1])], dim=1)
    if lazy:
        with lazy_part.apply(model):
            reference = lm_logits(model, full)
    else:
        reference = lm_logits(model, full)
    steps = torch.stack(out.logits, dim=1)  # the logits that chose each new token
    assert torch.allclose(steps.double(), reference[:, embeds.shape[1] - 1 :], atol=1e-4, rtol=0)  # generate returns float32 logits
    # KV formula: every layer caches the reduced prompt (L' tokens); lazy layers keep values only
    text = model.config.text_config
    per = text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * (torch.finfo(model.dtype).bits // 8)
    length = embeds.shape[1]
    assert [layer.get_seq_length() for layer in cache.layers][:1] == [length]
    n_lazy = 6 if lazy else 0
    assert kv_cache_bytes(cache) == per * length * (2 * 12 - n_lazy)


# ------------------------------------------------------------------------------ HiRED


@pytest.mark.parametrize("regions", ["raster", "spatial"])
@torch.no_grad()
def test_hired_keeps_the_released_budget_split_and_the_lm_sees_that_sequence(next_model, regions):
    model = next_model.model
    inputs = shapes_inputs(next_model, 3)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    engine = PruneEngine(model, HiRED(budget=0.3, regions=regions))
    with engine.install():
        batched = model(**inputs).logits
        (stage,) = engine.stages
    for b in range(3):
        one = unpadded(inputs, b)
        size = int(one["image_sizes"][0, 0])
        assert size == int(one["image_sizes"][0, 1])  # square: LLaVA-NeXT unpads nothing
        p = one["pixel_values"].shape[1]
        mask, grid = hired_reference(model, one["pixel_values"][0, :p], size, budget=0.3, regions=regions)
        assert mask.sum() <= int(p * side * side * 0.3)
        with engine.install():
            single = model(**one).logits
            assert torch.equal(engine.prompt_state["masks"][0], mask)
        features = model.model.get_image_features(one["pixel_values"], one["image_sizes"]).pooler_output[0]
        order = packed_order(mask, grid, side)
        assert len(order) == features.shape[0]
        kept = [e for e, where in enumerate(order) if where is not None and bool(mask[where])]
        reference = lm_logits(model, reduced_embeds(model, one["input_ids"][0], features[kept]))
        assert torch.allclose(single, reference, atol=1e-4, rtol=0)
        assert torch.allclose(batched[b, stage.real[b]], single[0], atol=1e-4, rtol=0)


@torch.no_grad()
def test_hired_full_budget_with_newlines_equals_dense_and_kv_follows_the_kept_count(next_model):
    model = next_model.model
    inputs = shapes_inputs(next_model, 3)
    image_id = model.config.image_token_id
    dense = model(**inputs).logits
    with HiRED(budget=1.0, newlines=True).apply(model):
        assert torch.allclose(model(**inputs).logits, dense, atol=1e-5, rtol=0)
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, suppress_tokens=[image_id])
    assert torch.equal(out, model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                           suppress_tokens=[image_id]))
    # KV: every layer holds text + kept image tokens (+ the batch's padding columns)
    engine = PruneEngine(model, HiRED(budget=0.2))
    with engine.install():
        cache = DynamicCache(config=model.config)
        model(**inputs, past_key_values=cache, use_cache=True)
        (stage,) = engine.stages
    n_image = int((inputs["input_ids"][0] == image_id).sum())
    kept = int(stage.image[0].sum())
    assert kept < 0.3 * n_image and stage.length == inputs["input_ids"].shape[1] - n_image + kept  # equal images here
    text = model.config.text_config
    per = 3 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4
    assert kv_cache_bytes(cache) == 2 * text.num_hidden_layers * per * stage.length
    with compose(LazyAttention(layers=[1, 3]), HiRED()).apply(model):
        lazy_out = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=[image_id])
    assert lazy_out.shape[1] == inputs["input_ids"].shape[1] + 3


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("spec, message", [
    ({"name": "prumerge_plus", "plus": 1}, "plus must be true"),
    ({"name": "prumerge_plus", "iqr": math.inf}, "iqr"),
    ({"name": "prumerge_plus", "neighbours": -1}, "neighbours"),
    ({"name": "prumerge_plus", "order": "random"}, "order"),
    ({"name": "prumerge_plus", "neighbours_rule": "all"}, "neighbours_rule"),
    ({"name": "hired", "budget": 0.0}, "budget"),
    ({"name": "hired", "budget": 1.5}, "budget"),
    ({"name": "hired", "alpha": -0.1}, "alpha"),
    ({"name": "hired", "early_layer": -1}, "early_layer"),
    ({"name": "hired", "regions": "grid"}, "regions"),
    ({"name": "lazy_hired", "lazy": {"name": "lazy"}, "hired": {"name": "hired", "budget": 2}}, "budget"),
])
def test_bad_settings_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        lazyattn.build(spec)


@pytest.mark.parametrize("method, model, message", [
    ("prumerge_plus", "qwen2_vl_7b_random", "no \\[CLS\\] token"),
    ("hired", "qwen25_vl_7b_random", "no \\[CLS\\] token"),
    ("hired", "llava15_7b_random", "defined for llava_next models only, not llava"),
    ("lazy_prumerge_plus", "llava_next_mistral_7b_random", "defined for llava models only, not llava_next"),
])
def test_families_the_method_is_not_defined_for_are_refused_before_the_model_loads(method, model, message, tmp_path):
    from harness.run import preflight

    cfg = cfg_for(f"model={model}", f"method={method}", f"out_dir={tmp_path / 'run'}", "model.dtype=float32")
    with pytest.raises(ValueError, match=message) as err:
        preflight(cfg)
    assert "\n" not in str(err.value)


@torch.no_grad()
def test_applying_to_a_family_the_method_is_not_defined_for_is_refused(tiny, next_model):
    with pytest.raises(ValueError, match="defined for llava_next models only"):
        with HiRED().apply(tiny.model):
            pass
    with pytest.raises(ValueError, match="defined for llava models only"):
        with PruMerge().apply(next_model.model):
            pass


@pytest.mark.parametrize("which", ["prumerge_plus", "lazy_prumerge_plus", "hired", "lazy_hired"])
@torch.no_grad()
def test_the_harness_decode_loop_answers_alike_with_static_and_dynamic_caches(tiny, next_model, which):
    """The harness's own loop (``Generator``, static cache by default) over a padded batch gives the
    tokens and logits of the dynamic cache, which the tests above check against references."""
    from harness.generate import Generator

    loaded = next_model if "hired" in which else tiny
    inputs = shapes_inputs(loaded, 3)
    base = which.removeprefix("lazy_")
    spec = {"name": which} if which == base else {"name": which, "lazy": {"layers": [1, 3]}, base: {}}
    method = lazyattn.build(spec)
    runs = {}
    for kind in ("dynamic", "static"):
        gen = Generator(loaded.model, None, "cpu", min_new_tokens=4, cache=kind)
        logits, real = [], gen._forward

        def forward(*args, _real=real, _logits=logits, **kwargs):
            out = _real(*args, **kwargs)
            _logits.append(out.clone())
            return out

        gen._forward = forward
        with method.apply(loaded.model):
            dialogue, first = gen.prefill(inputs, reserve=4)
            tokens = gen._decode(dialogue, first, [4] * 3)
        runs[kind] = (tokens, logits)
    assert runs["static"][0] == runs["dynamic"][0]
    for a, b in zip(runs["static"][1], runs["dynamic"][1]):
        assert torch.allclose(a, b, atol=1e-4, rtol=0)


def test_per_sample_kv_bytes_do_not_count_the_padding_of_shorter_samples(tiny):
    """Plain PruMerge keeps different counts per sample (padded in a batch): each sample's workload
    KV bytes are the same in a batch as alone."""
    from harness.generate import Conversation, answer
    from harness.tasks import shapes

    samples = [Conversation.of_questions(s.id, s.questions, [3], [s.image(64)])
               for s in shapes.load_split("test", 4, ["colour"])]
    method = lazyattn.build({"name": "prumerge_plus", "plus": False})
    with method.apply(tiny.model):
        alone = [a.kv_bytes for a in answer(tiny.model, tiny.processor, samples, 1, "cpu")]
        batched = [a.kv_bytes for a in answer(tiny.model, tiny.processor, samples, 4, "cpu")]
    assert len({tuple(k) for k in alone}) > 1, "the samples must keep different counts for this to test anything"
    assert batched == alone
