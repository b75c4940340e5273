"""VTW, visual tokens withdrawal (AAAI 2025): from layer ``k`` on, every image token is withdrawn.

Layers ``0 .. k-1`` see every token; layers ``k ..`` carry and cache the text tokens only (the
generated tokens included), at their original positions. This is FastV at ratio 1, with no
ranking to do, so it runs on the pruning engine (``lazyattn.engine``): one stage whose kept
tokens are the non-image ones. It needs no attention matrix and keeps every layer on the
model's attention backend (flash attention included) and the standard KV cache.

VTW chooses ``k`` on a few samples as the earliest layer whose output distribution stays within
a KL threshold of the dense model's: ``choose_withdrawal_layer`` does that here, for the
harness's ``method.k=auto``. ``k = n_layers`` withdraws nothing: the dense model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lazyattn.arch import decoder_layers
from lazyattn.engine import Stage, TokenPruner


@dataclasses.dataclass
class VTW(TokenPruner):
    """Withdraw every image token from layer ``k`` on (``k = n_layers``: nothing withdrawn)."""

    k: int = 16
    name = "vtw"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(
                f"VTW k must be an integer >= 1 (layers 0..k-1 see the image tokens), got {self.k!r}; "
                "the harness also takes method.k=auto (chosen on the val split by KL to dense)."
            )

    def params(self) -> dict[str, Any]:
        return {"k": self.k}

    def label(self, n_layers: int) -> str:
        return f"VTW K={self.k}"

    def sort_key(self, n_layers: int) -> tuple:
        return (-self.k,)  # later withdrawal, closer to dense: first

    def schedule(self, n_layers: int) -> str:
        return f"VTW: image tokens withdrawn from layer {self.k} on"

    def stage_layers(self, n_layers: int) -> list[tuple[int, int]]:
        if self.k > n_layers:
            raise ValueError(
                f"VTW k={self.k} is out of range: this model has {n_layers} decoder layers "
                f"(1 <= k <= {n_layers}; k = {n_layers} withdraws nothing)."
            )
        return [] if self.k == n_layers else [(self.k - 1, self.k)]

    def score_tokens(self, engine, state, stage_idx, module, query, key, stage: Stage) -> torch.Tensor:
        return torch.zeros(stage.real.shape, device=query.device)  # nothing is ranked

    def select(self, engine, state, stage_idx, scores, prev: Stage, hidden):
        kept = ~prev.image
        return kept.nonzero()[:, 1].view(kept.shape[0], -1), None


def _next_token_log_probs(model: nn.Module, batch: dict) -> torch.Tensor:
    """Log-probabilities of the token after each prompt (B, vocab), float64."""
    logits = model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1]
    return torch.log_softmax(logits.double(), dim=-1)


@torch.no_grad()
def withdrawal_kl(model: nn.Module, batches: Iterable[dict]) -> list[float]:
    """``KL(dense || VTW(k))`` of the next-token distribution after the prompt, averaged over the
    prompts, for every ``k = 1 .. n_layers`` (the last is 0: nothing withdrawn)."""
    n_layers = len(decoder_layers(model))
    batches = list(batches)
    total = torch.zeros(n_layers, dtype=torch.float64)
    count = 0
    for batch in batches:
        dense = _next_token_log_probs(model, batch)
        for k in range(1, n_layers):
            with VTW(k=k).apply(model):
                withdrawn = _next_token_log_probs(model, batch)
            total[k - 1] += (dense.exp() * (dense - withdrawn)).sum().item()  # a CUDA scalar into a CPU sum
        count += dense.shape[0]
    return (total / max(count, 1)).tolist()


def choose_withdrawal_layer(kl: list[float], threshold: float) -> int:
    """The earliest ``k`` whose KL to dense (``withdrawal_kl``) is within ``threshold``, and from
    which every later layer is too (so withdrawing later never costs more than the chosen ``k``)."""
    if not (isinstance(threshold, (int, float)) and threshold >= 0):
        raise ValueError(f"the VTW KL threshold must be a number >= 0, got {threshold!r}.")
    k = len(kl)
    while k > 1 and kl[k - 2] <= threshold:
        k -= 1
    return k
