"""LLaVA-PruMerge and PruMerge+ (Shang et al. 2024): image tokens pruned and merged before the LLM.

After the released code (github.com/42Shawn/LLaVA-PruMerge, ``clip_encoder.py``,
``token_prune_merge_advanced[_plus]``); every rule and choice is in docs/methods.md. Per image:

1. [CLS]-to-patch attention of the CLIP layer that reads LLaVA's features (the last layer for
   ``vision_feature_layer=-2``): one full-width attention, ``softmax(q_cls . k / sqrt(C))`` over
   every token, the patch columns.
2. Kept tokens: the outliers, attention above ``Q3 + iqr * (Q3 - Q1)`` (quartiles with linear
   interpolation), ranked by attention; at least one. PruMerge+ adds the spatially uniform samples
   ``0, s, 2s, ... < N - 1`` with ``s = max(1, (N // n_outliers) // 3)`` not already kept.
3. Each kept token becomes ``x_i + sum_j a_j x_j`` over its ``neighbours`` most key-similar
   other tokens (cosine of the layer's keys), ``a_j`` their [CLS] attention (not renormalised),
   ``neighbours`` being the release's 32 of 576 tokens: on another token count ``N`` the same
   fraction, ``max(1, round(32 N / 576))`` (``neighbours_rule="scaled"``, the default), or the
   harness's earlier ``min(32, N - 1)`` (``neighbours_rule="capped"``),
   ``x`` the features LLaVA takes (``hidden_states[-2]``, pre-projector). One extra token,
   ``sum_j a_j x_j`` over the pruned tokens, follows when any token was pruned.
4. The projector maps the reduced features; the LLM sees them in place of the image's tokens,
   in the released order (outliers by attention, then the samples, then the extra token) or in
   raster order (``order="spatial"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from lazyattn.engine import Stage, TokenPruner
from lazyattn.vision import (
    capture_layers,
    captured_input,
    check_family,
    cls_attention,
    feature_layer_index,
    image_token_spans,
    model_family,
    reduced_sequence,
    vision_encoder_layers,
)


def iqr_outliers(attn: torch.Tensor, factor: float) -> torch.Tensor:
    """(N,) bool: attention above ``Q3 + factor * IQR`` (``factor=-inf``: every token)."""
    if factor == -math.inf:
        return torch.ones_like(attn, dtype=torch.bool)
    q1, q3 = torch.quantile(attn.double(), torch.tensor([0.25, 0.75], dtype=torch.float64, device=attn.device))
    return attn.double() > q3 + factor * (q3 - q1)


def uniform_samples(n: int, n_outliers: int) -> torch.Tensor:
    """PruMerge+'s spatially uniform samples: ``0, s, 2s, ... < n - 1``, ``s = max(1, (n // n_outliers) // 3)``."""
    step = max(1, (n // max(n_outliers, 1)) // 3)
    return torch.arange(0, n - 1, step)


RELEASED_TOKENS = 576  # the release merges 32 neighbours out of LLaVA-1.5's 576 image tokens
NEIGHBOURS_RULES = ("scaled", "capped")


def neighbour_count(neighbours: int, n: int, rule: str = "scaled") -> int:
    """How many other tokens each kept token merges, of ``n``: ``scaled`` keeps the release's
    fraction (``neighbours`` of 576), ``max(1, round(neighbours * n / 576))``, so 32 at 576 and 1 at
    16 (a count of 32 cannot apply to 16 tokens: capped, every kept token would absorb all the others);
    ``capped`` is ``min(neighbours, n - 1)``. Never more than ``n - 1``; ``neighbours=0``: none."""
    if neighbours == 0:
        return 0
    k = max(1, round(neighbours * n / RELEASED_TOKENS)) if rule == "scaled" else neighbours
    return min(k, n - 1)


def prumerge_image(features: torch.Tensor, attn: torch.Tensor, keys: torch.Tensor, plus: bool, iqr: float,
                   neighbours: int, order: str, neighbours_rule: str = "scaled") -> tuple[torch.Tensor, torch.Tensor]:
    """One image's reduced features (K [+ 1], C) and the kept tokens' indices (K,), in output order.

    ``features`` (N, C) LLaVA's features, ``attn`` (N,) [CLS] attention, ``keys`` (N, C')."""
    n = attn.shape[0]
    outliers = iqr_outliers(attn, iqr)
    n_out = max(1, int(outliers.sum()))
    kept = attn.topk(n_out).indices  # by attention, highest first
    if plus and n_out < n:
        samples = uniform_samples(n, n_out).to(attn.device)
        samples = samples[~torch.isin(samples, kept)]
        kept = torch.cat([kept, samples])
    if order == "spatial":
        kept = kept.sort().values
    wide = torch.promote_types(features.dtype, torch.float32)  # half -> float32; float64 stays
    feats = features.to(wide)
    out = feats[kept]
    k = neighbour_count(neighbours, n, neighbours_rule)
    if k > 0:
        unit = F.normalize(keys.to(wide), dim=-1)
        sim = unit[kept] @ unit.T  # (K, N)
        sim[torch.arange(len(kept), device=sim.device), kept] = -math.inf  # a token is not its own neighbour
        near = sim.topk(k, dim=-1).indices  # (K, k)
        out = out + (attn.to(wide)[near][..., None] * feats[near]).sum(dim=1)
    pruned = torch.ones(n, dtype=torch.bool, device=attn.device)
    pruned[kept] = False
    if bool(pruned.any()):
        extra = (attn.to(wide)[pruned][:, None] * feats[pruned]).sum(dim=0, keepdim=True)
        out = torch.cat([out, extra])
    return out, kept


@dataclasses.dataclass
class PruMerge(TokenPruner):
    """PruMerge+ (``plus=True``) or PruMerge: per image, the [CLS]-attention outliers (plus uniform
    samples), each merged with its ``neighbours`` most key-similar tokens, and one token merging
    the pruned ones, replace the image's tokens before the language model (LLaVA families)."""

    plus: bool = True
    iqr: float = 1.5
    neighbours: int = 32
    order: str = "released"
    neighbours_rule: str = "scaled"
    name = "prumerge_plus"
    positions = "contiguous"
    equal_image_counts = False
    families = ("llava",)

    def __post_init__(self) -> None:
        if not isinstance(self.plus, bool):
            raise ValueError(f"PruMerge plus must be true (PruMerge+) or false (PruMerge), got {self.plus!r}.")
        if isinstance(self.iqr, bool) or not isinstance(self.iqr, (int, float)) or math.isnan(self.iqr) or self.iqr == math.inf:
            raise ValueError(f"PruMerge iqr (outliers lie above Q3 + iqr * IQR) must be a number or -inf (keep every "
                             f"token), got {self.iqr!r}.")
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 0:
            raise ValueError(f"PruMerge neighbours (merged into each kept token) must be an integer >= 0, got {self.neighbours!r}.")
        if self.neighbours_rule not in NEIGHBOURS_RULES:
            raise ValueError(f"PruMerge neighbours_rule must be 'scaled' (the release's 32 of 576 as a fraction of the "
                             f"image's tokens) or 'capped' (min(neighbours, N - 1)), got {self.neighbours_rule!r}.")
        if self.order not in ("released", "spatial"):
            raise ValueError(f"PruMerge order must be 'released' (by attention, then the samples) or 'spatial', got {self.order!r}.")

    def params(self) -> dict[str, Any]:
        return {"plus": self.plus, "iqr": self.iqr, "neighbours": self.neighbours, "order": self.order,
                "neighbours_rule": self.neighbours_rule}

    def label(self, n_layers: int) -> str:
        base = "PruMerge+" if self.plus else "PruMerge"
        extra = [] if self.iqr == 1.5 else [f"iqr={self.iqr:g}"]
        extra += [] if self.neighbours == 32 else [f"k={self.neighbours}"]
        extra += [] if self.order == "released" else [self.order]
        extra += [] if self.neighbours_rule == "scaled" else ["k capped"]  # the harness's earlier count
        return " ".join([base, *extra])

    def sort_key(self, n_layers: int) -> tuple:
        return (not self.plus, self.iqr, -self.neighbours, self.order, self.neighbours_rule != "scaled")

    def stage_layers(self, n_layers: int) -> list[tuple[int, int]]:
        return [(None, 0)]

    def attention_layer(self, model) -> int:
        index = feature_layer_index(model)
        n = len(vision_encoder_layers(model))
        if index >= n:
            raise ValueError("PruMerge reads the attention of the vision layer after LLaVA's feature layer; this model "
                             f"takes its features from the tower's last layer (vision_feature_layer={model.config.vision_feature_layer}).")
        return index

    @contextlib.contextmanager
    def hooks(self, engine):
        check_family(self.name, self.families, model_family(engine.model))
        with capture_layers(engine.model, engine, [self.attention_layer(engine.model)]):
            yield

    def begin(self, engine, base: Stage, embeds: torch.Tensor):
        model = engine.model
        index = self.attention_layer(model)
        hidden = captured_input(engine, index)  # (images, 1 + N, C): LLaVA's features with [CLS]
        attn, keys = cls_attention(vision_encoder_layers(model)[index], hidden, heads=False)
        projector = model.model.multi_modal_projector
        reduced, kept = [], []
        for i in range(hidden.shape[0]):
            feats, idx = prumerge_image(hidden[i, 1:], attn[i], keys[i], self.plus, self.iqr, self.neighbours, self.order,
                                         self.neighbours_rule)
            reduced.append(projector(feats.to(hidden.dtype)))
            kept.append(idx)
        spans = image_token_spans(base, [hidden.shape[1] - 1] * hidden.shape[0])
        return {"reduced": reduced, "kept": kept, "spans": spans}

    def select(self, engine, state, stage_idx, scores, prev: Stage, hidden):
        items, merged, k = [], [], 0
        for spans in state["spans"]:
            row, vectors = [], []
            offset = 0
            for i in range(len(spans)):
                r = state["reduced"][k]
                row.extend((i, -(offset + j) - 1) for j in range(r.shape[0]))
                vectors.append(r)
                offset += r.shape[0]
                k += 1
            items.append(row)
            merged.append(torch.cat(vectors) if vectors else None)
        return reduced_sequence(prev, items, state["spans"], merged, hidden.dtype)
