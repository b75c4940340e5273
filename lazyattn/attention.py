"""The attention hooks every method installs, and what each one changes in the model.

Lazy Attention (``lazyattn.lazy``) and the token pruners (``lazyattn.engine``) change a
Hugging Face model only through the five mechanisms below. Each is installed by a context
manager and **everything is removed on exit**, also when the body raises: no instance
attribute ``forward`` and no hook is left behind, and the state dict is never touched.

1. **Per-instance ``forward`` of attention modules** (``patch_attention``, this module). The
   class's forward is shadowed by an instance attribute on the modules that need it:

   - an *anchor* with lazy dependants (``_anchor_forward``) computes exactly the family's
     attention (q/k/v projections, RoPE, cache update, the model's own attention backend) and
     also publishes its post-RoPE query and its keys in the layer-shared ``QCache``;
   - a *lazy* layer computes what its reading of sharing needs (``share``/``scope`` of
     ``LazyAttention``): ``_lazy_forward`` (``qk``) its ``v_proj`` only, attending with its
     anchor's query and keys from the ``QCache`` (same mask, same scaling, same backend);
     ``_lazy_qkv_forward`` (``qkv``) no projection at all, its ``o_proj`` applied to the anchor's
     attention output; ``_lazy_visual_forward`` (``scope="visual"``) its own query, keys and
     values, with the scores over image-token keys taken from its anchor's query and keys;
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
4. **Cache slot replacement** (``_lazy_slot``, this module): in the ``DynamicCache`` the
   model runs with, a lazy layer's ``DynamicLayer`` slot is replaced by a
   ``lazyattn.cache.ValueOnlyLayer`` (values, no keys; ``qk``), a ``NoKVLayer`` (nothing;
   ``qkv``) or a ``TextKeyLayer`` (text-token keys and every value; ``scope="visual"``).
5. **A forward pre-hook on the outer model** (``scope="visual"`` only): it records which of the
   step's tokens are image tokens (``input_ids == image_token_id``). The cache is the
   caller's object: it is created inside the ``with`` block and is not restored (a cache built
   under a method belongs to that method).

The methods themselves are defined in ``docs/methods.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from lazyattn.arch import AttentionFamily, attention_family, attention_modules, check_windows, image_token_id, sliding_window
from lazyattn.cache import NoKVLayer, PreallocatedLayer, TextKeyLayer, ValueOnlyLayer, cache_reserve


SHARES = ("qk", "qkv")
SCOPES = ("all", "visual", "visual_scores")
VISUAL_SCOPES = ("visual", "visual_scores")


class QCache:
    """The layer-shared Q Cache: one slot holding an anchor's query and keys for this forward
    (and, for ``share="qkv"``, its attention output before ``o_proj``; for a short query under
    ``share="qk"``, its attention probabilities).

    It never grows with the sequence: the query, output and probabilities cover only the current
    step's tokens and the keys are the anchor's own cache tensor (a reference, not a copy).
    """

    def __init__(self) -> None:
        self.clear()

    def put(self, anchor: int, query: torch.Tensor, key: torch.Tensor, output: torch.Tensor | None = None,
            probs: torch.Tensor | None = None) -> None:
        self.anchor, self.query, self.key, self.output, self.probs = anchor, query, key, output, probs

    def _check(self, anchor: int) -> None:
        if self.anchor != anchor:
            raise RuntimeError(
                f"Q Cache holds layer {self.anchor}'s query but layer {anchor}'s was needed: "
                "decoder layers must run in order within one forward."
            )

    def get(self, anchor: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(anchor)
        return self.query, self.key

    def get_output(self, anchor: int) -> torch.Tensor:
        self._check(anchor)
        return self.output

    def clear(self) -> None:
        self.anchor = self.query = self.key = self.output = self.probs = None


class ImageFlags:
    """Which tokens of the current forward are image tokens (``scope="visual"`` needs it): the
    ``image_token_id`` placeholders of the prompt's prefill (a forward into an empty cache, the
    one whose placeholders carry image features). Tokens fed after it (decode steps, later turns)
    are text, whatever ids they are. The ids come from a forward pre-hook on the outer model."""

    def __init__(self, token_id: int) -> None:
        self.token_id = token_id
        self.ids: torch.Tensor | None = None

    def hook(self, module, args, kwargs):
        self.ids = kwargs.get("input_ids", args[0] if args else None)

    def of_last(self, n_tokens: int, prefill: bool) -> torch.Tensor | None:
        if self.ids is None or self.ids.shape[-1] < n_tokens:
            raise ValueError(
                "scope='visual' needs the prompt's input_ids to tell image tokens from text; call the model "
                "with input_ids (and pixel_values), not precomputed inputs_embeds."
            )
        return self.ids[:, -n_tokens:] == self.token_id if prefill else None  # None: every token is text


Observer = Callable[[nn.Module, torch.Tensor, torch.Tensor], None]


def check_reading(share: str, scope: str) -> None:
    """Refuse an unknown or impossible reading of what a lazy layer shares, in one line."""
    if share not in SHARES:
        raise ValueError(f"Lazy Attention share must be one of {list(SHARES)}, got {share!r}.")
    if scope not in SCOPES:
        raise ValueError(f"Lazy Attention scope must be one of {list(SCOPES)}, got {scope!r}.")
    if share == "qkv" and scope in VISUAL_SCOPES:
        raise ValueError(
            f"Lazy Attention share='qkv' inherits the anchor's whole attention output, so it has no scope='{scope}' "
            f"reading; use share='qk' with scope='{scope}', or share='qkv' with scope='all'."
        )


@contextlib.contextmanager
def patch_attention(
    model: nn.Module,
    anchor_of: dict[int, int],
    observers: dict[int, list[Observer]],
    share: str = "qk",
    scope: str = "all",
    explicit: bool = False,
):
    """Install lazy layers (``anchor_of``: lazy layer -> anchor) and attention observers.
    ``explicit`` makes every other layer form a short query's attention probabilities explicitly,
    as an anchor does for its lazy layers (``ExplicitDense``, the backend control).

    ``share`` and ``scope`` pick the reading of a lazy layer (``LazyAttention`` documents them).
    An observer of layer ``l`` is called as ``fn(module, query, key)`` with the post-RoPE query
    of the current tokens and all keys that layer attends with (for a lazy layer: its anchor's),
    which is how token-pruning methods score tokens without materialising an attention matrix.
    Every patched module gets a per-instance ``forward`` that is removed on exit.
    """
    check_reading(share, scope)
    modules = attention_modules(model)
    check_windows(modules, anchor_of)
    qcache = QCache()
    installed, handles = [], []
    try:
        flags = None
        if scope in VISUAL_SCOPES and anchor_of:
            flags = ImageFlags(image_token_id(model))
            handles.append(model.register_forward_pre_hook(flags.hook, with_kwargs=True))
        last_dependant = {anchor_idx: lazy_idx for lazy_idx, anchor_idx in sorted(anchor_of.items())}
        for idx, attn in enumerate(modules):
            family = attention_family(attn)
            watch = tuple(observers.get(idx, ()))
            if idx in anchor_of:
                anchor_idx = anchor_of[idx]
                last = last_dependant[anchor_idx] == idx
                if share == "qkv":
                    attn.forward = _lazy_qkv_forward(attn, qcache, anchor_idx, last, watch)
                elif scope in VISUAL_SCOPES:
                    if watch:
                        raise ValueError(
                            f"layer {idx} is lazy with scope='{scope}' and also a token pruner's scoring layer: "
                            f"scope='{scope}' cannot be composed with token pruning yet."
                        )
                    make = _lazy_vla_forward if scope == "visual" else _lazy_visual_forward
                    attn.forward = make(attn, family, qcache, anchor_idx, last, flags)
                else:
                    attn.forward = _lazy_forward(attn, family, qcache, anchor_idx, last, watch)
            elif idx in last_dependant or watch or explicit:
                publish = qcache if idx in last_dependant else None
                attn.forward = _anchor_forward(attn, family, publish, watch, with_output=share == "qkv",
                                               with_probs=share == "qk" and scope == "all", explicit=explicit)
            else:
                continue
            installed.append(attn)
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for attn in installed:
            del attn.forward  # the instance attribute; the class's forward shows through again
        qcache.clear()


def _split_heads(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.view(*x.shape[:-1], -1, module.head_dim).transpose(1, 2)


def _projections(module, family: AttentionFamily, hidden_states, position_embeddings):
    """The family's query, keys and values of these tokens, RoPE applied to query and keys."""
    query = _split_heads(module, module.q_proj(hidden_states))
    key = _split_heads(module, module.k_proj(hidden_states))
    value = _split_heads(module, module.v_proj(hidden_states))
    cos, sin = position_embeddings
    query, key = family.rotary(query, key, cos, sin)
    return query, key, value


def _attention(module, family: AttentionFamily, query, key, value, attention_mask, kwargs):
    """The model's attention backend on these tensors: (B, T, H * d_v) before ``o_proj``, and the
    probabilities where the backend gives them (eager)."""
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
    return out.reshape(*out.shape[:2], -1).contiguous(), weights


def _attend(module, family: AttentionFamily, query, key, value, attention_mask, kwargs):
    out, weights = _attention(module, family, query, key, value, attention_mask, kwargs)
    return module.o_proj(out), weights


def inherits(module: nn.Module, q_len: int) -> bool:
    """Whether an anchor publishes its attention probabilities for this forward, so that its
    ``share="qk"`` lazy layers multiply them by their own values and read no keys.

    Only where that moves fewer bytes than recomputing: the probabilities of ``q`` queries
    (``B x H x q x T``) are written once by the anchor and read by each lazy layer, where a
    recomputing lazy layer reads the anchor's keys (``B x H_kv x T x d``). One lazy layer already
    gains when ``2 q H <= H_kv d``: every decode step (``q = 1``) and short continuations, such
    as a carried conversation's next user turn (up to 64 tokens on LLaVA-1.5-7B, 8 on the tiny
    models). Prefill (long queries) keeps the model's attention backend (flash-compatible).
    Backends or settings whose probabilities we do not reproduce exactly (dropout in training,
    sliding windows, logit softcapping, flex attention) always recompute.
    """
    n_heads, head_dim = module.config.num_attention_heads, module.head_dim
    n_kv = getattr(module.config, "num_key_value_heads", None) or n_heads
    if 2 * q_len * n_heads > n_kv * head_dim or module.training:
        return False
    if sliding_window(module) is not None:
        return False
    if getattr(module.config, "attn_logit_softcapping", None):
        return False
    return not module.config._attn_implementation.startswith("flex")


def _allowed(attention_mask, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    """The mask as the backend applies it, as a bool (B or 1, 1, q, T) tensor (True attends) or an
    additive float one; None when every query sees every key."""
    if attention_mask is None or attention_mask.dim() == 2:  # no mask, or flash's 2D padding mask
        allowed = None
        if q_len > 1:  # causal, bottom-right aligned (the queries are the last q_len tokens)
            cols = torch.arange(kv_len, device=device)
            rows = torch.arange(q_len, device=device) + (kv_len - q_len)
            allowed = (cols[None, :] <= rows[:, None])[None, None]
        if attention_mask is not None:
            pad = attention_mask[:, None, None, -kv_len:].bool()
            allowed = pad if allowed is None else allowed & pad
        return allowed
    return attention_mask[..., -kv_len:]


def explicit_attention(module: nn.Module, query, key, value, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its probabilities formed explicitly, as transformers' eager attention forms
    them (scores in the model's dtype, softmax in float32, cast back), with the mask the backend
    was given and the module's scaling; grouped-query heads read their shared key and value
    heads without repeating them. Returns the output (B, q, H * d_v) before ``o_proj`` and the
    probabilities (B, H_kv, groups, q, T)."""
    probs = _probs(module, _scores(query, key), attention_mask, query.dtype)
    return _inherit(probs, value), probs


def _scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``query . key`` per head, (B, H_kv, groups, q, T): grouped-query heads read their shared key
    head without repeating it (scaling applied by ``_probs``)."""
    batch, n_heads, q_len, d = query.shape
    n_kv, kv_len = key.shape[1], key.shape[-2]
    groups = n_heads // n_kv
    q = query.reshape(batch, n_kv, groups * q_len, d)
    return _matmul(q, key.transpose(-1, -2)).view(batch, n_kv, groups, q_len, kv_len)


@torch.library.custom_op("lazyattn::matmul", mutates_args=())
def _extern_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.matmul(a, b)


@_extern_matmul.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty((*a.shape[:-1], b.shape[-1]))


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for same-batch (..., m, k) x (..., k, n) tensors. Traced for a compiled CPU decode
    step, it stays one ATen matmul (an opaque op): inductor lowers a CPU batched matmul with one
    query row (m = 1) into a fused multiply-and-sum, into which it pulls the query's RoPE, recomputed
    for every key (measured: a compiled lazy decode step 1.7x slower than the eager one). CUDA keeps
    such a matmul an extern kernel by itself."""
    if a.device.type == "cpu" and torch.compiler.is_compiling():
        return _extern_matmul(a, b)
    return torch.matmul(a, b)


def _probs(module: nn.Module, scores: torch.Tensor, attention_mask, dtype) -> torch.Tensor:
    """Scaled, masked and softmaxed scores, as eager attention forms them."""
    q_len, kv_len = scores.shape[-2:]
    scores = scores * module.scaling
    allowed = _allowed(attention_mask, q_len, kv_len, scores.device)
    if allowed is not None:
        allowed = allowed[:, :, None]  # (B, 1, 1, q, T) against (B, H_kv, groups, q, T)
        if allowed.dtype == torch.bool:
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        else:
            scores = scores + allowed
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)


def _inherit(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``probs @ value`` for probabilities (B, H_kv, groups, q, T) and values (B, H_kv, T, d_v):
    (B, q, H * d_v), the layout the attention backends return before ``o_proj``."""
    batch, n_kv, groups, q_len, kv_len = probs.shape
    out = _matmul(probs.reshape(batch, n_kv, groups * q_len, kv_len), value)
    out = out.view(batch, n_kv * groups, q_len, value.shape[-1]).transpose(1, 2)
    return out.reshape(batch, q_len, -1)


def _weights(module: nn.Module, probs: torch.Tensor):
    """The probabilities as (B, H, q, T) where the backend returns them (eager), else None."""
    if module.config._attn_implementation != "eager":
        return None
    return probs.reshape(probs.shape[0], -1, *probs.shape[-2:])


def _anchor_forward(
    module: nn.Module, family: AttentionFamily, qcache: QCache | None, observers=(), with_output: bool = False,
    with_probs: bool = False, explicit: bool = False,
):
    """The family's attention forward, which also leaves its query and keys in the Q Cache
    (when it has lazy dependants; with ``with_output`` its attention output before ``o_proj``
    too; with ``with_probs``, for a short query (``inherits``), its attention probabilities,
    formed explicitly) and shows them to the observers. ``explicit`` forms the probabilities of a
    short query explicitly without anyone to hand them to: the control that prices the anchors'
    explicit decode attention against the backend's fused one.

    transformers up to 5.23 passes the cache as ``past_key_values``, 5.24 as ``cache``: take either.
    """

    def forward(hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache=None, **kwargs):
        past_key_values = cache if cache is not None else past_key_values
        query, key, value = _projections(module, family, hidden_states, position_embeddings)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, module.layer_idx)
        for observe in observers:
            observe(module, query, key)
        probs = None
        if (explicit or with_probs and qcache is not None) and inherits(module, query.shape[-2]):
            out, probs = explicit_attention(module, query, key, value, attention_mask)
            weights = _weights(module, probs)
        else:
            out, weights = _attention(module, family, query, key, value, attention_mask, kwargs)
        if past_key_values is not None:  # scores written then read by the softmax, probabilities written then read
            slot = past_key_values.layers[module.layer_idx]
            slot.extra_reads = {"scores": 4 * _nbytes(probs)} if probs is not None else {}
        if qcache is not None:
            qcache.put(module.layer_idx, query, key, out if with_output else None, probs)
        return module.o_proj(out), weights

    return forward


def _take_anchor(module: nn.Module, qcache: QCache, anchor_idx: int, last: bool, value: torch.Tensor):
    """The anchor's query, keys and probabilities (None unless published) from the Q Cache, checked
    to cover as many tokens as this layer's values; the anchor's last dependant empties the slot,
    so the Q Cache holds nothing between forwards (its key reference would otherwise keep a
    replaced cache tensor alive)."""
    query, key = qcache.get(anchor_idx)
    probs = qcache.probs
    window = sliding_window(module)
    if key.shape[-2] != value.shape[-2] and window is not None:
        raise ValueError(
            f"the sequence ({value.shape[-2]} tokens) outgrew the sliding window of {window} tokens that lazy layer "
            f"{module.layer_idx} shares with its anchor {anchor_idx}: the anchor's cache dropped keys the lazy layer "
            "would attend with; Lazy Attention with a sliding window runs sequences up to the window."
        )
    if key.shape[-2] != value.shape[-2]:
        raise RuntimeError(
            f"lazy layer {module.layer_idx} has {value.shape[-2]} cached values but its anchor "
            f"{anchor_idx} has {key.shape[-2]} keys: the cache was not built under this method."
        )
    if last:
        qcache.clear()
    return query, key, probs


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _lazy_forward(
    module: nn.Module, family: AttentionFamily, qcache: QCache, anchor_idx: int, last: bool, observers=()
):
    """Value projection only. With the anchor's probabilities in the Q Cache (short queries:
    decode), ``P_anchor @ V_own``, reading no keys; otherwise attention with the anchor's query
    and keys through the model's backend (same mask, same scaling)."""

    def forward(hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache=None, **kwargs):
        past_key_values = cache if cache is not None else past_key_values
        value = _split_heads(module, module.v_proj(hidden_states))
        slot = None
        if past_key_values is not None:
            slot = _lazy_slot(past_key_values, module.layer_idx, ValueOnlyLayer)
            _, value = past_key_values.update(None, value, module.layer_idx)
        query, key, probs = _take_anchor(module, qcache, anchor_idx, last, value)
        for observe in observers:
            observe(module, query, key)
        if slot is not None:  # what this layer read beyond its own values
            slot.extra_reads = {"scores": _nbytes(probs)} if probs is not None else {"keys": _nbytes(key)}
        if probs is not None:
            return module.o_proj(_inherit(probs, value)), _weights(module, probs)
        return _attend(module, family, query, key, value, attention_mask, kwargs)

    return forward


def _lazy_qkv_forward(module: nn.Module, qcache: QCache, anchor_idx: int, last: bool, observers=()):
    """No projection at all: the anchor's attention output (its query, keys and values) through
    this layer's own ``o_proj``. The cache slot stores nothing, only the token count."""

    def forward(hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache=None, **kwargs):
        past_key_values = cache if cache is not None else past_key_values
        if past_key_values is not None:
            _lazy_slot(past_key_values, module.layer_idx, NoKVLayer).advance(hidden_states.shape[1])
        out = qcache.get_output(anchor_idx)
        if observers:
            query, key = qcache.get(anchor_idx)
            for observe in observers:
                observe(module, query, key)
        if last:
            qcache.clear()
        return module.o_proj(out), None

    return forward


def _own_text_keys(slot, hidden_states, key, value, flags, past_key_values):
    """This layer's keys at the text columns of every cached token (zeros at image columns), all its
    values, and the image flags of every cached token: from its text-key slot, or, without a cache,
    from this forward's tokens."""
    if past_key_values is not None:
        image = flags.of_last(hidden_states.shape[1], prefill=not slot.is_initialized)
        text_key, value, image = slot.update(key, value, image)
        own_key = text_key.new_zeros(value.shape[:-1] + text_key.shape[-1:])  # the text keys at their columns
        columns = slot.text_columns[:, None, :, None].expand(*text_key.shape)
        return own_key.scatter_(2, columns, text_key), value, image
    image = flags.of_last(hidden_states.shape[1], prefill=True)
    return key * (~image)[:, None, :, None].to(key.dtype), value, image


def _visual_inputs(module, family, qcache, anchor_idx, last, flags, hidden_states, position_embeddings, past_key_values):
    """What both visual scopes start from: this layer's query and values, its own keys at the text
    columns, the image flags of every cached token, and the anchor's query and keys (whose image
    columns it reads again: counted in the slot's ``extra_reads``)."""
    query, key, value = _projections(module, family, hidden_states, position_embeddings)
    slot = _lazy_slot(past_key_values, module.layer_idx, TextKeyLayer) if past_key_values is not None else None
    own_key, value, image = _own_text_keys(slot, hidden_states, key, value, flags, past_key_values)
    anchor_query, anchor_key, _ = _take_anchor(module, qcache, anchor_idx, last, value)
    if slot is not None:
        slot.extra_reads = {"keys": _nbytes(anchor_key)}
    return query, value, own_key, image, anchor_query, anchor_key


def _vla_decode(module, family, qcache, anchor_idx, last, flags, hidden_states, position_embeddings,
                past_key_values, attention_mask):
    """VLA for a short query into a filled cache (decode steps, short continuations): the scores
    of the (mixed) queries against the anchor's keys and against this layer's own text keys, the
    text ones put at their columns, then the mask, softmax and the layer's values, as eager
    attention does. It reads the anchor's keys, its own text keys and values and writes no key
    tensor of the whole cache (the prefill path builds the mixed keys once for the backend)."""
    query, key, value = _projections(module, family, hidden_states, position_embeddings)
    slot = _lazy_slot(past_key_values, module.layer_idx, TextKeyLayer)
    image_new = flags.of_last(hidden_states.shape[1], prefill=False)
    text_key, value, image = slot.update(key, value, image_new)
    anchor_query, anchor_key, _ = _take_anchor(module, qcache, anchor_idx, last, value)
    slot.extra_reads = {"keys": _nbytes(anchor_key)}
    if slot.graph:  # graph mode (whole storages): a decode step's tokens are text
        mixed_query = query
    else:
        mixed_query = torch.where(image[:, -query.shape[-2]:][:, None, :, None], anchor_query, query)
    scores = _scores(mixed_query, anchor_key)  # every column; the text ones are replaced below
    own = _scores(mixed_query, text_key)  # (B, H_kv, g, q, T_text)
    scores = scores.scatter(-1, slot.text_columns[:, None, None, None, :].expand(own.shape), own)  # text columns
    probs = _probs(module, scores, attention_mask, query.dtype)
    return module.o_proj(_inherit(probs, value)), _weights(module, probs)


def _lazy_vla_forward(
    module: nn.Module, family: AttentionFamily, qcache: QCache, anchor_idx: int, last: bool, flags: ImageFlags
):
    """VLA (``scope="visual"``): the image tokens' post-RoPE queries and keys are the anchor's, the
    text tokens' the layer's own; values are the layer's own. One attention call through the
    model's backend over the mixed queries and keys (same head size: flash-compatible), with the
    layer's mask and scaling. The cache keeps text-token keys and every value; the image keys are
    read from the anchor's cache. In decode the new (text) token's own query meets the anchor's
    image keys and this layer's own text keys."""

    def forward(hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache=None, **kwargs):
        past_key_values = cache if cache is not None else past_key_values
        if past_key_values is not None and _holds_tokens(past_key_values, module.layer_idx):
            if inherits(module, hidden_states.shape[1]):  # decode: no mixed key tensor over the whole cache
                return _vla_decode(module, family, qcache, anchor_idx, last, flags, hidden_states,
                                   position_embeddings, past_key_values, attention_mask)
        query, value, own_key, image, anchor_query, anchor_key = _visual_inputs(
            module, family, qcache, anchor_idx, last, flags, hidden_states, position_embeddings, past_key_values)
        rows = image[:, -query.shape[-2]:][:, None, :, None]  # this forward's tokens
        mixed_query = torch.where(rows, anchor_query, query)
        mixed_key = torch.where(image[:, None, :, None], anchor_key, own_key)
        return _attend(module, family, mixed_query, mixed_key, value, attention_mask, kwargs)

    return forward


def _lazy_visual_forward(
    module: nn.Module, family: AttentionFamily, qcache: QCache, anchor_idx: int, last: bool, flags: ImageFlags
):
    """``scope="visual_scores"`` (our reading before VLA was known): own query, keys and values;
    the scores over image-token keys are the anchor's (its query against its keys), the scores
    over text keys this layer's own, in one softmax.

    One softmax over both sets of scores is one attention call over keys and queries that carry
    both halves side by side: ``q' = [Q_anchor, Q_own]``, and a key column is ``[K_anchor, 0]``
    for an image token and ``[0, K_own]`` for a text token, so ``q'.k'`` is exactly the anchor's
    score on image columns and the layer's own on text columns, under the same mask and scaling.
    This is the log-sum-exp merge of the two partial softmaxes, done by the backend itself (the
    attention interfaces of transformers return no log-sum-exp to merge by hand), and no
    attention matrix is formed. The cache keeps keys of text tokens only.
    """

    def forward(hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache=None, **kwargs):
        query, value, own_key, image, anchor_query, anchor_key = _visual_inputs(
            module, family, qcache, anchor_idx, last, flags, hidden_states, position_embeddings,
            cache if cache is not None else past_key_values)
        image_key = anchor_key * image[:, None, :, None].to(anchor_key.dtype)
        joint_query = torch.cat([anchor_query, query], dim=-1)
        joint_key = torch.cat([image_key, own_key], dim=-1)
        d_v = value.shape[-1]
        if module.config._attn_implementation.startswith("flash"):  # flash kernels need one head size
            value = torch.cat([value, value.new_zeros(value.shape)], dim=-1)
        out, weights = family.interface(module)(
            module, joint_query, joint_key, value, attention_mask,
            dropout=0.0 if not module.training else module.attention_dropout, scaling=module.scaling,
            sliding_window=None, **kwargs,
        )
        out = out[..., :d_v].reshape(*out.shape[:2], -1).contiguous()
        return module.o_proj(out), weights

    return forward


def _holds_tokens(cache: Cache, layer_idx: int) -> bool:
    """Whether the layer's cache slot holds tokens already (a decode step or a later chunk), asked
    without reading a length (a compiled step must not depend on one)."""
    return layer_idx < len(cache.layers) and cache.layers[layer_idx].is_initialized


def _lazy_slot(cache: Cache, layer_idx: int, kind: type) -> DynamicLayer:
    """Give a lazy layer its own kind of slot (``kind``) in the cache the model is running with;
    it grows the way the cache's other layers do (preallocated with the cache's ``reserve``, or by
    concatenation)."""
    if not isinstance(cache, DynamicCache) or getattr(cache, "offloading", False):
        raise ValueError(
            f"Lazy Attention needs a DynamicCache or lazyattn's PreallocatedCache, without offloading; got "
            f"{type(cache).__name__}. Quantized and offloaded caches are not supported."
        )
    reserve = cache_reserve(cache)
    while len(cache.layers) <= layer_idx:
        cache.layers.append(DynamicLayer() if reserve is None else PreallocatedLayer(reserve))
    layer = cache.layers[layer_idx]
    if type(layer) is kind:
        return layer
    if type(layer) not in (DynamicLayer, PreallocatedLayer, DynamicSlidingWindowLayer):
        raise ValueError(
            f"layer {layer_idx}'s cache is a {type(layer).__name__}; lazy layers support full-attention "
            "cache slots only (DynamicLayer, PreallocatedLayer, DynamicSlidingWindowLayer), built under one method."
        )
    if layer.is_initialized:
        raise ValueError(
            f"layer {layer_idx}'s cache already holds keys from a forward outside Lazy Attention; "
            "start generation with a fresh cache inside `with method.apply(model):`."
        )
    cache.layers[layer_idx] = kind(reserve)
    return cache.layers[layer_idx]
