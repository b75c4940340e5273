"""Lazy Attention with a Q Cache (after arXiv 2602.01901; our definition is in docs/methods.md).

Decoder layers are split into anchors and lazy layers; layer 0 is always an anchor and a lazy
layer's anchor is the nearest anchor before it. An anchor that has lazy dependants runs normal
attention and leaves its post-RoPE query and its (cached) keys in the Q Cache, one slot shared
by all layers and overwritten by the next anchor. A lazy layer computes only its value
projection and attends with ``Attn(Q_anchor, K_anchor, V_own)`` through the model's own
attention backend, with the same mask and scaling, so its attention probabilities are the
anchor's exactly. Its cache layer stores values only. The hooks are in ``lazyattn.attention``.

Two other readings of what a lazy layer shares are fields of the same method: ``share="qkv"``
(the anchor's keys *and* values: its attention output, through the lazy layer's own ``o_proj``;
the cache slot stores nothing), ``scope="visual"`` (the paper's VLA: only the image tokens' queries
and keys are the anchor's; text tokens' are the layer's own, and only their keys are cached) and
``scope="visual_scores"`` (our earlier reading: the scores over image-token keys come from the
anchor's query and keys, also for text queries).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from lazyattn.arch import attention_modules
from lazyattn.attention import check_reading, patch_attention
from lazyattn.base import Plan


READING_LABELS = {"qkv": "QKV", "visual": "VLA", "visual_scores": "visual-scores"}


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


def anchors_of(lazy: Sequence[int] | set[int], n_layers: int) -> dict[int, int]:
    """Lazy layer -> its anchor (the nearest preceding non-lazy layer), for any set of lazy layers."""
    lazy = set(lazy)
    out, current = {}, 0
    for layer in range(n_layers):
        if layer in lazy:
            out[layer] = current
        else:
            current = layer
    return out


def _check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0 and math.isfinite(ratio)):
        raise ValueError(f"ratio must be a number in [0, 1) (the fraction of lazy layers), got {ratio!r}.")


@dataclasses.dataclass
class LazyAttention:
    """Make some decoder layers lazy.

    ``layers``: explicit lazy layer indices; ``ratio``: the fraction of layers made lazy, placed
    by ``uniform_lazy_layers``. At least one is required. When both are given the explicit
    ``layers`` are used and ``ratio`` only records the budget the list was chosen for (e.g. by
    calibration).

    ``share``: what a lazy layer takes from its anchor. ``"qk"`` (default): the post-RoPE query
    and keys, ``Attn(Q_a, K_a, V_own)``; its cache keeps values only, so KV falls by
    ``n_lazy / (2 n_layers)``. ``"qkv"``: keys and values too, so its attention output is the
    anchor's, passed through its own ``o_proj``; its cache keeps nothing, KV falls by
    ``n_lazy / n_layers``.

    ``scope``: ``"all"`` (default; the paper's GLA) inherits the attention over every key;
    ``"visual"`` (the paper's VLA) takes the anchor's post-RoPE queries and keys for the image tokens
    only, text tokens using their own, with the layer's own values, in one attention call;
    ``"visual_scores"`` takes only the scores over image-token keys (anchor's query and image keys,
    for every query), the scores over text keys being the layer's own, in one softmax. Both visual
    scopes cache text-token keys and every value, so KV falls by
    ``n_lazy * n_image / (2 n_layers * n_tokens)``, and need ``share="qk"``.
    """

    layers: Sequence[int] | None = None
    ratio: float | None = None
    share: str = "qk"
    scope: str = "all"
    name = "lazy"

    def __post_init__(self) -> None:
        if self.layers is None and self.ratio is None:
            raise ValueError(
                "LazyAttention needs at least one of layers=[...] (lazy layer indices) or ratio=r; "
                "with both, the layers are used and ratio records the budget they were chosen for."
            )
        check_reading(self.share, self.scope)
        if self.ratio is not None:
            _check_ratio(self.ratio)
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Sequence):
                raise ValueError(f"lazy layers must be a list of layer indices like [3, 5, 7], got {self.layers!r}.")
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
        return {"layers": None if self.layers is None else list(self.layers), "ratio": self.ratio,
                "share": self.share, "scope": self.scope}

    def reading(self) -> str:
        """The label suffix of a non-default reading ("" for share=qk, scope=all)."""
        parts = [p for p, default in ((self.share, "qk"), (self.scope, "all")) if p != default]
        return "".join(f" {READING_LABELS.get(p, p)}" for p in parts)

    def label(self, n_layers: int) -> str:
        if self.layers is None:
            return f"Lazy{self.reading()} r={self.ratio:g} (uniform)"
        return f"Lazy{self.reading()} r={len(self.layers) / n_layers:g} (explicit)"

    def sort_key(self, n_layers: int) -> tuple:
        base = ("uniform", self.ratio) if self.layers is None else ("explicit", len(self.layers) / n_layers)
        # the default reading keeps its plain key; the other readings sort after it, grouped
        return base if not self.reading() else ("variant", self.share, self.scope, *base)

    def lazy_layers(self, n_layers: int) -> list[int]:
        """The lazy layer indices for a model with ``n_layers`` decoder layers, validated."""
        if self.layers is None:
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
        return anchors_of(self.lazy_layers(n_layers), n_layers)

    def variant(self) -> str:
        """The non-default reading in the settings' own words, e.g. " qkv", " visual" ("" for qk/all)."""
        return "".join(f" {p}" for p, default in ((self.share, "qk"), (self.scope, "all")) if p != default)

    def plan(self, n_layers: int) -> Plan:
        anchors = self.anchors(n_layers)
        return Plan(
            lazy_layers=tuple(anchors), anchors=anchors, share=self.share, scope=self.scope, reading=self.reading(),
            schedule=lazy_schedule(anchors, self.share, self.scope),
            series=f"lazy{self.variant()} ({'uniform' if self.layers is None else 'explicit'})",
        )

    @contextlib.contextmanager
    def apply(self, model: nn.Module):
        with patch_attention(model, self.anchors(len(attention_modules(model))), {}, self.share, self.scope):
            yield model


def lazy_schedule(anchors: dict[int, int], share: str, scope: str) -> str:
    """One phrase: the lazy layers, their anchors and the reading."""
    return (f"lazy layers {' '.join(map(str, anchors)) or 'none'} "
            f"(anchors {' '.join(f'{l}<-{a}' for l, a in anchors.items()) or 'none'}; share={share} scope={scope})")
