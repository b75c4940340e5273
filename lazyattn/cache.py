"""Cache pieces: the cache layers of lazy attention layers (values only; nothing; text keys and
all values), and an honest byte count of a cache."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers.cache_utils import Cache, DynamicLayer


class ValueOnlyLayer(DynamicLayer):
    """A dynamic cache layer for a lazy attention layer: it keeps values and no keys.

    ``update(None, values)`` appends values and returns ``(None, all_values)``; the keys a lazy
    layer attends with are its anchor's, which the anchor's own cache layer already holds.
    """

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = value_states.dtype, value_states.device
        self.values = value_states.new_empty((*value_states.shape[:-2], 0, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states is not None:
            raise ValueError("ValueOnlyLayer stores values only; call update(None, values).")
        if not self.is_initialized:
            self.lazy_initialization(None, value_states)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return None, self.values

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.values.shape[-2]

    def reset(self) -> None:
        self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove, as DynamicLayer.crop does.")
        if tokens_to_remove and self.is_initialized:
            self.values = self.values[..., :tokens_to_remove, :]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self.values = self.values[indices, ...]

    def offload(self):
        if self.is_initialized:
            self.values = self.values.to("cpu", non_blocking=True)

    def prefetch(self):
        if self.is_initialized and self.values.device != self.device:
            self.values = self.values.to(self.device, non_blocking=True)


class NoKVLayer(DynamicLayer):
    """The cache layer of a lazy layer that shares its anchor's keys *and* values (``share="qkv"``):
    it stores no tensor, only how many tokens it has seen (so masks and lengths stay right)."""

    def lazy_initialization(self, key_states, value_states) -> None:
        self.length = 0
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise ValueError("NoKVLayer stores nothing; call advance(n_tokens).")

    def advance(self, n_tokens: int) -> None:
        if not self.is_initialized:
            self.lazy_initialization(None, None)
        self.length += n_tokens

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove, as DynamicLayer.crop does.")
        if self.is_initialized:
            self.length = max(0, self.length + tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        pass

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        pass

    def offload(self):
        pass

    def prefetch(self):
        pass


class TextKeyLayer(ValueOnlyLayer):
    """The cache layer of a lazy layer that inherits only the attention over image tokens
    (``scope="visual"``): values of every token, keys of the text tokens only.

    ``keys`` holds the text tokens' keys in their order (B, H, T_text, d); ``image`` (B, T) says
    which of the cached tokens are image tokens. Every sample of a batch has the same number of
    image tokens, so the text keys of a batch form one tensor.
    """

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys = key_states.new_empty((*key_states.shape[:-2], 0, key_states.shape[-1]))
        self.image = torch.zeros(key_states.shape[0], 0, dtype=torch.bool, device=key_states.device)

    def update(self, key_states, value_states, image=None, *args, **kwargs):
        """Append the new tokens (``image``: (B, n) bool, their image flags); returns the text keys,
        all values and the image flags of every cached token."""
        if image is None or key_states is None:
            raise ValueError("TextKeyLayer.update takes keys, values and the new tokens' image flags.")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        counts = (~image).sum(dim=1)
        if bool((counts != counts[0]).any()):
            raise ValueError(
                f"every sample of a batch must have the same number of image tokens, got text counts {counts.tolist()}."
            )
        text = key_states.transpose(1, 2)[~image]  # (B * n_text, H, d), row-major over (B, n)
        text = text.view(key_states.shape[0], -1, *text.shape[-2:]).transpose(1, 2)
        self.keys = torch.cat([self.keys, text], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.image = torch.cat([self.image, image], dim=1)
        return self.keys, self.values, self.image

    def reset(self) -> None:
        super().reset()
        self.keys = self.image = None

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a text-key cache layer cannot be cropped (its keys are not aligned with its tokens).")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            super().reorder_cache(beam_idx)
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
            self.image = self.image.index_select(0, beam_idx.to(self.image.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            super().batch_repeat_interleave(repeats)
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.image = self.image.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            super().batch_select_indices(indices)
            self.keys, self.image = self.keys[indices, ...], self.image[indices, ...]


def _cache_tensors(cache: Cache | Iterable) -> Iterable[torch.Tensor]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"kv_cache_bytes expects a transformers Cache, got {type(cache).__name__}.")
    for layer in layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                yield tensor


def kv_cache_bytes(cache: Cache) -> int:
    """Bytes held by a cache's key and value tensors, counting each tensor once.

    Two layers that hold the same tensor (shared KV) count it once: tensors are keyed by their
    data pointer, shape and strides, so equal views of one buffer are not counted twice.
    """
    seen: set[tuple] = set()
    total = 0
    for tensor in _cache_tensors(cache):
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total
