"""SparseVLM (Zhang et al., ICML 2025), after its v1.5 reference: text raters, pruning stages
after the scoring layers, recycling of dropped tokens by DPC-kNN; see docs/methods.md."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from lazyattn.base import Plan
from lazyattn.engine import Stage, TokenPruner, attention_rows


# SparseVLM v1.5's kept visual tokens after its three pruning layers, per named budget, for
# LLaVA-1.5's 576 image tokens (Gumpest/SparseVLMs score.py); scaled to other image-token counts.
SPARSEVLM_SCHEDULES: dict[int, tuple[int, ...]] = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
SPARSEVLM_LAYERS_32 = (2, 6, 15)  # v1.5's scoring layers, for every model (scaled only where a model is too shallow)
# The paper's rank rule (the pre-v1.5 code, Gumpest/SparseVLMs 91fb6d9): four scoring layers, and per budget
# the constants of its benchmark scripts, keep = min(int(rank * scale + bias), V - 1).
RANK_LAYERS = (2, 6, 15, 19)
RANK_CONSTANTS: dict[int, tuple[float, float]] = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}
SCHEDULES = ("v1.5", "rank")


def rank_keep_count(rank: int, n_visual: int, scale: float, bias: float) -> int:
    """The rank rule's kept visual tokens at one scoring layer: ``min(int(rank * scale + bias), V - 1)``
    (``int`` truncates toward zero; at least 0), or all ``V`` when the rater attention has full rank
    ``V`` (the code then prunes nothing at that layer)."""
    if rank == n_visual:
        return n_visual
    return max(0, min(int(rank * scale + bias), n_visual - 1))


@dataclasses.dataclass
class SparseVLMPrompt:
    """SparseVLM's per-prompt state, kept by the engine: kept visual tokens per stage, and each
    sample's rater rows (indices into the prompt)."""

    counts: list[int]
    raters: list[torch.Tensor]
    ranks: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # rank rule: stage -> per-sample rank


@dataclasses.dataclass
class SparseVLM(TokenPruner):
    """SparseVLM (Zhang et al., ICML 2025), after its v1.5 reference.

    Raters: before layer 0, the text tokens after the image with above-average
    ``softmax(V T^T, dim=text).mean(visual)`` on the input embeddings. At each scoring layer
    ``p`` in ``layers`` (LLaVA-1.5: 2, 6, 15; by default scaled to the model's depth), the
    layer's own attention from the rater rows to the visual columns (head-averaged, averaged
    over raters) ranks the visual tokens; the top ``keep[i]`` stay and layers ``p + 1 ..`` carry
    only them. Recycling: the top ``recycle`` fraction of the dropped tokens (``int(0.3 m) + 1``)
    are clustered by DPC-kNN into ``int(n/10) + 1`` centres and each cluster's mean hidden state
    is inserted after the kept visual tokens (they count as visual tokens from then on).
    Positions are re-indexed contiguously (``positions="contiguous"``, as v1.5 does).

    ``schedule`` says how many visual tokens each scoring layer keeps: ``"v1.5"`` (default), the fixed
    counts of the v1.5 code per named ``budget`` (192, 128 or 64 for 576 image tokens, scaled to the
    model's image-token count), or ``keep`` (explicit counts per stage); ``"rank"``, the paper's rule
    (the pre-v1.5 code): per sample and scoring layer, ``min(int(rank * scale + bias), V - 1)`` with
    ``rank`` the matrix rank of the head-averaged attention of the rater rows over the ``V`` current
    visual columns (``scale``/``bias`` default to the code's constants for ``budget``).
    """

    budget: int | None = 192
    layers: Sequence[int] | None = None
    keep: Sequence[int] | None = None
    recycle: float = 0.3
    positions: str = "contiguous"
    schedule: str = "v1.5"
    scale: float | None = None
    bias: float | None = None
    name = "sparsevlm"
    host_sync = True  # the number of tokens kept is read back to the host at prefill

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"SparseVLM schedule must be 'v1.5' (fixed counts per budget) or 'rank' (the paper's "
                             f"rank rule), got {self.schedule!r}.")
        if self.schedule == "rank":
            if self.keep is not None:
                raise ValueError("SparseVLM schedule=rank chooses its counts from the rater attention's rank; "
                                 "keep=[...] is for schedule=v1.5.")
            if (self.scale is None or self.bias is None) and self.budget not in RANK_CONSTANTS:
                raise ValueError(f"SparseVLM schedule=rank takes budget {sorted(RANK_CONSTANTS)} (the code's "
                                 f"constants) or both scale and bias, got budget={self.budget!r}.")
            for key in ("scale", "bias"):
                value = getattr(self, key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise ValueError(f"SparseVLM {key} must be a number (or null: the budget's constant), got {value!r}.")
            if self.scale is not None and self.scale < 0:
                raise ValueError(f"SparseVLM scale must be >= 0, got {self.scale!r}.")
        elif self.scale is not None or self.bias is not None:
            raise ValueError("SparseVLM scale and bias belong to schedule=rank; set method.schedule=rank or drop them.")
        if self.schedule == "rank":
            pass  # checked above; no fixed counts
        elif self.keep is None:
            if self.budget not in SPARSEVLM_SCHEDULES:
                raise ValueError(
                    f"SparseVLM budget must be one of {sorted(SPARSEVLM_SCHEDULES)} (visual tokens of 576), "
                    f"got {self.budget!r}; or give keep=[...] explicitly."
                )
        else:
            self.keep = list(self.keep)
            if not self.keep or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.keep):
                raise ValueError(f"SparseVLM keep must be a non-empty list of positive integers, got {self.keep!r}.")
        if self.layers is not None:
            self.layers = list(self.layers)
            if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.layers) or sorted(
                set(self.layers)
            ) != self.layers:
                raise ValueError(f"SparseVLM layers must be increasing non-negative layer indices, got {self.layers!r}.")
        if not (0.0 <= self.recycle < 1.0):
            raise ValueError(f"SparseVLM recycle must be in [0, 1), got {self.recycle!r}.")
        if self.positions not in ("contiguous", "original"):
            raise ValueError(f"SparseVLM positions must be 'contiguous' or 'original', got {self.positions!r}.")

    def params(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "layers": self.layers,
            "keep": self.keep,
            "recycle": self.recycle,
            "positions": self.positions,
            "schedule": self.schedule,
            "scale": self.scale,
            "bias": self.bias,
        }

    def plan(self, n_layers: int) -> Plan:
        # the field ``schedule`` (the count rule) shadows TokenPruner.schedule(n_layers), so the phrase is made here
        phrase = f"{self.label(n_layers)}: scoring layers {self.scoring_layers(n_layers)}"
        return Plan(pruner=self.name, pruned_from=min(self.first_layers(n_layers), default=None),
                    families=self.families, host_sync=self.host_sync, schedule=phrase, series=self.name)

    def rank_constants(self) -> tuple[float, float]:
        scale, bias = RANK_CONSTANTS.get(self.budget, (None, None))
        return (scale if self.scale is None else self.scale, bias if self.bias is None else self.bias)

    def _release_layers(self) -> tuple[int, ...]:
        return RANK_LAYERS if self.schedule == "rank" else SPARSEVLM_LAYERS_32

    def label(self, n_layers: int) -> str:
        """E.g. ``SparseVLM 192 (v1.5)``, ``SparseVLM 64 (rank)``, ``SparseVLM rank x2+1``; ``layers scaled``
        where the model is too shallow for the released scoring layers (``SparseVLM 192 (v1.5, layers scaled)``)."""
        scaled = self.layers is None and self._scaled(n_layers)
        if self.keep is not None:
            return f"SparseVLM keep={self.keep}" + (" (layers scaled)" if scaled else "")
        if self.schedule == "rank" and (self.scale is not None or self.bias is not None):
            scale, bias = self.rank_constants()
            return f"SparseVLM rank x{scale:g}{bias:+g}" + (" (layers scaled)" if scaled else "")
        return f"SparseVLM {self.budget} ({self.schedule}{', layers scaled' if scaled else ''})"

    def _scaled(self, n_layers: int) -> bool:
        return max(self._release_layers()) > n_layers - 2

    def sort_key(self, n_layers: int) -> tuple:
        return (-(self.budget or 0), self.schedule != "v1.5")

    def scoring_layers(self, n_layers: int) -> list[int]:
        if self.layers is not None:
            layers = list(self.layers)
        elif not self._scaled(n_layers):  # the released layers, for every model deep enough (13B too)
            layers = list(self._release_layers())
        else:  # too shallow for them: the same depths as a fraction of LLaVA-1.5-7B's 32 layers
            layers = sorted({max(0, int(round(x * n_layers / 32))) for x in self._release_layers()})
        bad = [x for x in layers if x >= n_layers - 1]
        if bad:
            raise ValueError(
                f"SparseVLM scoring layers {bad} are out of range for {n_layers} decoder layers: a scoring "
                f"layer p prunes from layer p + 1, so p must be <= {n_layers - 2}."
            )
        if self.schedule == "rank":
            return layers
        n_stages = len(self.keep) if self.keep is not None else len(SPARSEVLM_SCHEDULES[self.budget])
        if len(layers) != n_stages:
            raise ValueError(f"SparseVLM has {len(layers)} scoring layers {layers} but {n_stages} keep counts.")
        return layers

    def stage_layers(self, n_layers: int) -> list[tuple[int, int]]:
        return [(p, p + 1) for p in self.scoring_layers(n_layers)]

    def keep_counts(self, n_image: int) -> list[int]:
        if self.schedule == "rank":
            return []  # chosen per sample at each scoring layer
        if self.keep is not None:
            counts = list(self.keep)
        else:
            counts = [max(1, int(round(c * n_image / 576))) for c in SPARSEVLM_SCHEDULES[self.budget]]
        if counts and counts[0] > n_image:
            raise ValueError(f"SparseVLM keeps {counts[0]} visual tokens but the image has only {n_image}.")
        return counts

    def begin(self, engine, base: Stage, embeds: torch.Tensor) -> SparseVLMPrompt:
        """This prompt's state: the kept counts, and the raters chosen from the input embeddings."""
        counts = self.keep_counts(int(base.image[0].sum()))
        raters = []
        for b in range(embeds.shape[0]):
            image_idx = base.image[b].nonzero()[:, 0]
            after = torch.arange(int(image_idx.max()) + 1, base.length, device=embeds.device)
            after = after[base.real[b, after]]
            if len(after) == 0:
                raise ValueError("SparseVLM needs text after the image to rate visual tokens; the prompt has none.")
            v, t = embeds[b, image_idx].float(), embeds[b, after].float()
            relevance = torch.softmax(v @ t.T, dim=-1).mean(dim=0)
            raters.append(after[relevance > relevance.mean()] if bool((relevance > relevance.mean()).any()) else after)
        return SparseVLMPrompt(counts=counts, raters=raters)

    def score_tokens(self, engine, state: SparseVLMPrompt, stage_idx, module, query, key, stage: Stage) -> torch.Tensor:
        scores = []
        for b, raters in enumerate(state.raters):
            rows = (stage.source[b][None, :] == raters[:, None]).float().argmax(dim=1)  # raters are never dropped
            probs = attention_rows(module, query[b : b + 1], key[b : b + 1], rows[None], stage.real[b : b + 1])
            scores.append(probs[0].mean(dim=0))
            if self.schedule == "rank":  # raters x current visual columns, float32 as the code's .float()
                visual = probs[0][:, stage.image[b]]
                state.ranks.setdefault(stage_idx, []).append(int(torch.linalg.matrix_rank(visual.float())))
        return torch.stack(scores)

    def select(self, engine, state: SparseVLMPrompt, stage_idx, scores, prev: Stage, hidden):
        indices, merged_all = [], []  # per sample: kept indices, merged hidden states (or None)
        for b in range(hidden.shape[0]):
            image_idx = prev.image[b].nonzero()[:, 0]
            n_visual = len(image_idx)
            if self.schedule == "rank":
                keep = rank_keep_count(state.ranks[stage_idx][b], n_visual, *self.rank_constants())
            else:
                keep = state.counts[stage_idx]
            if keep > n_visual:
                raise ValueError(
                    f"SparseVLM stage {stage_idx} keeps {keep} visual tokens but only {n_visual} are left; "
                    "keep counts must not increase beyond the tokens available."
                )
            order = scores[b, image_idx].argsort(descending=True, stable=True)
            kept_img, dropped = image_idx[order[:keep]], image_idx[order[keep:]]
            merged = None
            if self.recycle > 0 and len(dropped) > 0:
                m = min(len(dropped), int(len(dropped) * self.recycle) + 1)
                merged = dpc_knn_merge(hidden[b, dropped[:m]], int(m / 10) + 1)
            kept = ~prev.image[b]
            kept[kept_img] = True
            order_new = kept.nonzero()[:, 0]
            if merged is not None:
                last_visual = int(kept_img.max()) if len(kept_img) else int(image_idx.min()) - 1
                cut = int((order_new <= last_visual).sum())
                slots = torch.arange(len(merged), device=hidden.device) + prev.length
                order_new = torch.cat([order_new[:cut], slots, order_new[cut:]])
            merged_all.append(merged)
            indices.append(order_new)
        state.ranks.pop(stage_idx, None)
        n_merged = [0 if m is None else len(m) for m in merged_all]
        if len({len(i) for i in indices}) == 1 and len(set(n_merged)) == 1:  # equal counts (always for v1.5)
            merged = torch.stack(merged_all).to(hidden.dtype) if n_merged[0] else None
            return torch.stack(indices), merged
        # The rank rule keeps different counts per sample: the shorter samples are left-padded inside
        # the stage (padding slots first, masked like left padding, pointing at token 0), and the
        # merged tokens padded to the most any sample has (unused slots are never indexed).
        width, most = max(len(i) for i in indices), max(n_merged)
        index = torch.zeros(len(indices), width, dtype=torch.long, device=hidden.device)
        pad = torch.ones(len(indices), width, dtype=torch.bool, device=hidden.device)
        merged = hidden.new_zeros(len(indices), most, hidden.shape[-1]) if most else None
        for b, order_new in enumerate(indices):
            index[b, width - len(order_new):] = order_new
            pad[b, width - len(order_new):] = False
            if merged_all[b] is not None:
                merged[b, : n_merged[b]] = merged_all[b].to(hidden.dtype)
        return index, merged, pad


def dpc_knn_merge(x: torch.Tensor, n_centres: int) -> torch.Tensor:
    """Cluster the rows of ``x`` (m, C) by DPC-kNN and return each cluster's mean: (n_centres, C).

    Density ``exp(-mean squared distance to the k nearest rows)`` with ``k = n_centres`` (self
    included), distance ``||xi - xj|| / sqrt(C)``; ``delta`` the distance to the nearest denser row
    (the largest distance for the densest); centres the top ``density * delta``; every row joins
    its nearest centre. Deterministic: ties go to the lower index.
    """
    m, channels = x.shape
    n_centres = min(n_centres, m)
    xf = x.float()
    dist = torch.cdist(xf, xf) / math.sqrt(channels)
    knn = dist.topk(min(n_centres, m), dim=1, largest=False).values
    density = torch.exp(-(knn**2).mean(dim=1))
    rank = torch.empty(m, dtype=torch.long, device=x.device)
    rank[density.argsort(descending=True, stable=True)] = torch.arange(m, device=x.device)
    denser = rank[None, :] < rank[:, None]  # [i, j]: j is denser than i (ties: the lower index)
    delta = torch.where(denser, dist, torch.full_like(dist, float("inf"))).min(dim=1).values
    delta = torch.where(torch.isinf(delta), dist.max(), delta)
    centres = (density * delta).argsort(descending=True, stable=True)[:n_centres]
    assign = dist[:, centres].argmin(dim=1)
    assign[centres] = torch.arange(n_centres, device=x.device)
    sums = torch.zeros(n_centres, channels, device=x.device).index_add_(0, assign, xf)
    counts = torch.bincount(assign, minlength=n_centres).clamp(min=1)
    return sums / counts[:, None]
