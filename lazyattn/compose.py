"""Combining methods: Lazy Attention with a token pruner (FastV or SparseVLM).

``compose(LazyAttention(...), FastV(...))`` is a method like the others. Both parts run in the
same forward: lazy layers reuse their anchor's query and keys, and the pruner carries fewer
tokens from its first pruned layers on. A lazy layer and its anchor must see the same tokens,
so no layer where pruning takes effect may be lazy (it must be an anchor):

- lazy layers given explicitly (``layers=[...]``) that include such a layer are refused with
  an error naming the layer;
- lazy layers chosen by ``ratio`` are adjusted: each conflicting layer moves to the nearest
  later (else earlier) layer that is neither lazy, nor layer 0, nor a pruning layer, so the
  number of lazy layers stays ``round(ratio * n)``. The final lists are in ``params()`` after use.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from lazyattn.arch import attention_modules
from lazyattn.lazy import LazyAttention
from lazyattn.prune import TokenPruner, run_pruner


def resolve_lazy_layers(lazy: LazyAttention, forbidden: list[int], n_layers: int) -> list[int]:
    """``lazy``'s layers for an ``n_layers`` model, with no layer in ``forbidden`` (see module doc)."""
    layers = lazy.lazy_layers(n_layers)
    clash = sorted(set(layers) & set(forbidden))
    if not clash:
        return layers
    if lazy.layers is not None:
        raise ValueError(
            f"lazy layers {clash} are layers where token pruning takes effect ({sorted(forbidden)}): a lazy layer "
            "and its anchor must see the same tokens. Remove them from the lazy layers or move the pruning layer."
        )
    chosen = [x for x in layers if x not in clash]
    for layer in clash:
        free = [x for x in range(1, n_layers) if x not in chosen and x not in forbidden]
        if not free:
            raise ValueError(f"cannot place {len(layers)} lazy layers in {n_layers} layers avoiding {sorted(forbidden)}.")
        later = [x for x in free if x > layer]
        chosen.append(min(later) if later else max(free))
    return sorted(chosen)


@dataclasses.dataclass
class Composed:
    lazy: LazyAttention
    pruner: TokenPruner
    resolved_layers: list[int] | None = None

    @property
    def name(self) -> str:
        return f"lazy_{self.pruner.name}"

    def params(self) -> dict[str, Any]:
        return {
            "lazy": {**self.lazy.params(), "resolved_layers": self.resolved_layers},
            self.pruner.name: self.pruner.params(),
        }

    def lazy_layers(self, n_layers: int) -> list[int]:
        return resolve_lazy_layers(self.lazy, self.pruner.first_layers(n_layers), n_layers)

    def apply(self, model: nn.Module):
        n_layers = len(attention_modules(model))
        self.resolved_layers = self.lazy_layers(n_layers)
        return run_pruner(model, self.pruner, LazyAttention(layers=self.resolved_layers).anchors(n_layers))


def compose(*methods) -> Composed:
    """Lazy Attention plus one token pruner; the order of the arguments does not matter."""
    lazies = [m for m in methods if isinstance(m, LazyAttention)]
    pruners = [m for m in methods if isinstance(m, TokenPruner)]
    if len(lazies) != 1 or len(pruners) != 1 or len(methods) != 2:
        raise ValueError(
            "compose takes exactly one LazyAttention and one token pruner (FastV or SparseVLM), got "
            f"{[type(m).__name__ for m in methods]}."
        )
    return Composed(lazies[0], pruners[0])
