"""The preallocated KV cache, lazy layers inheriting their anchor's probabilities in decode, and the
bytes a decode step reads.

- ``Growing``: written in place within its storage, re-allocated (contents kept) only on overflow.
- ``cache=static`` answers exactly as ``cache=dynamic`` (transformers' concatenating cache) for
  dense and every method, on every family, and never copies a layer's storage while decoding.
- A ``share="qk"`` lazy layer that multiplies its anchor's probabilities by its own values (short
  queries: decode steps, short continuations) equals the recomputing path, on every family, padded
  batches, eager and sdpa, float32 and bfloat16 on CPU; and it reads no keys (``kv_read_bytes``).
"""

import pytest
import torch
from transformers import DynamicCache

import lazyattn
from harness import generate
from harness.generate import Generator
from harness.models import families
from harness.tasks import shapes
from harness.generate import conversation, prompt_inputs
from lazyattn import attention
from lazyattn.cache import (ConcatenatingCache, Growing, NoKVLayer, PreallocatedCache, PreallocatedLayer,
                            ValueOnlyLayer, kv_cache_bytes, kv_read_bytes, kv_read_terms, new_cache)

STEPS = 4
METHODS = {
    "dense": {"name": "dense"},
    "lazy": {"name": "lazy", "layers": [1, 3]},
    "lazy_two": {"name": "lazy", "layers": [2, 3]},  # one anchor, two dependants
    "lazy_qkv": {"name": "lazy", "layers": [1, 3], "share": "qkv"},
    "lazy_visual": {"name": "lazy", "layers": [1, 3], "scope": "visual"},
    "fastv": {"name": "fastv", "k": 1, "ratio": 0.5},
    "vtw": {"name": "vtw", "k": 2},
    "lazy_fastv": {"name": "lazy_fastv", "lazy": {"layers": [3]}, "fastv": {"k": 1, "ratio": 0.5}},
}
# more pruners for the compiled-decode test (PruMerge+ is defined for LLaVA-1.5 only)
MORE_PRUNERS = {"sparsevlm": {"name": "sparsevlm", "budget": 64}, "prumerge_plus": {"name": "prumerge_plus"}}


def test_growing_writes_in_place_and_grows_once_on_overflow():
    g = Growing(-2, reserve=3)
    first = torch.randn(2, 4, 5, 8)
    view = g.append(first)
    ptr, capacity = g.storage.data_ptr(), g.storage.shape[-2]
    assert capacity == 5 + 3 and torch.equal(view, first)
    steps = [torch.randn(2, 4, 1, 8) for _ in range(3)]
    for s in steps:
        view = g.append(s)
        assert g.storage.data_ptr() == ptr  # within the reserve: no copy of what is held
    assert torch.equal(view, torch.cat([first, *steps], dim=-2))
    more = torch.randn(2, 4, 2, 8)
    view = g.append(more)  # overflow: one re-allocation, contents kept
    assert g.storage.data_ptr() != ptr and torch.equal(view, torch.cat([first, *steps, more], dim=-2))
    g.apply(lambda t: t[[1]])
    assert torch.equal(g.view, torch.cat([first, *steps, more], dim=-2)[[1]])
    dynamic = Growing(-2, reserve=None)
    assert torch.equal(dynamic.append(first), first) and dynamic.storage is None


def test_cache_kinds_and_bad_kind():
    config = families.build_random("llava", {**families.TINY_TEXT, "backbone": "llama"}, families.TINY_CLIP).model.config
    static = new_cache("static", config, 7)
    assert isinstance(static, PreallocatedCache) and all(type(x) is PreallocatedLayer for x in static.layers)
    dynamic = new_cache("dynamic", config, 7)  # transformers' own, answering what the decode loop asks
    assert static.reserve == 7 and type(dynamic) is ConcatenatingCache and isinstance(dynamic, DynamicCache)
    assert dynamic.reserve is None and not dynamic.graph
    assert dynamic.graph_blocker() == "transformers' concatenating cache (cache=dynamic)"
    with pytest.raises(ValueError, match="cache must be one of"):
        new_cache("paged", config, 7)


@pytest.fixture(scope="module")
def models():
    out = {}
    for name, (family, text, vision) in families.TINY_SHAPES.items():
        out[name] = families.build_random(family, text, vision, initializer_range=0.2)
    return out


def _inputs(loaded, padded: bool, image_size: int):
    samples = shapes.load_split("test", 2)
    questions = [samples[0].questions[0], samples[1].questions[0] + (" a red circle" if padded else "")]
    histories = [conversation([q], []) for q in questions] if padded else [conversation([questions[0]], [])] * 2
    return prompt_inputs(loaded.processor, histories, [s.image(image_size) for s in samples], "cpu", loaded.model.dtype)


@torch.inference_mode()
def _run(model, inputs, method, cache, steps=STEPS):
    """Greedy tokens of the harness's decode loop and the logits of every forward."""
    gen = Generator(model, None, "cpu", min_new_tokens=steps, cache=cache)
    logits, real = [], gen._forward

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        logits.append(out.clone())
        return out

    gen._forward = forward
    with method.apply(model):
        dialogue, first = gen.prefill(inputs, reserve=steps)
        tokens = gen._decode(dialogue, first, [steps] * inputs["input_ids"].shape[0])
    return tokens, torch.stack(logits), dialogue


def _image_size(family):
    return 64 if family.startswith("qwen") else 32


@pytest.mark.parametrize("family", list(families.TINY_SHAPES))
def test_static_cache_answers_as_the_dynamic_one(models, family):
    loaded = models[family]
    padded = not family.startswith("qwen")  # M-RoPE models place their own tokens: unpadded prompts
    inputs = _inputs(loaded, padded, _image_size(family))
    for name, spec in METHODS.items():
        method = lazyattn.build(spec)
        t_dyn, l_dyn, _ = _run(loaded.model, inputs, method, "dynamic")
        t_sta, l_sta, d = _run(loaded.model, inputs, method, "static")
        assert t_sta == t_dyn, (family, name)
        torch.testing.assert_close(l_sta, l_dyn, rtol=1e-5, atol=1e-5, msg=f"{family} {name}")
        assert type(d.cache).__name__ == "PreallocatedCache"


def test_compiled_decode_on_the_dynamic_cache_runs_eagerly_and_says_why(models):
    """``compile=True`` with ``cache=dynamic``: the cache says it cannot run as a graph, so every step
    runs eagerly (the same tokens as without compile) and the generator records why."""
    loaded = models["llava_llama"]
    inputs = _inputs(loaded, True, 32)
    with torch.inference_mode():
        eager = Generator(loaded.model, None, "cpu", min_new_tokens=3, cache="dynamic").answer_inputs(inputs, [3, 3])[1]
        gen = Generator(loaded.model, None, "cpu", min_new_tokens=3, cache="dynamic", compile=True)
        assert gen.answer_inputs(inputs, [3, 3])[1] == eager
    assert gen.graph_note == "decode ran eagerly: transformers' concatenating cache (cache=dynamic)"


def test_static_cache_never_copies_while_decoding(models):
    loaded = models["llava_llama"]
    inputs = _inputs(loaded, True, 32)
    method = lazyattn.build(METHODS["lazy"])
    gen = Generator(loaded.model, None, "cpu", min_new_tokens=STEPS, cache="static")
    pointers = []

    def on_step(dialogue):
        pointers.append([g.storage.data_ptr() for layer in dialogue.cache.layers for g in layer._grow.values()])

    with method.apply(loaded.model):
        dialogue, first = gen.prefill(inputs, reserve=STEPS)
        gen._decode(dialogue, first, [STEPS] * 2, on_step=on_step)
    assert len(pointers) == STEPS - 1 and all(p == pointers[0] for p in pointers)
    assert {type(x) for x in dialogue.cache.layers} == {PreallocatedLayer, ValueOnlyLayer}


@pytest.mark.parametrize("family", list(families.TINY_SHAPES))
@pytest.mark.parametrize("impl, dtype", [("sdpa", torch.float32), ("eager", torch.float32), ("sdpa", torch.bfloat16)])
def test_inheriting_probabilities_equals_recomputing(models, family, impl, dtype, monkeypatch):
    loaded = models[family]
    model = loaded.model.to(dtype)
    model.config._attn_implementation = impl
    for sub in (model.config.get_text_config(decoder=True), getattr(model.config, "vision_config", None)):
        if sub is not None:
            sub._attn_implementation = impl
    try:
        padded = not family.startswith("qwen")
        inputs = _inputs(loaded, padded, _image_size(family))
        for name in ("lazy", "lazy_two", "lazy_fastv"):
            method = lazyattn.build(METHODS[name])
            t_inh, l_inh, d = _run(model, inputs, method, "static")
            slots = [layer for layer in d.cache.layers if isinstance(layer, ValueOnlyLayer)]
            anchor_keys = d.cache.layers[0].keys
            assert slots and all(s.extra_reads["scores"] < anchor_keys.numel() * anchor_keys.element_size()
                                 for s in slots)
            with monkeypatch.context() as m:
                m.setattr(attention, "inherits", lambda module, q_len: False)
                t_rec, l_rec, d_rec = _run(model, inputs, method, "static")
            layers = d_rec.cache.layers
            lazy = {i for i, s in enumerate(layers) if isinstance(s, ValueOnlyLayer)}
            for i, anchor in lazyattn.anchors_of(lazy, len(layers)).items():  # recomputing re-reads the anchor's keys
                keys = layers[anchor].keys
                assert layers[i].extra_reads == {"keys": keys.numel() * keys.element_size()}
            tol = 1e-5 if dtype == torch.float32 else 5e-2  # the bfloat16 tolerance of gpu_check
            # the same inputs up to the first step where a greedy token differs (bfloat16 may flip a near-tie)
            same = next((k for k in range(STEPS) if any(a[k] != b[k] for a, b in zip(t_inh, t_rec))), STEPS - 1)
            scale = l_rec[: same + 1].abs().max()
            assert (l_inh[: same + 1] - l_rec[: same + 1]).abs().max() / scale <= tol, (family, impl, dtype, name)
            if dtype == torch.float32:
                assert t_inh == t_rec
    finally:
        model.to(torch.float32)
        model.config._attn_implementation = "sdpa"
        for sub in (model.config.get_text_config(decoder=True), getattr(model.config, "vision_config", None)):
            if sub is not None:
                sub._attn_implementation = "sdpa"


def test_short_continuation_inherits_and_equals_recomputing(models, monkeypatch):
    """A carried turn's left-padded continuation of a few tokens goes through the explicit path
    (causal and padding masks), a longer one through the backend; both equal recomputing."""
    loaded = models["llava_qwen2"]
    model = loaded.model
    inputs = _inputs(loaded, True, 32)
    method = lazyattn.build(METHODS["lazy_two"])
    text = model.config.get_text_config(decoder=True)
    limit = text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) // (2 * text.num_attention_heads)
    assert limit >= 2
    results = {}
    for label, patch in (("inherit", None), ("recompute", lambda module, q_len: False)):
        with monkeypatch.context() as m:
            if patch is not None:
                m.setattr(attention, "inherits", patch)
            gen = Generator(model, None, "cpu", min_new_tokens=2, cache="static")
            with method.apply(model):
                dialogue, first = gen.prefill(inputs, reserve=8)
                gen._decode(dialogue, first, [2, 2])
                out = []
                for width in (limit, limit + 3):  # within the threshold, then beyond it
                    ids = torch.full((2, width), 3, dtype=torch.long)
                    mask = torch.ones(2, width, dtype=torch.long)
                    mask[1, :1] = 0  # left padding in row 1
                    dialogue.holes = True
                    out.append(gen._forward(dialogue, ids, mask))
        results[label] = torch.stack(out)
    torch.testing.assert_close(results["inherit"], results["recompute"], rtol=1e-5, atol=1e-5)


def test_kv_read_bytes_per_reading(models):
    loaded = models["llava_llama"]
    inputs = _inputs(loaded, False, 32)
    reads = {}
    for name in ("dense", "lazy", "lazy_qkv", "lazy_visual"):
        _, _, d = _run(loaded.model, inputs, lazyattn.build(METHODS[name]), "static", steps=2)
        reads[name] = (kv_read_bytes(d.cache), kv_cache_bytes(d.cache), d.cache)
    read, held, cache = reads["dense"]
    assert read == held and kv_read_terms(cache)["scores"] == 0  # every key and value it holds; SDPA writes no score
    read, held, cache = reads["lazy"]
    tokens = cache.get_seq_length()
    probs = 2 * 4 * 1 * tokens * 4  # B x H x 1 x T floats: one layer's probabilities of a decode step
    # each lazy layer (1 and 3) reads its values and its anchor's probabilities; each anchor (0 and 2) wrote its
    # scores and read them back (softmax) and wrote its probabilities and read them back (times its values)
    lazy_reads = sum(s.extra_reads.get("scores", 0) for s in cache.layers if isinstance(s, ValueOnlyLayer))
    anchor_traffic = sum(cache.layers[i].extra_reads.get("scores", 0) for i in (0, 2))
    assert lazy_reads == 2 * probs and anchor_traffic == 2 * 4 * probs
    terms = kv_read_terms(cache)
    assert terms["scores"] == lazy_reads + anchor_traffic and read == held + terms["scores"]
    assert terms["keys"] + terms["values"] == held
    read, held, cache = reads["lazy_qkv"]
    assert read == held and sum(isinstance(s, NoKVLayer) for s in cache.layers) == 2  # qkv layers read nothing
    read, held, cache = reads["lazy_visual"]
    anchor = cache.layers[0].keys
    assert read == held + 2 * anchor.numel() * anchor.element_size()  # the anchor's keys again, for image columns


@pytest.mark.parametrize("family, name, backend", [
    # inductor's code generation once (a cold cache compiles for about 30 s: one method), the anchors' explicit
    # attention and its CPU matmuls included; every other method and family captured with aot_eager (the same one
    # static graph, run by ATen). One case a method, so the suite's workers share them out.
    ("llava_llama", "lazy", "inductor"),
    *[("llava_llama", name, "aot_eager")
      for name in ("dense", "lazy_visual", "fastv", "sparsevlm", "vtw", "prumerge_plus", "lazy_fastv")],
    ("qwen2_vl", "lazy", "aot_eager")])
def test_compiled_decode_is_one_static_graph_and_answers_as_eager(models, family, name, backend, monkeypatch):
    """``compile=True``: the decode step compiled with ``fullgraph=True, dynamic=False`` over the whole
    preallocated storage (a validity mask, writes at device cursors): one graph per method, captured
    at the first step and never recompiled or broken as the cache fills (16 more steps add none), on a
    left-padded batch with a budget per row; the tokens equal the eager loop's and the logits agree. A
    token pruner's stages too: each stage's layers attend over their own storage, masked on the device."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(generate, "COMPILE_BACKEND", backend)
    loaded = models[family]
    inputs = _inputs(loaded, True, _image_size(family))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        method = lazyattn.build({**METHODS, **MORE_PRUNERS}[name])
        eager = Generator(loaded.model, None, "cpu", min_new_tokens=20)
        with torch.inference_mode(), method.apply(loaded.model):
            eager_dialogue, eager_tokens = eager.answer_inputs(inputs, [20, 13])
        gen = Generator(loaded.model, None, "cpu", min_new_tokens=20, compile=True)
        graphs, logits, real = [], [], gen._forward

        def forward(*args, **kwargs):
            out = real(*args, **kwargs)
            logits.append(out.clone())
            return out

        gen._forward = forward
        counters.clear()
        with torch.inference_mode(), method.apply(loaded.model):
            dialogue, first = gen.prefill(inputs, reserve=20)
            tokens = gen._decode(dialogue, first, [20, 13],
                                 on_step=lambda d: graphs.append(counters["stats"]["unique_graphs"]))
        assert tokens == eager_tokens, (family, name)
        assert gen.graph_note is None and graphs[3] == graphs[-1] == 1 and len(graphs) == 19, (family, name, graphs)
        assert not counters["graph_break"], dict(counters["graph_break"])
        # the views caught up: as long as the eager cache (the prompt, or a reducer's shorter one, + 19 tokens)
        assert ([layer.get_seq_length() for layer in dialogue.cache.layers]
                == [layer.get_seq_length() for layer in eager_dialogue.cache.layers])
        if not dialogue.cache.pruned:
            assert dialogue.cache.get_seq_length() == inputs["input_ids"].shape[1] + 19
        eager_logits = _run(loaded.model, inputs, method, "static", steps=20)[1]
        scale = eager_logits[:13].abs().max()
        assert (torch.stack(logits)[:13] - eager_logits[:13]).abs().max() / scale < 1e-4, (family, name)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("family", ["llava_llama", "llava_qwen2", "qwen2_vl"])
def test_vla_decode_path_equals_the_mixed_key_path(models, family, monkeypatch):
    """VLA's decode steps score against the anchor's keys and its own text keys without building the
    mixed key tensor; they equal the prefill path's mixed keys through the backend."""
    loaded = models[family]
    inputs = _inputs(loaded, not family.startswith("qwen"), _image_size(family))
    method = lazyattn.build(METHODS["lazy_visual"])
    calls = []
    real = attention._vla_decode
    monkeypatch.setattr(attention, "_vla_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    t_fast, l_fast, _ = _run(loaded.model, inputs, method, "static")
    assert calls, "the decode path must have run"
    monkeypatch.setattr(attention, "inherits", lambda module, q_len: False)
    t_slow, l_slow, _ = _run(loaded.model, inputs, method, "static")
    assert t_fast == t_slow
    torch.testing.assert_close(l_fast, l_slow, rtol=1e-5, atol=1e-5)


def test_the_explicit_attention_control_answers_as_dense_and_prices_the_scores(models):
    """ExplicitDense (method dense_explicit): every layer's decode attention formed explicitly, as an
    anchor's is: the same tokens and logits as dense, and every layer's score traffic counted."""
    loaded = models["llava_llama"]
    inputs = _inputs(loaded, True, 32)
    t_dense, l_dense, _ = _run(loaded.model, inputs, lazyattn.build({"name": "dense"}), "static")
    t_exp, l_exp, d = _run(loaded.model, inputs, lazyattn.build({"name": "dense_explicit"}), "static")
    assert t_exp == t_dense
    torch.testing.assert_close(l_exp, l_dense, rtol=1e-5, atol=1e-5)
    tokens = d.cache.get_seq_length()
    probs = 2 * 4 * 1 * tokens * 4  # B x H x 1 x T floats
    assert [layer.extra_reads for layer in d.cache.layers] == [{"scores": 4 * probs}] * len(d.cache.layers)
