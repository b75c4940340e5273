"""Lazy Attention with a Q Cache (after arXiv 2602.01901; our definition, ../shared/METHODS.md §1).

Decoder layers are split into anchors and lazy layers; layer 0 is always an anchor and a lazy
layer's anchor is the nearest anchor before it. An anchor that has lazy dependants runs normal
attention and leaves its post-RoPE query and its (cached) keys in the Q Cache, one slot shared
by all layers and overwritten by the next anchor. A lazy layer computes only its value
projection and attends with ``Attn(Q_anchor, K_anchor, V_own)`` through the model's own
attention backend, with the same mask and scaling, so its attention probabilities are the
anchor's exactly. Its cache layer stores values only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from lazyattn.arch import AttentionFamily, attention_family, attention_modules
from lazyattn.cache import ValueOnlyLayer


def uniform_lazy_layers(n_layers: int, ratio: float) -> list[int]:
    """The deterministic rule behind ``LazyAttention(ratio=r)``.

    ``n_lazy = round(r * n_layers)`` (at most ``n_layers - 1``); the ``n_anchor`` remaining
    anchors sit at ``floor(i * n_layers / n_anchor)`` for ``i = 0 .. n_anchor - 1``, evenly spread
    from layer 0, and every other layer is lazy. For 12 layers at 0.5 the anchors are
    0, 2, 4, ..., 10; at 0.7 (8 lazy) they are 0, 3, 6, 9.
    """
    _check_ratio(ratio)
    n_lazy = min(int(round(ratio * n_layers)), n_layers - 1)
    n_anchor = n_layers - n_lazy
    anchors = {(i * n_layers) // n_anchor for i in range(n_anchor)}
    return [layer for layer in range(n_layers) if layer not in anchors]


def _check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0 and math.isfinite(ratio)):
        raise ValueError(f"ratio must be a number in [0, 1) (the fraction of lazy layers), got {ratio!r}.")


class QCache:
    """The layer-shared Q Cache: one slot holding an anchor's query and keys for this forward.

    It never grows with the sequence: the query covers only the current step's tokens and the
    keys are the anchor's own cache tensor (a reference, not a copy).
    """

    def __init__(self) -> None:
        self.anchor: int | None = None
        self.query: torch.Tensor | None = None
        self.key: torch.Tensor | None = None

    def put(self, anchor: int, query: torch.Tensor, key: torch.Tensor) -> None:
        self.anchor, self.query, self.key = anchor, query, key

    def get(self, anchor: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.anchor != anchor:
            raise RuntimeError(
                f"Q Cache holds layer {self.anchor}'s query but layer {anchor}'s was needed: "
                "decoder layers must run in order within one forward."
            )
        return self.query, self.key

    def clear(self) -> None:
        self.anchor = self.query = self.key = None


@dataclasses.dataclass
class LazyAttention:
    """Make some decoder layers lazy: ``layers`` (explicit indices) or ``ratio`` (uniform rule)."""

    layers: Sequence[int] | None = None
    ratio: float | None = None
    name = "lazy"

    def __post_init__(self) -> None:
        if (self.layers is None) == (self.ratio is None):
            raise ValueError("LazyAttention takes exactly one of layers=[...] (lazy layer indices) or ratio=r.")
        if self.ratio is not None:
            _check_ratio(self.ratio)
        if self.layers is not None:
            self.layers = list(self.layers)
            bad = [x for x in self.layers if isinstance(x, bool) or not isinstance(x, int)]
            if bad:
                raise ValueError(f"lazy layers must be integer layer indices, got {bad}.")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"lazy layers contain duplicates: {self.layers}; list each layer once.")
            if 0 in self.layers:
                raise ValueError("layer 0 cannot be lazy: it has no earlier layer to inherit attention from.")
            if any(x < 0 for x in self.layers):
                raise ValueError(f"lazy layer indices must be >= 1, got {sorted(self.layers)}.")

    def params(self) -> dict[str, Any]:
        return {"layers": None if self.layers is None else list(self.layers), "ratio": self.ratio}

    def lazy_layers(self, n_layers: int) -> list[int]:
        """The lazy layer indices for a model with ``n_layers`` decoder layers, validated."""
        if self.ratio is not None:
            return uniform_lazy_layers(n_layers, self.ratio)
        out_of_range = [x for x in self.layers if x >= n_layers]
        if out_of_range:
            raise ValueError(
                f"lazy layers {out_of_range} are out of range: this model has {n_layers} decoder layers "
                f"(valid lazy indices are 1..{n_layers - 1})."
            )
        return sorted(self.layers)

    def anchors(self, n_layers: int) -> dict[int, int]:
        """Map each lazy layer to its anchor (the nearest preceding non-lazy layer)."""
        lazy = set(self.lazy_layers(n_layers))
        anchor_of, current = {}, 0
        for layer in range(n_layers):
            if layer in lazy:
                anchor_of[layer] = current
            else:
                current = layer
        return anchor_of

    def plan(self, model: nn.Module) -> dict[int, int]:
        """The anchor of every lazy layer of ``model``, validated against its depth."""
        return self.anchors(len(attention_modules(model)))

    @contextlib.contextmanager
    def apply(self, model: nn.Module):
        with patch_attention(model, self.plan(model), {}):
            yield model


Observer = Callable[[nn.Module, torch.Tensor, torch.Tensor], None]


@contextlib.contextmanager
def patch_attention(model: nn.Module, anchor_of: dict[int, int], observers: dict[int, list[Observer]]):
    """Install lazy layers (``anchor_of``: lazy layer -> anchor) and attention observers.

    An observer of layer ``l`` is called as ``fn(module, query, key)`` with the post-RoPE query
    of the current tokens and all keys that layer attends with (for a lazy layer: its anchor's),
    which is how token-pruning methods score tokens without materialising an attention matrix.
    Every patched module gets a per-instance ``forward`` that is removed on exit.
    """
    modules = attention_modules(model)
    qcache = QCache()
    installed = []
    try:
        last_dependant = {anchor_idx: lazy_idx for lazy_idx, anchor_idx in sorted(anchor_of.items())}
        for idx, attn in enumerate(modules):
            family = attention_family(attn)
            watch = tuple(observers.get(idx, ()))
            if idx in anchor_of:
                anchor_idx = anchor_of[idx]
                last = last_dependant[anchor_idx] == idx
                attn.forward = _lazy_forward(attn, family, qcache, anchor_idx, last, watch)
            elif idx in last_dependant or watch:
                attn.forward = _anchor_forward(attn, family, qcache if idx in last_dependant else None, watch)
            else:
                continue
            installed.append(attn)
        yield model
    finally:
        for attn in installed:
            del attn.forward  # the instance attribute; the class's forward shows through again
        qcache.clear()


def _split_heads(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.view(*x.shape[:-1], -1, module.head_dim).transpose(1, 2)


def _attend(module, family: AttentionFamily, query, key, value, attention_mask, kwargs):
    # Qwen2 keeps the window on the module (per layer type), Mistral on the config, Llama has none.
    window = getattr(module, "sliding_window", getattr(module.config, "sliding_window", None))
    out, weights = family.interface(module)(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0 if not module.training else module.attention_dropout,
        scaling=module.scaling,
        sliding_window=window,
        **kwargs,
    )
    out = out.reshape(*out.shape[:2], -1).contiguous()
    return module.o_proj(out), weights


def _anchor_forward(module: nn.Module, family: AttentionFamily, qcache: QCache | None, observers=()):
    """The family's attention forward, which also leaves its query and keys in the Q Cache
    (when it has lazy dependants) and shows them to the observers.

    transformers up to 5.23 passes the cache as ``past_key_values``, 5.24 as ``cache``: take either.
    """

    def forward(hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache=None, **kwargs):
        past_key_values = cache if cache is not None else past_key_values
        query = _split_heads(module, module.q_proj(hidden_states))
        key = _split_heads(module, module.k_proj(hidden_states))
        value = _split_heads(module, module.v_proj(hidden_states))
        cos, sin = position_embeddings
        query, key = family.rotary(query, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, module.layer_idx)
        if qcache is not None:
            qcache.put(module.layer_idx, query, key)
        for observe in observers:
            observe(module, query, key)
        return _attend(module, family, query, key, value, attention_mask, kwargs)

    return forward


def _lazy_forward(
    module: nn.Module, family: AttentionFamily, qcache: QCache, anchor_idx: int, last: bool, observers=()
):
    """Value projection only; attention with the anchor's query and keys from the Q Cache.

    The anchor's last dependant empties the slot, so the Q Cache holds nothing between forwards
    (its key reference would otherwise keep a replaced cache tensor alive).
    """

    def forward(hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache=None, **kwargs):
        past_key_values = cache if cache is not None else past_key_values
        value = _split_heads(module, module.v_proj(hidden_states))
        if past_key_values is not None:
            _make_value_only(past_key_values, module.layer_idx)
            _, value = past_key_values.update(None, value, module.layer_idx)
        query, key = qcache.get(anchor_idx)
        if key.shape[-2] != value.shape[-2]:
            raise RuntimeError(
                f"lazy layer {module.layer_idx} has {value.shape[-2]} cached values but its anchor "
                f"{anchor_idx} has {key.shape[-2]} keys: the cache was not built under this method."
            )
        if last:
            qcache.clear()
        for observe in observers:
            observe(module, query, key)
        return _attend(module, family, query, key, value, attention_mask, kwargs)

    return forward


def _make_value_only(cache: Cache, layer_idx: int) -> None:
    """Give a lazy layer a value-only slot in the cache the model is running with."""
    if not isinstance(cache, DynamicCache) or getattr(cache, "offloading", False):
        raise ValueError(
            f"Lazy Attention needs a DynamicCache without offloading (the default cache of generate); got "
            f"{type(cache).__name__}. Static, quantized and offloaded caches are not supported."
        )
    while len(cache.layers) <= layer_idx:
        cache.layers.append(DynamicLayer())
    layer = cache.layers[layer_idx]
    if isinstance(layer, ValueOnlyLayer):
        return
    if type(layer) is not DynamicLayer:
        raise ValueError(
            f"layer {layer_idx}'s cache is a {type(layer).__name__}; lazy layers support full-attention "
            "DynamicLayer slots only (sliding-window layers cannot be lazy yet)."
        )
    if layer.is_initialized:
        raise ValueError(
            f"layer {layer_idx}'s cache already holds keys from a forward outside Lazy Attention; "
            "start generation with a fresh cache inside `with method.apply(model):`."
        )
    cache.layers[layer_idx] = ValueOnlyLayer()
