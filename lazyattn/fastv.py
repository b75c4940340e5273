"""FastV (Chen et al., ECCV 2024): one pruning stage after layer ``k - 1``; see docs/methods.md."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from lazyattn.engine import Stage, TokenPruner, attention_rows


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}.")


@dataclasses.dataclass
class FastV(TokenPruner):
    """FastV: after layer ``k - 1``, drop a fraction ``ratio`` of the image tokens, ranked by the
    attention they receive in layer ``k - 1`` (head-averaged) from the last prompt token
    (``score="last_token"``, as released) or averaged over all prompt tokens (``score="mean"``,
    as the paper's text says). Layers ``k ..`` carry the kept tokens only, at their original
    positions.
    """

    k: int = 2
    ratio: float = 0.5
    score: str = "last_token"
    name = "fastv"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"FastV k must be an integer >= 1 (layers 0..k-1 see every token), got {self.k!r}.")
        _check_fraction("FastV ratio (the fraction of image tokens dropped)", self.ratio)
        if self.score not in ("last_token", "mean"):
            raise ValueError(f"FastV score must be 'last_token' or 'mean', got {self.score!r}.")

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "ratio": self.ratio, "score": self.score}

    def label(self, n_layers: int) -> str:
        return f"FastV K={self.k} R={self.ratio:g}"

    def sort_key(self, n_layers: int) -> tuple:
        return (self.k, self.ratio)

    def schedule(self, n_layers: int) -> str:
        return f"FastV: after layer {self.k - 1} drop {self.ratio:.0%} of the image tokens (ranked by {self.score} attention)"

    def stage_layers(self, n_layers: int) -> list[tuple[int, int]]:
        if self.k >= n_layers:
            raise ValueError(f"FastV k={self.k} is out of range: this model has {n_layers} decoder layers (1 <= k < {n_layers}).")
        return [(self.k - 1, self.k)]

    def n_keep(self, n_image: int) -> int:
        return int(round(n_image * (1 - self.ratio)))

    def score_tokens(self, engine, state, stage_idx, module, query, key, stage: Stage) -> torch.Tensor:
        batch, length = stage.real.shape
        if self.score == "last_token":
            rows = torch.full((batch, 1), length - 1, device=query.device)
            return attention_rows(module, query, key, rows, stage.real)[:, 0]
        total = torch.zeros(batch, length, device=query.device)
        for start in range(0, length, 256):  # a block of rows at a time: never the whole matrix
            rows = torch.arange(start, min(length, start + 256), device=query.device)[None].expand(batch, -1)
            probs = attention_rows(module, query, key, rows, stage.real)
            weight = stage.real[:, start : start + rows.shape[1]].float()
            total += (probs * weight[..., None]).sum(dim=1)
        return total / stage.real.sum(dim=1, keepdim=True).clamp(min=1)

    def select(self, engine, state, stage_idx, scores, prev: Stage, hidden):
        n_image = int(prev.image[0].sum())
        keep = self.n_keep(n_image)
        ranked = scores.masked_fill(~prev.image, float("-inf"))
        top = ranked.topk(keep, dim=1).indices if keep else ranked[:, :0].long()
        kept = ~prev.image
        kept = kept.scatter(1, top, True)
        index = kept.nonzero()[:, 1].view(kept.shape[0], -1)
        return index, None
