"""Where a model keeps its decoder layers, and which attention families the methods know.

Methods rewrite one attention module's forward; they need the family's rotary embedding and
its eager fallback, both taken from the module's own modeling file so that nothing is copied
out of transformers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# Attention classes whose forward is: q/k/v projections, rotary embedding on q and k,
# cache update, attention interface, o_proj. Qwen2 adds q/k/v biases, which the
# projections carry themselves.
SUPPORTED_ATTENTION = ("LlamaAttention", "MistralAttention", "Qwen2Attention")


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class AttentionFamily:
    rotary: Callable  # (q, k, cos, sin) -> (q, k), after the projections
    eager: Callable  # the family's own eager attention, used when no backend is registered

    def interface(self, module: nn.Module) -> Callable:
        return ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, self.eager)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM or of the language model inside an MLLM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"Cannot find the decoder layers of {type(model).__name__}: expected model.get_decoder().layers. "
            f"Supported text backbones: {', '.join(SUPPORTED_ATTENTION)}."
        )
    return layers


def attention_family(attn: nn.Module) -> AttentionFamily:
    name = type(attn).__name__
    if name not in SUPPORTED_ATTENTION:
        raise UnsupportedModelError(
            f"Attention class {name} is not supported. Supported: {', '.join(SUPPORTED_ATTENTION)} "
            "(the Llama-family backbones used by LLaVA-1.5, LLaVA-NeXT and Qwen2 text models)."
        )
    modeling = sys.modules[type(attn).__module__]
    return AttentionFamily(rotary=modeling.apply_rotary_pos_emb, eager=modeling.eager_attention_forward)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, checked to be of a supported family."""
    modules = [layer.self_attn for layer in decoder_layers(model)]
    for attn in modules:
        attention_family(attn)
    return modules
