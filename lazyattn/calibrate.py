"""Choosing lazy layers from the model's own attention (docs/methods.md, "Calibration").

The dense model runs on a few batches with eager attention; every layer's attention is averaged
over heads, and for every pair of layers (i < j) we take the Jensen-Shannon divergence between
their attention distributions, per query row over the rows that are real tokens, averaged over
rows and samples. Selection is greedy and deterministic: starting from all anchors, make lazy the
layer whose change adds the least divergence between lazy layers and their anchors, until a
budget (``ratio``) is met or the next layer's divergence to its anchor exceeds ``threshold``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from lazyattn.arch import attention_modules


@dataclasses.dataclass
class Calibration:
    lazy_layers: list[int]
    divergence: list[list[float]]  # n x n, symmetric, JS divergence between layers i and j (nats)

    @property
    def adjacent(self) -> list[float]:
        """JS divergence of each layer l >= 1 to layer l - 1 (the paper's Fig. 2)."""
        return [self.divergence[l - 1][l] for l in range(1, len(self.divergence))]


@contextlib.contextmanager
def _eager(model: nn.Module):
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Row-wise JS divergence of two [..., T] distributions (float64, zeros handled)."""
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), 0.0).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@torch.no_grad()
def layer_divergence(model: nn.Module, batches: Iterable[dict]) -> torch.Tensor:
    n = len(attention_modules(model))
    total = torch.zeros(n, n, dtype=torch.float64)
    rows = 0
    with _eager(model):
        for batch in batches:
            out = model(**batch, output_attentions=True, use_cache=False)
            attn = torch.stack([a.double().mean(1) for a in out.attentions])  # [n, B, T, T]
            valid = batch["attention_mask"].bool()  # rows of real tokens only
            for i in range(n):
                for j in range(i + 1, n):
                    d = _js(attn[i], attn[j])[valid].sum()
                    total[i, j] += d
                    total[j, i] += d
            rows += int(valid.sum())
    return total / max(rows, 1)


def select_lazy_layers(divergence: torch.Tensor, ratio: float | None = None, threshold: float | None = None) -> list[int]:
    if (ratio is None) == (threshold is None):
        raise ValueError("select_lazy_layers takes exactly one of ratio (a budget) or threshold.")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}.")
    n = divergence.shape[0]
    budget = n - 1 if ratio is None else min(int(round(ratio * n)), n - 1)
    lazy: set[int] = set()

    def anchor_of(layer: int, lazy_set: set[int]) -> int:
        a = layer - 1
        while a in lazy_set:
            a -= 1
        return a

    def cost(lazy_set: set[int]) -> float:
        return sum(float(divergence[anchor_of(l, lazy_set), l]) for l in lazy_set)

    while len(lazy) < budget:
        base = cost(lazy)
        candidates = [(cost(lazy | {l}) - base, l) for l in range(1, n) if l not in lazy]
        _, layer = min(candidates)
        if threshold is not None and float(divergence[anchor_of(layer, lazy), layer]) > threshold:
            break
        lazy.add(layer)
    return sorted(lazy)


def calibrate(
    model: nn.Module, batches: Iterable[dict], ratio: float | None = None, threshold: float | None = None
) -> Calibration:
    div = layer_divergence(model, batches)
    return Calibration(lazy_layers=select_lazy_layers(div, ratio, threshold), divergence=div.tolist())
