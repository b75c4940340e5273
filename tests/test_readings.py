"""The other readings of Lazy Attention (share="qkv", scope="visual") and VTW, each against a
decoder forward written here from the methods' definitions (docs/methods.md): whole sequence, no
cache, float64, from the model's weights. Prefill, cached decode and a carried second turn, with
batches and left padding; nothing to do equals dense; KV bytes equal each formula."""

import pytest
import torch
from helpers import shapes_inputs
from test_multiturn import multiturn_task
from test_prune import kept_columns

from harness.generate import Generator, conversation
from lazyattn import VTW, FastV, LazyAttention, PruneEngine, choose_withdrawal_layer, compose, kv_cache_bytes
from lazyattn.arch import decoder_layers

LAYERS = [1, 3, 4, 7, 8, 9]  # anchors 0, 2, 5, 6, 10, 11: one anchor serves three lazy layers (7, 8, 9)
READINGS = {"qkv": {"share": "qkv"}, "visual": {"scope": "visual"}, "visual_scores": {"scope": "visual_scores"}, "qk": {}}


def _rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.double()


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _lin(x, linear):
    return x @ linear.weight.double().T


@torch.no_grad()
def reference_logits(model, ids, mask, pixels, positions, anchor_of=(), reading="qk", keep_from=None):
    """Logits (B, T, V) of the whole sequence ``ids`` computed layer by layer here.

    ``anchor_of`` (lazy layer -> anchor) with ``reading`` "qk" (P_anchor V_own), "qkv" (the
    anchor's attention output through the lazy layer's o_proj), "visual" (VLA: the image tokens'
    queries and keys are the anchor's, the text tokens' the layer's own; own values) or
    "visual_scores" (scores on image columns from the anchor's query and keys, on text columns
    the layer's own; one softmax; own values). ``keep_from=(k, cols)``: layers k.. attend only to the columns ``cols`` (B, T).
    """
    anchor_of = dict(anchor_of)
    lm = model.model.language_model
    captured = {}
    handle = lm.register_forward_pre_hook(lambda m, a, kw: captured.update(x=kw["inputs_embeds"]), with_kwargs=True)
    try:
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions)
    finally:
        handle.remove()
    x = captured["x"].double()
    cfg = model.config.text_config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    groups = n_heads // n_kv
    b, t, _ = x.shape
    cos, sin = (c.double().unsqueeze(1) for c in lm.rotary_emb(x, positions))
    image = ids == model.config.image_token_id
    base = torch.ones(t, t, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]  # (B, T, T)
    own = {}
    for idx, layer in enumerate(lm.layers):
        attn = layer.self_attn
        d = attn.head_dim
        h = _rms(x, layer.input_layernorm)
        q = _lin(h, attn.q_proj).view(b, t, n_heads, d).transpose(1, 2)
        k = _lin(h, attn.k_proj).view(b, t, n_kv, d).transpose(1, 2).repeat_interleave(groups, dim=1)
        v = _lin(h, attn.v_proj).view(b, t, n_kv, d).transpose(1, 2).repeat_interleave(groups, dim=1)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        allowed = base if keep_from is None or idx < keep_from[0] else base & keep_from[1][:, None, :]
        scores = q @ k.transpose(-1, -2) * d**-0.5
        anchor = anchor_of.get(idx)
        if anchor is not None and reading == "qk":
            scores = own[anchor]["scores"]
        elif anchor is not None and reading == "visual_scores":
            scores = torch.where(image[:, None, None, :], own[anchor]["scores"], scores)
        elif anchor is not None and reading == "visual":  # VLA: image rows and columns take the anchor's q and k
            q_mixed = torch.where(image[:, None, :, None], own[anchor]["q"], q)
            k_mixed = torch.where(image[:, None, :, None], own[anchor]["k"], k)
            scores = q_mixed @ k_mixed.transpose(-1, -2) * d**-0.5
        probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
        out = (probs @ v).transpose(1, 2).reshape(b, t, -1)
        if anchor is not None and reading == "qkv":
            out = own[anchor]["out"]
        if anchor is None:
            own[idx] = {"scores": scores, "out": out, "q": q, "k": k}
        x = x + _lin(out, attn.o_proj)
        h = _rms(x, layer.post_attention_layernorm)
        mlp = layer.mlp
        x = x + _lin(mlp.act_fn(_lin(h, mlp.gate_proj)) * _lin(h, mlp.up_proj), mlp.down_proj)
    x = _rms(x, lm.norm)
    return _lin(x, model.lm_head)


def padded_inputs(tiny):
    """Six left-padded first-turn prompts (they differ in length)."""
    inputs = shapes_inputs(tiny, n=6)
    assert (inputs["attention_mask"] == 0).any(), "the batch must be left padded"
    return inputs


def _positions(mask):
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def _method(reading, layers=LAYERS):
    return LazyAttention(layers=layers, **READINGS[reading])


@pytest.mark.parametrize("reading", ["qkv", "visual", "visual_scores", "qk"])
@torch.no_grad()
def test_prefill_equals_the_hand_written_forward(tiny, reading):
    inputs = padded_inputs(tiny)
    method = _method(reading)
    positions = _positions(inputs["attention_mask"])
    with method.apply(tiny.model):
        got = tiny.model(**inputs, position_ids=positions).logits.double()
        uncached = tiny.model(**inputs, position_ids=positions, use_cache=False).logits.double()
    ref = reference_logits(tiny.model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                           positions, method.anchors(tiny.n_layers), reading)
    dense = tiny.model(**inputs, position_ids=positions).logits.double()
    real = inputs["attention_mask"].bool()
    assert (got[real] - dense[real]).abs().max() > 1e-2, "the reading must change the model"
    assert torch.allclose(got[real], ref[real], atol=1e-4, rtol=1e-4), (got[real] - ref[real]).abs().max()
    assert torch.allclose(uncached[real], ref[real], atol=1e-4, rtol=1e-4)  # no cache: its own path


def _generate(model, inputs, n_new):
    image_id = model.config.image_token_id
    out = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                         suppress_tokens=[image_id], return_dict_in_generate=True, output_scores=True)
    return out, torch.stack(out.scores, dim=1).double()


def _decode_reference(tiny, inputs, out, n_new, **plan):
    seq = out.sequences
    mask = torch.cat([inputs["attention_mask"], torch.ones(seq.shape[0], n_new, dtype=torch.long)], dim=1)
    ref = reference_logits(tiny.model, seq, mask, inputs["pixel_values"], _positions(mask), **plan)
    return ref[:, inputs["input_ids"].shape[1] - 1 : -1]


def _comparable(tiny, *logits):
    blocked = [tiny.model.config.image_token_id, tiny.processor.tokenizer.eos_token_id]  # set to -inf by generate
    for x in logits:
        x[..., blocked] = 0.0
    return logits


@pytest.mark.parametrize("reading", ["qkv", "visual", "visual_scores"])
@torch.no_grad()
def test_cached_decode_equals_the_hand_written_forward(tiny, reading):
    inputs = padded_inputs(tiny)
    method = _method(reading)
    with method.apply(tiny.model):
        out, steps = _generate(tiny.model, inputs, 5)
    ref = _decode_reference(tiny, inputs, out, 5, anchor_of=method.anchors(tiny.n_layers), reading=reading)
    steps, ref = _comparable(tiny, steps, ref)
    assert torch.allclose(steps, ref, atol=1e-4, rtol=1e-4), (steps - ref).abs().max()


@pytest.mark.parametrize("k", [3, 7])
@torch.no_grad()
def test_vtw_prefill_and_decode_equal_the_hand_written_forward(tiny, k):
    inputs = padded_inputs(tiny)
    with VTW(k=k).apply(tiny.model):
        out, steps = _generate(tiny.model, inputs, 5)
    seq = out.sequences
    text = seq != tiny.model.config.image_token_id
    ref = _decode_reference(tiny, inputs, out, 5, keep_from=(k, text))
    steps, ref = _comparable(tiny, steps, ref)
    assert torch.allclose(steps, ref, atol=1e-4, rtol=1e-4), (steps - ref).abs().max()


@torch.no_grad()
def test_lazy_vtw_and_lazy_qkv_fastv_equal_the_hand_written_forward(tiny):
    inputs = padded_inputs(tiny)
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)  # a plain forward's positions
    real = mask.bool()
    lazy = LazyAttention(layers=[1, 3, 4, 8, 9], share="qkv")
    anchors = lazy.anchors(tiny.n_layers)

    with compose(lazy, VTW(k=6)).apply(tiny.model):
        got = tiny.model(**inputs).logits.double()
    text = ids != tiny.model.config.image_token_id
    ref = reference_logits(tiny.model, ids, mask, pixels, positions, anchors, "qkv", keep_from=(6, text))
    # from layer 6 on only the text tokens are computed: their rows are the logits
    ref, real = ref[text].view(ids.shape[0], -1, ref.shape[-1]), real[text].view(ids.shape[0], -1)
    assert got.shape == ref.shape
    assert torch.allclose(got[real], ref[real], atol=1e-4, rtol=1e-4), (got[real] - ref[real]).abs().max()

    engine = PruneEngine(tiny.model, FastV(k=2, ratio=0.5), anchors, share="qkv")
    with engine.install():
        got = tiny.model(**inputs).logits.double()
        keep = kept_columns(engine.stages[0], ids.shape[1])
    ref = reference_logits(tiny.model, ids, mask, pixels, positions, anchors, "qkv", keep_from=(2, keep))
    # from layer 2 on only the kept tokens are computed: compare the last prompt token's logits
    assert torch.allclose(got[:, -1], ref[:, -1], atol=1e-4, rtol=1e-4), (got[:, -1] - ref[:, -1]).abs().max()


@pytest.mark.parametrize("kind", ["qkv", "visual", "visual_scores", "vtw"])
@torch.no_grad()
def test_carried_second_turn_equals_the_hand_written_forward(tiny, kind):
    model, processor = tiny.model, tiny.processor
    sample = next(s for s in multiturn_task().samples(10) if len(s.questions) == 2)
    method = VTW(k=5) if kind == "vtw" else _method(kind)
    gen = Generator(model, processor, "cpu")
    fed = []
    forward = gen._forward
    gen._forward = lambda dialogue, ids, mask, **extra: fed.append(ids) or forward(dialogue, ids, mask, **extra)
    with method.apply(model):
        dialogue, (first,) = gen.first_turn([conversation(sample.questions[:1], [])], [sample.image(64)], [4])
        answer = gen.text(first)
        continuation = gen.continuation(dialogue, 0, sample.questions, [answer], first)
        ids = torch.tensor([continuation])
        carried = gen._forward(dialogue, ids, torch.ones_like(ids)).double()
    full = torch.cat(fed, dim=1)
    mask = torch.ones_like(full)
    pixels = processor.image_processor(images=[sample.image(64)], return_tensors="pt")["pixel_values"]
    if kind == "vtw":
        plan = {"keep_from": (5, full != model.config.image_token_id)}
    else:
        plan = {"anchor_of": method.anchors(tiny.n_layers), "reading": kind}
    ref = reference_logits(model, full, mask, pixels, _positions(mask), **plan)[:, -1]
    assert torch.allclose(carried, ref, atol=1e-4, rtol=1e-4), (carried - ref).abs().max()


@torch.no_grad()
def test_nothing_to_do_equals_dense(tiny):
    inputs = padded_inputs(tiny)
    dense = tiny.model(**inputs).logits
    nothing = [LazyAttention(layers=[], share="qkv"), LazyAttention(layers=[], scope="visual"),
               LazyAttention(layers=[], scope="visual_scores"),
               LazyAttention(ratio=0.0, share="qkv"), VTW(k=tiny.n_layers),
               compose(LazyAttention(layers=[], share="qkv"), VTW(k=tiny.n_layers))]
    for method in nothing:
        with method.apply(tiny.model):
            out = tiny.model(**inputs).logits
        assert torch.allclose(out, dense, atol=1e-6, rtol=0), method


@pytest.mark.parametrize("layers", [[1], [2, 3, 5, 9], list(range(1, 12))])
@torch.no_grad()
def test_kv_bytes_equal_each_formula(tiny, layers):
    inputs = padded_inputs(tiny)
    model = tiny.model
    cfg = model.config.text_config
    n, batch = tiny.n_layers, inputs["input_ids"].shape[0]
    n_image = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    seq = inputs["input_ids"].shape[1] + 4 - 1  # 4 new tokens; the last is sampled, not cached
    per_token = batch * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4  # K or V, fp32

    def kv(method):
        with method.apply(model):
            out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                 return_dict_in_generate=True)
        return kv_cache_bytes(out.past_key_values), out.past_key_values

    dense = 2 * n * seq * per_token
    assert kv(LazyAttention(layers=[]))[0] == dense
    qkv, cache = kv(LazyAttention(layers=layers, share="qkv"))
    assert qkv == dense * (n - len(layers)) // n  # n_lazy / n_layers of the cache
    assert all(cache.layers[i].keys is None and cache.layers[i].values is None for i in layers)
    for scope in ("visual", "visual_scores"):
        visual, cache = kv(LazyAttention(layers=layers, scope=scope))
        assert visual == dense - len(layers) * n_image * per_token  # the image keys of every lazy layer
    assert all(cache.layers[i].keys.shape[-2] == seq - n_image for i in layers)
    k = 12 - len(layers)  # VTW from a layer as deep as the lazy layers are many
    vtw = kv(VTW(k=k))[0]
    assert vtw == dense - (n - k) * n_image * 2 * per_token
    both = kv(compose(LazyAttention(layers=[x for x in layers if x != k], share="qkv"), VTW(k=k)))[0]
    n_lazy = len([x for x in layers if x != k])
    lazy_after = len([x for x in layers if x != k and x > k])
    assert both == (n - n_lazy) * 2 * seq * per_token - (n - k - lazy_after) * n_image * 2 * per_token


def test_withdrawal_layer_choice():  # the harness's earlier rule, now method.rule=suffix
    kl = [3.0, 1.0, 0.04, 0.2, 0.03, 0.01, 0.0]  # k = 1 .. 7
    assert choose_withdrawal_layer(kl, 0.05, rule="suffix") == 5  # k=3 is within, but k=4 is not: the choice is 5
    assert choose_withdrawal_layer(kl, 0.5, rule="suffix") == 3
    assert choose_withdrawal_layer(kl, 0.0, rule="suffix") == 7  # nothing withdrawn
    assert choose_withdrawal_layer(kl, 10, rule="suffix") == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: LazyAttention(ratio=0.5, share="v"), "share must be one of ['qk', 'qkv']"),
        (lambda: LazyAttention(ratio=0.5, scope="text"), "scope must be one of ['all', 'visual', 'visual_scores']"),
        (lambda: LazyAttention(ratio=0.5, share="qkv", scope="visual"), "has no scope='visual' reading"),
        (lambda: VTW(k=0), "VTW k must be an integer >= 1"),
        (lambda: compose(LazyAttention(ratio=0.5, scope="visual"), FastV()), "cannot be composed with token pruning"),
    ],
)
def test_bad_readings_are_refused_in_one_line(make, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")) as err:
        make()
    assert "\n" not in str(err.value)


def test_vtw_out_of_range(tiny):
    with pytest.raises(ValueError, match="VTW k=13 is out of range: this model has 12 decoder layers"):
        with VTW(k=13).apply(tiny.model):
            pass
    assert not any("forward" in vars(layer) for layer in decoder_layers(tiny.model))


@pytest.mark.parametrize("kind", ["qkv", "visual", "visual_scores", "vtw"])
@torch.no_grad()
def test_batched_carried_second_turn_equals_the_hand_written_forward(tiny, kind):
    """Three left-padded conversations answered from one carried cache: the logits of the second
    turn's first answer token equal the hand-written forward over each whole conversation so far
    (every chunk the model was fed, with the masks and positions it was fed them with)."""
    model, processor = tiny.model, tiny.processor
    samples = [s for s in multiturn_task().samples(12) if len(s.questions) == 2][:3]
    method = VTW(k=5) if kind == "vtw" else _method(kind)
    calls = []

    def record(module, args, kwargs, output):
        calls.append({k: kwargs[k] for k in ("input_ids", "attention_mask", "position_ids")} | {"logits": output.logits.clone()})  # decoding edits them

    gen = Generator(model, processor, "cpu")
    handle = model.register_forward_hook(record, with_kwargs=True)
    try:
        with method.apply(model):
            dialogue, firsts = gen.first_turn([conversation(s.questions[:1], []) for s in samples],
                                              [s.image(64) for s in samples], [4] * len(samples))
            n_first = len(calls)
            continuations = [gen.continuation(dialogue, i, s.questions, [gen.text(f)], f)
                             for i, (s, f) in enumerate(zip(samples, firsts))]
            gen.next_turn(dialogue, continuations, [2] * len(samples))
    finally:
        handle.remove()
    fed = calls[: n_first + 1]  # turn 1 (prefill and decode steps) and turn 2's continuation chunk
    assert (fed[0]["attention_mask"] == 0).any(), "turn 1 must be left padded"
    ids = torch.cat([c["input_ids"] for c in fed], dim=1)
    mask = fed[-1]["attention_mask"]
    positions = torch.cat([c["position_ids"] for c in fed], dim=1)
    assert mask.shape == ids.shape
    pixels = processor.image_processor(images=[s.image(64) for s in samples], return_tensors="pt")["pixel_values"]
    if kind == "vtw":
        plan = {"keep_from": (5, ids != model.config.image_token_id)}
    else:
        plan = {"anchor_of": method.anchors(tiny.n_layers), "reading": kind}
    ref = reference_logits(model, ids, mask, pixels, positions, **plan)[:, -1]
    carried = fed[-1]["logits"][:, -1].double()
    assert torch.allclose(carried, ref, atol=1e-4, rtol=1e-4), (carried - ref).abs().max()
