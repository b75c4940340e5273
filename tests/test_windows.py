"""Sliding windows: a window no position can reach is full attention; a window the run's sequences
stay within works, with the anchor and its lazy layers sharing it; a sequence that outgrows it is
refused in one line; mixed windows between a lazy layer and its anchor are refused at install."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration, MistralConfig, Qwen2Config

import lazyattn
from harness.generate import Generator
from harness.models import families
from helpers import shapes_inputs
from lazyattn.arch import UnsupportedModelError, sliding_window

TEXT = {**families.TINY_TEXT, "max_positions": 512}


def _llava(backbone: str, **window) -> families.Loaded:
    """The tiny LLaVA of ``backbone`` with its text config's window settings replaced."""
    base = families.build_random("llava", {**TEXT, "backbone": backbone}, families.TINY_CLIP, initializer_range=0.2)
    config = base.model.config
    cls = MistralConfig if backbone == "mistral" else Qwen2Config
    config.text_config = cls(**{**config.text_config.to_dict(), **window})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    model.load_state_dict(base.model.state_dict())
    families.set_generation_ids(model, base.processor.tokenizer)
    return families.Loaded(model=model.eval(), processor=base.processor, name="windowed", random_weights=True)


@torch.inference_mode()
def _answers(loaded, method, steps=4):
    inputs = shapes_inputs(loaded, n=2)
    gen = Generator(loaded.model, None, "cpu", min_new_tokens=steps)
    with method.apply(loaded.model):
        dialogue, logits = gen.prefill(inputs, reserve=steps)
        first = logits.clone()
        return first, gen._decode(dialogue, logits, [steps, steps])


def test_default_configs_are_accepted():
    qwen = _llava("qwen2", sliding_window=4096, use_sliding_window=False)  # Qwen2Config's own defaults
    assert all(sliding_window(layer.self_attn) is None for layer in qwen.model.model.language_model.layers)
    mistral = _llava("mistral", sliding_window=4096)  # MistralConfig's default window, above max positions (512)
    assert all(sliding_window(layer.self_attn) is None for layer in mistral.model.model.language_model.layers)
    for loaded in (qwen, mistral):
        for spec in ({"name": "lazy", "layers": [1, 3]}, {"name": "fastv", "k": 1, "ratio": 0.5}):
            _answers(loaded, lazyattn.build(spec))


@pytest.mark.parametrize("spec", [{"name": "lazy", "layers": [1, 3]}, {"name": "lazy", "layers": [2, 3], "share": "qkv"},
                                  {"name": "fastv", "k": 1, "ratio": 0.5}])
def test_a_window_the_sequences_stay_within_changes_nothing(spec):
    full = _llava("mistral", sliding_window=None)
    windowed = _llava("mistral", sliding_window=256)  # reachable in principle (max positions 512), not by these prompts
    assert sliding_window(windowed.model.model.language_model.layers[0].self_attn) == 256
    method = lazyattn.build(spec)
    (a_logits, a), (b_logits, b) = _answers(full, method), _answers(windowed, method)
    assert a == b
    torch.testing.assert_close(a_logits, b_logits)


@pytest.mark.parametrize("spec, message", [
    ({"name": "lazy", "layers": [1, 3]}, "outgrew the sliding window of 24 tokens"),
    ({"name": "fastv", "k": 1, "ratio": 0.5}, "outgrew the model's sliding window of 24 tokens"),
])
def test_a_sequence_that_outgrows_the_window_is_refused(spec, message):
    windowed = _llava("mistral", sliding_window=24)
    with pytest.raises(ValueError, match=message):
        _answers(windowed, lazyattn.build(spec), steps=2)


def test_mixed_windows_between_a_lazy_layer_and_its_anchor_are_refused():
    loaded = _llava("qwen2", use_sliding_window=True, sliding_window=256, max_window_layers=2,
                    layer_types=["full_attention"] * 2 + ["sliding_attention"] * 2)
    layers = loaded.model.model.language_model.layers
    assert sliding_window(layers[1].self_attn) is None and sliding_window(layers[2].self_attn) == 256
    with pytest.raises(UnsupportedModelError, match="lazy layer 2 attends over a window of 256 but its anchor 1"):
        with lazyattn.build({"name": "lazy", "layers": [2]}).apply(loaded.model):
            pass
    _answers(loaded, lazyattn.build({"name": "lazy", "layers": [3]}))  # anchor 2 and lazy 3 share the window
