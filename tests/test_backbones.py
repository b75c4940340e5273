"""Lazy Attention on each supported text backbone family (Llama, Mistral, Qwen2 with q/k/v biases)."""

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lazyattn import LazyAttention, kv_cache_bytes

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=128)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": False}),
}


@pytest.fixture(params=sorted(FAMILIES))
def causal_lm(request):
    config_cls, model_cls, extra = FAMILIES[request.param]
    torch.manual_seed(0)
    model = model_cls._from_config(config_cls(**SMALL, **extra), attn_implementation="sdpa").eval()
    if request.param == "qwen2":  # biases start at zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model


@torch.no_grad()
def test_family(causal_lm):
    ids = torch.randint(1, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row
    dense = causal_lm(input_ids=ids, attention_mask=mask).logits
    with LazyAttention(layers=[]).apply(causal_lm):
        assert torch.allclose(causal_lm(input_ids=ids, attention_mask=mask).logits, dense, atol=1e-6, rtol=0)
    dense_gen = causal_lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                                   do_sample=False, return_dict_in_generate=True)
    with LazyAttention(layers=[2, 3, 5]).apply(causal_lm):
        lazy_logits = causal_lm(input_ids=ids, attention_mask=mask).logits
        out = causal_lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                                 do_sample=False, return_dict_in_generate=True)
        full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], dim=1)
        full = causal_lm(input_ids=out.sequences, attention_mask=full_mask).logits
    assert (lazy_logits - dense).abs().max() > 1e-3
    assert torch.equal(full[:, ids.shape[1] - 1 : -1].argmax(-1), out.sequences[:, ids.shape[1]:])
    dense_bytes, lazy_bytes = kv_cache_bytes(dense_gen.past_key_values), kv_cache_bytes(out.past_key_values)
    assert lazy_bytes * 12 == dense_bytes * (12 - 3)
