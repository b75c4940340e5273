"""HiRED (Arif et al., AAAI 2025): high-resolution early dropping for LLaVA-NeXT, before the LLM.

After the released code (github.com/hasanar1f/HiRED, ``modeling_llava_next.py``,
``HiRED_token_selection``); every rule and choice is in docs/methods.md. Per image of ``P``
partitions (the full image and ``P - 1`` sub-images) of ``N`` tokens each:

1. Budget ``T = int(P * N * budget)``; the full image gets ``F = min(int(T * alpha), N)``, the
   sub-images ``S = min(T - F, (P - 1) * N)``.
2. Full image: its ``F`` tokens with the highest [CLS] attention of the *final* layer (the
   CLIP layer whose output LLaVA takes: layer ``n - 2`` for ``vision_feature_layer=-2``).
3. Sub-images: the full image's ``int(N * (1 - alpha))`` tokens with the highest [CLS] attention of
   the *early* layer (``early_layer``, layer 0 as released) are counted per sub-image region;
   sub-image ``j`` gets ``int(S * count_j / sum(count))`` (at most ``N``) and keeps that many of its
   tokens by its own final-layer [CLS] attention.
4. Attention per head (``q_h . k_h / sqrt(d)``, softmax over every token), summed over heads.
5. The kept tokens keep LLaVA-NeXT's order (full image, then the unpadded sub-image grid row by
   row); tokens in the unpadded-away border go as in LLaVA-NeXT; the row-end newline tokens are
   dropped as released (``newlines=True`` keeps them). ``budget=1`` keeps every image token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import torch

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


def region_counts(selected: torch.Tensor, grid: tuple[int, int], regions: str) -> torch.Tensor:
    """How many of the full image's selected tokens (N,) bool fall in each sub-image's region
    (row-major over the ``grid = (rows, cols)`` of sub-images)."""
    rows, cols = grid
    n = selected.shape[0]
    if regions == "raster":  # the released code: the raster-ordered tokens cut into rows*cols equal runs
        if n % (rows * cols):
            raise ValueError(f"HiRED regions='raster' needs the {n} tokens to split into {rows}x{cols} equal runs; "
                             "use regions='spatial'.")
        return selected.view(rows * cols, -1).sum(dim=-1)
    side = math.isqrt(n)
    r = torch.arange(side, device=selected.device)
    region = (r[:, None] * rows // side) * cols + (r[None, :] * cols // side)  # (side, side)
    return torch.bincount(region.flatten()[selected], minlength=rows * cols)


def hired_masks(early: torch.Tensor, final: torch.Tensor, grid: tuple[int, int], budget: float, alpha: float,
                regions: str) -> torch.Tensor:
    """(P, N) bool: the tokens HiRED keeps of one image, from its partitions' [CLS] attention of the
    early and the final layer (P, N) each (partition 0 the full image)."""
    p, n = final.shape
    if budget >= 1.0:
        return torch.ones(p, n, dtype=torch.bool, device=final.device)
    mask = torch.zeros(p, n, dtype=torch.bool, device=final.device)
    total = int(p * n * budget)
    full = min(int(total * alpha), n)
    sub = min(total - full, (p - 1) * n)
    mask[0, final[0].topk(full).indices] = True
    if sub > 0 and p > 1:
        chosen = torch.zeros(n, dtype=torch.bool, device=final.device)
        chosen[early[0].topk(int(n * (1 - alpha))).indices] = True
        counts = region_counts(chosen, grid, regions).float()
        share = counts / counts.sum() if counts.sum() > 0 else torch.full_like(counts, 1.0 / len(counts))
        budgets = (share * sub).int().clamp(max=n).tolist()
        for j, b in enumerate(budgets):
            mask[j + 1, final[j + 1].topk(b).indices] = True
    return mask


@dataclasses.dataclass
class HiRED(TokenPruner):
    """HiRED for LLaVA-NeXT: a budget of ``budget`` of each image's tokens split between the full
    image (``alpha``) and the sub-images (by early-layer [CLS] attention), tokens chosen by the
    final layer's [CLS] attention; the rest dropped before the language model."""

    budget: float = 0.2
    alpha: float = 0.5
    early_layer: int = 0
    regions: str = "raster"  # the released reshape; "spatial" is the geometrically faithful variant of ours
    newlines: bool = False
    name = "hired"
    positions = "contiguous"
    equal_image_counts = False
    families = ("llava_next",)

    def __post_init__(self) -> None:
        for key, low_open in (("budget", True), ("alpha", False)):
            v = getattr(self, key)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (0 < v <= 1 if low_open else 0 <= v <= 1)
            if not ok:
                what = "the fraction of image tokens kept, in (0, 1]" if key == "budget" else "the full image's share of the budget, in [0, 1]"
                raise ValueError(f"HiRED {key} ({what}) got {v!r}.")
        if isinstance(self.early_layer, bool) or not isinstance(self.early_layer, int) or self.early_layer < 0:
            raise ValueError(f"HiRED early_layer (the vision layer whose [CLS] attention splits the budget) must be an integer >= 0, got {self.early_layer!r}.")
        if self.regions not in ("spatial", "raster"):
            raise ValueError(f"HiRED regions must be 'spatial' (sub-image areas of the full image) or 'raster' (the released reshape, the default), got {self.regions!r}.")
        if not isinstance(self.newlines, bool):
            raise ValueError(f"HiRED newlines must be true or false, got {self.newlines!r}.")

    def params(self) -> dict[str, Any]:
        return {"budget": self.budget, "alpha": self.alpha, "early_layer": self.early_layer, "regions": self.regions,
                "newlines": self.newlines}

    def label(self, n_layers: int) -> str:
        extra = [] if self.alpha == 0.5 else [f"a={self.alpha:g}"]
        extra += [] if self.early_layer == 0 else [f"early={self.early_layer}"]
        extra += [self.regions]  # always named: the two rules split the sub-image budget differently
        extra += ["+newlines"] if self.newlines else []
        return " ".join([f"HiRED B={self.budget:g}", *extra])

    def sort_key(self, n_layers: int) -> tuple:
        return (-self.budget, self.alpha, self.early_layer, self.regions, not self.newlines)

    def stage_layers(self, n_layers: int) -> list[tuple[int, int]]:
        return [(None, 0)]

    def vision_layers(self, model) -> tuple[int, int]:
        """(early, final) encoder layers whose [CLS] attention HiRED reads."""
        n = len(vision_encoder_layers(model))
        final = feature_layer_index(model) - 1
        if final < 0:
            raise ValueError("HiRED needs LLaVA's features to come from a vision layer's output, not the embeddings.")
        if self.early_layer >= n:
            raise ValueError(f"HiRED early_layer={self.early_layer} is out of range: the vision tower has {n} layers.")
        return self.early_layer, final

    @contextlib.contextmanager
    def hooks(self, engine):
        check_family(self.name, self.families, model_family(engine.model))
        with capture_layers(engine.model, engine, self.vision_layers(engine.model)):
            yield

    def begin(self, engine, base: Stage, embeds: torch.Tensor):
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
        )

        model = engine.model
        config = model.config
        layers = vision_encoder_layers(model)
        early_i, final_i = self.vision_layers(model)
        early_in = captured_input(engine, early_i)
        final_in = early_in if final_i == early_i else captured_input(engine, final_i)
        early, _ = cls_attention(layers[early_i], early_in, heads=True)
        final, _ = cls_attention(layers[final_i], final_in, heads=True)
        sizes = engine.captured.pop("image_sizes", None)
        if sizes is None:
            raise ValueError("HiRED needs the images' sizes (image_sizes), as LLaVA-NeXT's processor gives them.")
        n = final.shape[1]
        tile = config.vision_config.image_size
        packed_maps, masks, start = [], [], 0
        for size in sizes.tolist() if torch.is_tensor(sizes) else sizes:
            p = image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints, patch_size=tile)
            grid = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, tile)
            masks.append(hired_masks(early[start : start + p], final[start : start + p], tuple(grid), self.budget,
                                     self.alpha, self.regions))
            # which partition and token each of LLaVA-NeXT's packed image tokens is (-1: a row-end newline)
            ids = torch.arange(p * n, dtype=torch.float64, device=final.device).view(p, n, 1)
            packed, _ = model.model.pack_image_features([ids], torch.tensor([size]), "default",
                                                        image_newline=torch.tensor([-1.0], dtype=torch.float64))
            packed_maps.append(packed[0][:, 0].round().long())
            start += p
        if start != final.shape[0]:
            raise ValueError(f"the images' sizes give {start} partitions but the vision tower encoded {final.shape[0]}.")
        spans = image_token_spans(base, [len(m) for m in packed_maps])
        return {"masks": masks, "packed": packed_maps, "spans": spans}

    def kept_entries(self, packed: torch.Tensor, mask: torch.Tensor) -> list[int]:
        """The packed image tokens (entries of LLaVA-NeXT's packed sequence) that stay."""
        flat = mask.flatten()
        newline = packed < 0
        keep = torch.where(newline, torch.full_like(newline, self.newlines), flat[packed.clamp(min=0)])
        return keep.nonzero()[:, 0].tolist()

    def select(self, engine, state, stage_idx, scores, prev: Stage, hidden):
        items, k = [], 0
        for spans in state["spans"]:
            row = []
            for i in range(len(spans)):
                row.extend((i, e) for e in self.kept_entries(state["packed"][k], state["masks"][k]))
                k += 1
            items.append(row)
        return reduced_sequence(prev, items, state["spans"], [None] * len(items), hidden.dtype)
