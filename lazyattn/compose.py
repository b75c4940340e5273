"""Combining methods: Lazy Attention with a token pruner (FastV, SparseVLM, VTW, PruMerge+ or HiRED).

``compose(LazyAttention(...), FastV(...))`` is a method like the others. Both parts run in the
same forward: lazy layers reuse their anchor's query and keys, and the pruner carries fewer
tokens from its first pruned layers on. A lazy layer and its anchor must see the same tokens,
so no layer where pruning takes effect may be lazy (it must be an anchor):

- lazy layers given explicitly (``layers=[...]``) that include such a layer are refused with
  an error naming the layer;
- lazy layers chosen by ``ratio`` are adjusted: each conflicting layer moves to the nearest
  later (else earlier) layer that is neither lazy, nor layer 0, nor a pruning layer, so the
  number of lazy layers stays ``round(ratio * n)``.

The plan is a pure function of the method and the model's depth: ``lazy_layers(n_layers)``
gives the layers ``apply`` makes lazy, and the method never changes (``params()`` is the same
before and after use).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from torch import nn

from lazyattn.arch import attention_modules
from lazyattn.engine import TokenPruner, run_pruner
from lazyattn.base import Plan
from lazyattn.lazy import LazyAttention, anchors_of, lazy_schedule


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
    """Lazy Attention and a token pruner in the same forward; build it with ``compose``."""

    lazy: LazyAttention
    pruner: TokenPruner

    @property
    def name(self) -> str:
        return f"lazy_{self.pruner.name}"

    def params(self) -> dict[str, Any]:
        return {"lazy": self.lazy.params(), self.pruner.name: self.pruner.params()}

    def parts(self) -> dict[str, Any]:
        """Its two methods by their settings' names: ``{"lazy": ..., "<pruner>": ...}``."""
        return {"lazy": self.lazy, self.pruner.name: self.pruner}

    def part_labels(self, n_layers: int) -> dict[str, str]:
        """The label of each part as the composed label shows it (``label`` joins them with " + ")."""
        if self.lazy.layers is not None:
            first = f"Lazy{self.lazy.reading()} {list(self.lazy.layers)}"
        else:
            first = f"Lazy{self.lazy.reading()} r={self.lazy.ratio:g}"
        return {"lazy": first, self.pruner.name: self.pruner.label(n_layers)}

    def label(self, n_layers: int) -> str:
        return " + ".join(self.part_labels(n_layers).values())

    def sort_key(self, n_layers: int) -> tuple:
        return (self.lazy.sort_key(n_layers), self.pruner.sort_key(n_layers))

    def lazy_layers(self, n_layers: int) -> list[int]:
        """The layers ``apply`` makes lazy in an ``n_layers`` model (none where pruning takes effect)."""
        return resolve_lazy_layers(self.lazy, self.pruner.first_layers(n_layers), n_layers)

    def plan(self, n_layers: int) -> Plan:
        pruned = self.pruner.plan(n_layers)
        anchors = anchors_of(self.lazy_layers(n_layers), n_layers)
        return dataclasses.replace(
            pruned, lazy_layers=tuple(anchors), anchors=anchors, share=self.lazy.share, scope=self.lazy.scope,
            reading=self.lazy.reading(), schedule=f"{lazy_schedule(anchors, self.lazy.share, self.lazy.scope)}; "
            f"{pruned.schedule}", series=f"{self.name}{self.lazy.variant()}",
        )

    @contextlib.contextmanager
    def apply(self, model: nn.Module):
        n_layers = len(attention_modules(model))
        anchor_of = LazyAttention(layers=self.lazy_layers(n_layers)).anchors(n_layers)
        with run_pruner(model, self.pruner, anchor_of, self.lazy.share):
            yield model


def compose(*methods) -> Composed:
    """Lazy Attention plus one token pruner; the order of the arguments does not matter."""
    lazies = [m for m in methods if isinstance(m, LazyAttention)]
    pruners = [m for m in methods if isinstance(m, TokenPruner)]
    if len(lazies) != 1 or len(pruners) != 1 or len(methods) != 2:
        raise ValueError(
            "compose takes exactly one LazyAttention and one token pruner (FastV, SparseVLM, VTW, PruMerge or HiRED), got "
            f"{[type(m).__name__ for m in methods]}."
        )
    if lazies[0].scope != "all":
        raise ValueError(
            f"Lazy Attention scope='{lazies[0].scope}' cannot be composed with token pruning yet (pruning changes which "
            "columns are image tokens); compose scope='all' (share='qk' or 'qkv')."
        )
    return Composed(lazies[0], pruners[0])
