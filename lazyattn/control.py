"""``ExplicitDense``: the dense model with every layer's decode attention formed explicitly, the
control that says how much of a lazy decode speed-up is the attention backend.

A Lazy Attention anchor hands its attention probabilities on to its lazy layers, so in decode
(short queries) it forms them explicitly (scores, softmax, then probabilities times values)
where dense runs the backend's fused kernel (SDPA, flash), which never writes a score. Timed
beside dense, this method prices that difference alone: same weights, same cache, same answers
(up to rounding), every layer paying what an anchor pays. The fused alternative, attention that
also returns its log-sum-exp, does not help: forming the probabilities from it needs the scores
again, which reads the anchor's keys, the traffic a lazy layer exists to avoid.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from torch import nn

from lazyattn.attention import patch_attention
from lazyattn.base import Plan


@dataclasses.dataclass
class ExplicitDense:
    """Dense, with explicit decode attention in every layer (anchors' cost, no lazy layer); no settings.
    A method of its own, not a kind of ``Dense``: it runs other code, and nothing that asks whether a
    method is the reference may take it for one."""

    name = "dense_explicit"

    def params(self) -> dict[str, Any]:
        return {}

    def sort_key(self, n_layers: int) -> tuple:
        return ()

    def label(self, n_layers: int) -> str:
        return "Dense (explicit decode attn)"

    def plan(self, n_layers: int) -> Plan:
        return Plan(schedule="every layer forms its decode attention explicitly, as an anchor does (a control)",
                    series="dense_explicit")

    @contextlib.contextmanager
    def apply(self, model: nn.Module):
        with patch_attention(model, {}, {}, explicit=True):
            yield model
