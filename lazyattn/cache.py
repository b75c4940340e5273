"""Cache pieces: a cache layer that stores values only, and an honest byte count of a cache."""

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
