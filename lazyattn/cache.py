"""Cache pieces: a preallocated KV cache, the cache layers of lazy attention layers (values only;
nothing; text keys and all values), and honest byte counts of what a cache holds and what a decode
step reads from it.

Two ways to grow a layer's tensors along the token axis, picked per cache:

- **dynamic** (transformers' ``DynamicCache`` and our layers with ``reserve=None``): every update
  concatenates, so every decode step copies the whole layer. This is what transformers does by
  default; it stays available (``cache=dynamic``) for comparison.
- **preallocated** (``PreallocatedCache`` and our layers with ``reserve=n``): the first update
  allocates storage for its tokens plus ``n`` more (the generation budget) and every later update
  writes in place; attention runs over the valid prefix, a view of the storage (no copy). A chunk
  that overflows the storage re-allocates it once with room to spare (a carried conversation's
  later turns), so the tokens a layer holds never depend on the storage. Masks and positions are
  those of a ``DynamicCache`` of the same tokens, so answers do not change with the cache kind.

A layer's ``keys`` and ``values`` are always the valid tokens (a view under preallocation), so
``kv_cache_bytes`` counts the tokens held, whichever way they are stored. Each layer also says
what its attention moved in the last forward beyond its own tensors (``extra_reads``: ``keys``, a
lazy layer re-reading its anchor's keys; ``scores``, the attention scores and probabilities an
anchor forms explicitly for its lazy layers and each lazy layer's read of them), which
``kv_read_terms`` adds to the layers' own tensors: the KV traffic of a decode step, by term.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

CACHE_KINDS = ("static", "dynamic")


class Growing:
    """A tensor growing along dimension ``dim``: by concatenation (``reserve=None``) or written in
    place into storage allocated with ``reserve`` spare tokens (``reserve`` an int)."""

    def __init__(self, dim: int, reserve: int | None) -> None:
        self.dim, self.reserve = dim, reserve
        self.storage: torch.Tensor | None = None
        self.view: torch.Tensor | None = None
        self.length = 0
        self.cursor: torch.Tensor | None = None  # graph mode: the next write's index, on the device

    def start(self, like: torch.Tensor) -> torch.Tensor:
        """An empty tensor shaped like ``like`` with no tokens (as ``DynamicLayer`` starts)."""
        shape = list(like.shape)
        shape[self.dim] = 0
        self.view = like.new_empty(shape)
        return self.view

    def append(self, new: torch.Tensor) -> torch.Tensor:
        if self.view is None:
            self.start(new)
        n = new.shape[self.dim]
        if self.reserve is None:
            self.view = torch.cat([self.view, new], dim=self.dim)
            self.length += n
            return self.view
        need = self.length + n
        capacity = 0 if self.storage is None else self.storage.shape[self.dim]
        if need > capacity:  # the first chunk, or one that overflows: allocate once, with room to spare
            spare = self.reserve if self.storage is None else max(self.reserve, capacity // 2)
            shape = list(new.shape)
            shape[self.dim] = need + spare
            storage = new.new_empty(shape)
            if self.length:
                storage.narrow(self.dim, 0, self.length).copy_(self.view)
            self.storage = storage
        self.storage.narrow(self.dim, self.length, n).copy_(new)
        self.length = need
        self.view = self.storage.narrow(self.dim, 0, need)
        return self.view

    # -- graph mode: writes at a device cursor, the whole storage returned (static shapes) ---------------
    def enter_graph(self, extra: int) -> None:
        """Make room for ``extra`` more tokens (one re-allocation at most, here, outside any graph) and
        start writing at a device cursor: ``write`` then reads no Python length and returns the whole
        storage, so a compiled step keeps one shape as the tensor fills. The room is zeroed (attention
        over the whole storage masks it, and a masked column's value must not be NaN: 0 x NaN is NaN).
        The storage's address is fixed for CUDA graphs."""
        if self.reserve is None or self.storage is None:
            raise ValueError("graph mode needs preallocated storage (reserve=int) holding the prompt.")
        capacity = self.storage.shape[self.dim]
        if self.length + extra > capacity:
            shape = list(self.storage.shape)
            shape[self.dim] = self.length + extra
            storage = self.storage.new_empty(shape)
            storage.narrow(self.dim, 0, self.length).copy_(self.view)
            self.storage = storage
            self.view = storage.narrow(self.dim, 0, self.length)
        self.storage.narrow(self.dim, self.length, self.storage.shape[self.dim] - self.length).zero_()
        self.cursor = torch.tensor(self.length, device=self.storage.device)
        torch._dynamo.mark_static_address(self.storage)
        torch._dynamo.mark_static_address(self.cursor)

    def write(self, new: torch.Tensor) -> torch.Tensor:
        """Graph mode: ``new`` written at the cursor (in place, no Python length read); the storage."""
        index = self.cursor + torch.arange(new.shape[self.dim], device=new.device)
        self.storage.index_copy_(self.dim, index, new)
        self.cursor.add_(new.shape[self.dim])
        return self.storage

    def advance(self, n: int) -> None:
        """Graph mode, outside the graph: the Python length and valid view catch up with ``n`` written tokens."""
        self.length += n
        self.view = self.storage.narrow(self.dim, 0, self.length)

    def apply(self, fn) -> None:
        """Apply a batch-wise ``fn`` (select, repeat, reorder) to the held tokens."""
        if self.view is None or self.length == 0:
            return
        if self.reserve is None:
            self.view = fn(self.view)
        else:
            self.storage = fn(self.storage)
            self.view = self.storage.narrow(self.dim, 0, self.length)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove, as DynamicLayer.crop does.")
        if tokens_to_remove and self.view is not None:
            self.length = max(0, self.length + tokens_to_remove)
            self.view = self.view.narrow(self.dim, 0, self.length)

    def allocated_bytes(self) -> int:
        tensor = self.storage if self.storage is not None else self.view
        return 0 if tensor is None else tensor.numel() * tensor.element_size()


class GrowingLayer(DynamicLayer):
    """A cache layer whose tensors (``FIELDS``: attribute name -> growth dimension) grow by
    ``Growing``; ``reserve=None`` concatenates, an int preallocates. The attributes always hold
    the valid tokens."""

    FIELDS: dict[str, int] = {}

    def __init__(self, reserve: int | None = None) -> None:
        super().__init__()
        for name in self.FIELDS:
            setattr(self, name, None)
        self.reserve = reserve
        self.extra_reads: dict[str, int] = {}
        self._grow: dict[str, Growing] = {}

    def lazy_initialization(self, key_states, value_states) -> None:
        like = value_states if value_states is not None else key_states
        self.dtype, self.device = like.dtype, like.device
        self._grow = {name: Growing(dim, self.reserve) for name, dim in self.FIELDS.items()}
        self.is_initialized = True

    graph = False  # graph mode (``PreallocatedCache.enter_graph``): updates write at device cursors

    def _append(self, **new: torch.Tensor) -> None:
        for name, tensor in new.items():
            setattr(self, name, self._grow[name].append(tensor))

    def _write(self, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Graph mode: write at the cursors, return the whole storages; the attributes (valid views)
        catch up in ``advance``, outside the graph."""
        return {name: self._grow[name].write(tensor) for name, tensor in new.items()}

    def enter_graph(self, extra: int) -> None:
        for grow in self._grow.values():
            grow.enter_graph(extra)
        self.graph = True

    def catch_up(self, n: int) -> None:
        """Graph mode, outside the graph: the valid views after a step that wrote ``n`` tokens."""
        for name, grow in self._grow.items():
            grow.advance(n)
            setattr(self, name, grow.view)

    def exit_graph(self) -> None:
        self.graph = False

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        first = next(iter(self._grow.values()))
        return first.length

    def allocated_bytes(self) -> int:
        return sum(g.allocated_bytes() for g in self._grow.values())

    def _each(self, fn) -> None:
        for name, grow in self._grow.items():
            grow.apply(fn)
            if grow.view is not None:
                setattr(self, name, grow.view)

    def reset(self) -> None:
        for name in self.FIELDS:
            setattr(self, name, None)
        self._grow = {}
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove, as DynamicLayer.crop does.")
        for name, grow in self._grow.items():
            grow.crop(tokens_to_remove)
            if grow.view is not None:
                setattr(self, name, grow.view)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._each(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._each(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._each(lambda t: t[indices, ...])

    def offload(self):
        raise ValueError(f"{type(self).__name__} cannot be offloaded.")

    def prefetch(self):
        pass


class PreallocatedLayer(GrowingLayer):
    """A full-attention layer's keys and values, preallocated (what ``DynamicLayer`` holds,
    written in place)."""

    FIELDS = {"keys": -2, "values": -2}

    def update(self, key_states, value_states, *args, **kwargs):
        if self.graph:
            out = self._write(keys=key_states, values=value_states)
            return out["keys"], out["values"]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._append(keys=key_states, values=value_states)
        return self.keys, self.values


class PreallocatedCache(DynamicCache):
    """A ``DynamicCache`` whose full-attention layers write in place into storage allocated at
    their first update, with ``reserve`` spare tokens (the generation budget). Sliding-window
    layers keep transformers' own kind. Lazy layers' slots (``lazyattn.attention``) take the same
    ``reserve``."""

    def __init__(self, config, reserve: int) -> None:
        if config is None:
            raise ValueError("PreallocatedCache needs the model's config (to know its layers).")
        if not isinstance(reserve, int) or reserve < 0:
            raise ValueError(f"reserve must be a number of tokens >= 0, got {reserve!r}.")
        super().__init__(config=config)
        self.reserve = reserve
        self.layers = [PreallocatedLayer(reserve) if type(layer) is DynamicLayer else layer for layer in self.layers]
        self.masks_on_device = False
        self.pruned = False  # a token pruner's stages hold fewer tokens in later layers (set by the pruning engine)
        self.graph = False

    def graph_blocker(self) -> str | None:
        """Why this cache's decode steps cannot run as one static-shape graph, or None: every layer
        must be a preallocated one of ours, all holding the same tokens unless a token pruner's stages
        hold fewer (its engine masks each stage over that stage's own storage)."""
        if not all(isinstance(layer, GrowingLayer) and layer.is_initialized for layer in self.layers):
            return "a layer whose cache is not preallocated (e.g. a sliding window)"
        if not self.pruned and len({layer.get_seq_length() for layer in self.layers}) != 1:
            return "layers holding different numbers of tokens"
        return None

    def rooms(self) -> set[int]:
        """The tokens each layer's storage has room for beyond what it holds (one value where every
        layer can take a static graph's steps alike)."""
        return {grow.storage.shape[grow.dim] - grow.length for layer in self.layers for grow in layer._grow.values()}

    def enter_graph(self, extra: int) -> None:
        """Room for ``extra`` more tokens in every layer, then writes at device cursors: each update
        returns whole storages (one shape while the cache fills, as a compiled decode step needs)."""
        for layer in self.layers:
            layer.enter_graph(extra)
        self.graph = True

    def storage_length(self) -> int:
        """The tokens the first layer's storage has room for (in graph mode, what attention runs over)."""
        return self.layers[0]._grow["values"].storage.shape[-2]

    def catch_up(self, n: int) -> None:
        """After a graph step that wrote ``n`` tokens: every layer's valid views catch up (host only)."""
        for layer in self.layers:
            layer.catch_up(n)

    def exit_graph(self) -> None:
        for layer in self.layers:
            layer.exit_graph()
        self.graph = False

    @property
    def is_compileable(self) -> bool:
        """What transformers asks before a one-token step may skip its attention mask: with a padding
        mask it would first check on the host that the mask has no zero (one device read a step).
        Once a caller sets ``masks_on_device`` (the mask may have holes), the step builds its mask
        instead, as it does for transformers' static cache; without a mask nothing is read either way."""
        return self.masks_on_device


class ConcatenatingCache(DynamicCache):
    """transformers' ``DynamicCache`` as it is (``cache=dynamic``: every update concatenates), answering
    what a decode loop asks of either kind the harness builds, as ``PreallocatedCache`` does: it
    preallocates nothing (``reserve``), is never in graph mode (``graph``) and says why its steps
    cannot run as one static graph (``graph_blocker``). ``masks_on_device`` is taken and changes
    nothing: transformers checks this cache's padding mask on the host, as it always did."""

    reserve: int | None = None
    graph = False
    masks_on_device = False

    def graph_blocker(self) -> str | None:
        return "transformers' concatenating cache (cache=dynamic)"


def new_cache(kind: str, config, reserve: int) -> PreallocatedCache | ConcatenatingCache:
    """A fresh cache of ``kind`` (``CACHE_KINDS``): ``static`` preallocates ``reserve`` tokens beyond
    each layer's first chunk, ``dynamic`` is transformers' concatenating ``DynamicCache``
    (``ConcatenatingCache``). Both answer ``reserve``, ``graph``, ``graph_blocker()`` and take
    ``masks_on_device``."""
    if kind == "static":
        return PreallocatedCache(config, int(reserve))
    if kind == "dynamic":
        return ConcatenatingCache(config=config)
    raise ValueError(f"cache must be one of {list(CACHE_KINDS)}, got {kind!r}.")


def cache_reserve(cache: Cache) -> int | None:
    """The spare tokens a cache's layers preallocate (None: they concatenate)."""
    return getattr(cache, "reserve", None)


class ValueOnlyLayer(GrowingLayer):
    """The cache layer of a lazy attention layer: it keeps values and no keys.

    ``update(None, values)`` appends values and returns ``(None, all_values)``; the keys a lazy
    layer attends with are its anchor's, which the anchor's own cache layer already holds.
    """

    FIELDS = {"values": -2}

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states is not None:
            raise ValueError("ValueOnlyLayer stores values only; call update(None, values).")
        if self.graph:
            return None, self._write(values=value_states)["values"]
        if not self.is_initialized:
            self.lazy_initialization(None, value_states)
        self._append(values=value_states)
        return None, self.values


class NoKVLayer(GrowingLayer):
    """The cache layer of a lazy layer that shares its anchor's keys *and* values (``share="qkv"``):
    it stores no tensor, only how many tokens it has seen (so masks and lengths stay right)."""

    def lazy_initialization(self, key_states, value_states) -> None:
        self.length = 0
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise ValueError("NoKVLayer stores nothing; call advance(n_tokens).")

    def advance(self, n_tokens: int) -> None:
        if self.graph:  # counted by the cache's own advance, outside the graph
            return
        if not self.is_initialized:
            self.lazy_initialization(None, None)
        self.length += n_tokens

    def catch_up(self, n: int) -> None:
        self.length += n

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove, as DynamicLayer.crop does.")
        if self.is_initialized:
            self.length = max(0, self.length + tokens_to_remove)


class TextKeyLayer(GrowingLayer):
    """The cache layer of a lazy layer that inherits only the attention over image tokens
    (``scope="visual"``): values of every token, keys of the text tokens only.

    ``keys`` holds the text tokens' keys in their order (B, H, T_text, d); ``image`` (B, T) says
    which of the cached tokens are image tokens, and ``columns`` (B, T_text) where each text key
    sits among them. Every sample of a batch has the same number of image tokens, so the text keys
    of a batch form one tensor. Only the prompt's forward carries image tokens: a later chunk
    (``image=None``: decode steps, later turns) is all text and appends without reading the device.
    """

    FIELDS = {"values": -2, "keys": -2, "image": 1, "columns": 1}

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys = self._grow["keys"].start(key_states)
        batch, device = key_states.shape[0], key_states.device
        self.image = self._grow["image"].start(torch.zeros(batch, 0, dtype=torch.bool, device=device))
        self.columns = self._grow["columns"].start(torch.zeros(batch, 0, dtype=torch.long, device=device))

    def update(self, key_states, value_states, image=None, *args, **kwargs):
        """Append the new tokens (``image``: (B, n) bool, their image flags, or None where every new
        token is text); returns the text keys, all values and the image flags of every cached token."""
        if key_states is None:
            raise ValueError("TextKeyLayer.update takes keys, values and the new tokens' image flags (or None).")
        if self.graph:  # decode in graph mode: every new token is text, written at the cursors
            if image is not None:
                raise ValueError("a text-key layer in graph mode takes text tokens only (image=None).")
            batch, n = key_states.shape[0], key_states.shape[-2]
            columns = (self._grow["values"].cursor + torch.arange(n, device=key_states.device)).expand(batch, n)
            out = self._write(keys=key_states, values=value_states,
                              image=torch.zeros(batch, n, dtype=torch.bool, device=key_states.device), columns=columns)
            return out["keys"], out["values"], out["image"]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, n, start = key_states.shape[0], key_states.shape[-2], self.get_seq_length()
        if image is None:  # all text: no boolean indexing, nothing read from the device
            text = key_states
            image = torch.zeros(batch, n, dtype=torch.bool, device=key_states.device)
            columns = torch.arange(start, start + n, device=key_states.device).expand(batch, n)
        else:
            counts = (~image).sum(dim=1)
            if bool((counts != counts[0]).any()):
                raise ValueError(
                    f"every sample of a batch must have the same number of image tokens, got text counts "
                    f"{counts.tolist()}."
                )
            text = key_states.transpose(1, 2)[~image]  # (B * n_text, H, d), row-major over (B, n)
            text = text.view(batch, -1, *text.shape[-2:]).transpose(1, 2)
            columns = (~image).nonzero()[:, 1].view(batch, -1) + start  # row-major: each row's text columns in order
        self._append(keys=text, values=value_states, image=image, columns=columns)
        return self.keys, self.values, self.image

    @property
    def text_columns(self) -> torch.Tensor:
        """Where each text key sits among the cached tokens (B, T_text); in graph mode the whole
        storage, whose unwritten slots point at the last storage column (masked, zero keys)."""
        return self._grow["columns"].storage if self.graph else self.columns

    def enter_graph(self, extra: int) -> None:
        super().enter_graph(extra)
        columns, values = self._grow["columns"], self._grow["values"]
        columns.storage.narrow(1, columns.length, columns.storage.shape[1] - columns.length).fill_(
            values.storage.shape[-2] - 1)

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a text-key cache layer cannot be cropped (its keys are not aligned with its tokens).")


def _cache_tensors(cache: Cache | Iterable) -> Iterable[torch.Tensor]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"kv_cache_bytes expects a transformers Cache, got {type(cache).__name__}.")
    for layer in layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                yield tensor


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def kv_cache_bytes(cache: Cache) -> int:
    """Bytes of the tokens a cache's key and value tensors hold, counting each tensor once.

    Two layers that hold the same tensor (shared KV) count it once: tensors are keyed by their
    data pointer, shape and strides, so equal views of one buffer are not counted twice. Under
    preallocation this is the valid tokens, not the spare storage (``kv_allocated_bytes``).
    """
    seen: set[tuple] = set()
    total = 0
    for tensor in _cache_tensors(cache):
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if key in seen:
            continue
        seen.add(key)
        total += _nbytes(tensor)
    return total


def kv_allocated_bytes(cache: Cache) -> int:
    """Bytes the cache's storage occupies (valid tokens plus preallocated room)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, GrowingLayer):
            total += layer.allocated_bytes()
        else:
            total += sum(_nbytes(t) for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                         if isinstance(t, torch.Tensor))
    return total


READ_TERMS = ("keys", "values", "scores")


def kv_read_terms(cache: Cache) -> dict[str, int]:
    """The KV bytes the last forward's attention moved, by term: ``keys`` and ``values``, every
    layer's own (a pruned layer's kept tokens, a lazy layer's values, a ``share="qkv"`` layer
    nothing) plus the keys a layer read from another (a recomputing lazy layer re-reads its
    anchor's); ``scores``, the attention scores and probabilities an anchor forms explicitly in
    decode so that its lazy layers can inherit them (written and read back by the anchor) and each
    lazy layer's read of them. A fused backend (SDPA, flash) never writes its scores: dense has none."""
    terms = dict.fromkeys(READ_TERMS, 0)
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                terms[name] += _nbytes(tensor)
        for name, n in (getattr(layer, "extra_reads", None) or {}).items():
            terms[name] += n
    return terms


def kv_read_bytes(cache: Cache) -> int:
    """The KV bytes the last forward's attention moved: the sum of ``kv_read_terms``."""
    return sum(kv_read_terms(cache).values())


_ROW_PADDING: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def pad_rows(cache: Cache, padding: dict[int, torch.Tensor]) -> None:
    """Record that, in each layer of ``padding``, every row of ``cache`` holds that many padding slots
    (a pruner whose rows keep different numbers of tokens pads the shorter ones)."""
    _ROW_PADDING[cache] = {**_ROW_PADDING.get(cache, {}), **padding}


def row_padding(cache: Cache) -> dict[int, torch.Tensor]:
    """Layer -> the padding slots of each row (``pad_rows``); {} where no row is padded."""
    return _ROW_PADDING.get(cache, {})
