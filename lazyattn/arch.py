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

# Attention classes whose forward is: q/k/v projections, rotary embedding on q and k,
# cache update, attention interface, o_proj. Qwen2 and the Qwen2-VL / Qwen2.5-VL text
# attentions add q/k/v biases, which the projections carry themselves. The two VL classes
# use M-RoPE, but their rotary embedding module already merges the temporal/height/width
# frequencies (mrope_section) into one (batch, seq, head_dim) cos/sin pair, so the attention
# applies the plain rotary formula (checked per call in `_plain_rotary`); they also pass
# position_ids on to the attention backend, which the lazy forwards forward in **kwargs.
SUPPORTED_ATTENTION = (
    "LlamaAttention",
    "MistralAttention",
    "Qwen2Attention",
    "Qwen2VLAttention",
    "Qwen2_5_VLAttention",
)


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class AttentionFamily:
    rotary: Callable  # (q, k, cos, sin) -> (q, k), after the projections
    eager: Callable  # the family's own eager attention, used when no backend is registered

    def interface(self, module: nn.Module) -> Callable:
        # imported here: transformers.modeling_utils takes seconds to import, and a command line
        # that is refused should not wait for it
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

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
            "(the text backbones of LLaVA-1.5, LLaVA-NeXT, LLaVA with Qwen2/Mistral, Qwen2-VL and Qwen2.5-VL)."
        )
    modeling = sys.modules[type(attn).__module__]
    return AttentionFamily(
        rotary=_plain_rotary(name, modeling.apply_rotary_pos_emb), eager=modeling.eager_attention_forward
    )


def sliding_window(attn: nn.Module) -> int | None:
    """The window a layer's attention is limited to, or None when no position can reach it.

    Qwen2 keeps the window on the module (None for full-attention layers, and for every layer
    under ``use_sliding_window=False``), Mistral on the config. A window at least as long as the
    model's maximum positions (``max_position_embeddings``) limits nothing: it is full attention.
    """
    window = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))
    if window is None or getattr(attn.config, "use_sliding_window", True) is False:
        return None
    most = getattr(attn.config, "max_position_embeddings", None)
    return None if most is not None and window >= most else int(window)


def check_windows(modules, anchor_of: dict[int, int]) -> None:
    """A lazy layer sees its anchor's keys, so the two must attend over the same window."""
    for lazy, anchor in sorted(anchor_of.items()):
        own, theirs = sliding_window(modules[lazy]), sliding_window(modules[anchor])
        if own != theirs:
            raise UnsupportedModelError(
                f"lazy layer {lazy} attends over {'all keys' if own is None else f'a window of {own}'} but its anchor "
                f"{anchor} over {'all keys' if theirs is None else f'a window of {theirs}'}: a lazy layer and its "
                "anchor must share one window; choose lazy layers whose anchors have the same layer type."
            )


def _plain_rotary(name: str, apply_rotary: Callable) -> Callable:
    """The family's own ``apply_rotary_pos_emb``, refusing cos/sin it would broadcast wrongly.

    Every supported class receives one (batch, seq, head_dim) cos/sin pair; for M-RoPE models the
    rotary module has already taken each frequency band from its temporal/height/width position.
    Per-axis (3, batch, seq, head_dim) tables would need the mrope_section split here instead.
    """

    def rotary(query, key, cos, sin):
        if cos.dim() != query.dim() - 1 or cos.shape[-1] != query.shape[-1]:
            raise UnsupportedModelError(
                f"{name} passed rotary tables of shape {tuple(cos.shape)} for queries of shape "
                f"{tuple(query.shape)}; Lazy Attention expects (batch, seq, head_dim) tables with any M-RoPE "
                "sections already merged (transformers 5.23-5.24)."
            )
        return apply_rotary(query, key, cos, sin)

    return rotary


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, checked to be of a supported family."""
    modules = [layer.self_attn for layer in decoder_layers(model)]
    for attn in modules:
        attention_family(attn)
    return modules


def image_token_id(model: nn.Module) -> int:
    config = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(model).__name__} has no image_token_id in its config: token pruning and scope='visual' need one.")
