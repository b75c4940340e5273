"""The attention hooks every method installs, and what each one changes in the model.

Lazy Attention (``lazyattn.lazy``) and the token pruners (``lazyattn.engine``) change a
Hugging Face model only through the four mechanisms below. Each is installed by a context
manager and **everything is removed on exit**, also when the body raises: no instance
attribute ``forward`` and no hook is left behind, and the state dict is never touched.

1. **Per-instance ``forward`` of attention modules** (``patch_attention``, this module). The
   class's forward is shadowed by an instance attribute on the modules that need it:

   - an *anchor* with lazy dependants (``_anchor_forward``) computes exactly the family's
     attention (q/k/v projections, RoPE, cache update, the model's own attention backend) and
     also publishes its post-RoPE query and its keys in the layer-shared ``QCache``;
   - a *lazy* layer (``_lazy_forward``) computes its ``v_proj`` only and attends with its
     anchor's query and keys from the ``QCache`` (same mask, same scaling, same backend);
   - a layer watched by an *observer* (a pruner's scoring layer) also shows its post-RoPE query
     and keys to the observer, which scores tokens from them.

   Why a forward must be replaced rather than hooked: a lazy layer skips its ``q_proj`` and
   ``k_proj`` (and RoPE) altogether, and no transformers extension point (forward hooks,
   attention-interface registration, cache classes) can stop a module from computing its own
   query and keys or hand it another layer's; an anchor's post-RoPE query is likewise only
   visible inside the forward.
2. **Forward pre-hooks on the outer model and on the decoder** (the pruning engine,
   ``lazyattn.engine.PruneEngine``): the outer hook records the prompt's ``input_ids`` (to find
   the image tokens); the decoder hook reads the step's embeddings, positions, padding mask and
   cache length, and at prefill starts a new prompt's stages.
3. **Per-instance ``forward`` of decoder layers, from the first pruned layer on** (the pruning
   engine): at a stage's first layer the hidden states are gathered down to the kept tokens
   (plus merged ones), and every such layer is called with its stage's own attention mask,
   position ids and position embeddings instead of the decoder's.
4. **Cache slot replacement** (``_make_value_only``, this module): in the ``DynamicCache`` the
   model runs with, a lazy layer's ``DynamicLayer`` slot is replaced by a
   ``lazyattn.cache.ValueOnlyLayer``, which stores values and no keys. The cache is the
   caller's object: it is created inside the ``with`` block and is not restored (a cache built
   under a method belongs to that method).

The methods themselves are defined in ``docs/methods.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from lazyattn.arch import AttentionFamily, attention_family, attention_modules
from lazyattn.cache import ValueOnlyLayer


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
