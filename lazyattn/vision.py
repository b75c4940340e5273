"""What PruMerge(+) and HiRED share: reducing the image tokens *before* the language model.

Both read the CLIP vision tower's [CLS] attention during the forward that makes the image
features, and give the language model a shorter sequence: the text tokens and, in place of each
image's tokens, that image's reduced tokens. They run on the pruning engine
(``lazyattn.engine``) as one stage that starts at decoder layer 0 and is scored outside the
language model (``stage_layers = [(None, 0)]``): positions are re-numbered contiguously, as a
shorter prompt would be, and samples that keep different counts are padded (the padding slots
are masked like left padding and sit at the start of the sequence).

The [CLS] attention is recomputed from the inputs of the tower's encoder layers, which forward
pre-hooks capture (``capture_layers``): ``layer_norm1`` then the layer's own ``q_proj`` and
``k_proj``, so nothing of the tower's forward is changed.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn


def model_family(model: nn.Module) -> str:
    return str(getattr(model.config, "model_type", type(model).__name__))


def check_family(name: str, families: Sequence[str], family: str | None) -> None:
    """Refuse, in one line, a model family the method is not defined for (None: unknown, allowed)."""
    if family is None or family in families:
        return
    why = {
        "qwen2_vl": "its vision tower has no [CLS] token",
        "qwen2_5_vl": "its vision tower has no [CLS] token",
    }.get(family, "")
    extra = f" ({why})" if why else ""
    raise ValueError(f"method {name} is defined for {' and '.join(families)} models only, not {family}{extra}.")


def vision_encoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    tower = getattr(inner, "vision_tower", None)
    if tower is None:
        raise ValueError(f"{type(model).__name__} has no vision_tower: not a LLaVA-style model.")
    tower = getattr(tower, "vision_model", tower)
    return tower.encoder.layers


def feature_layer_index(model: nn.Module) -> int:
    """The index into the tower's hidden states (0 = the encoder's input) of LLaVA's image features;
    encoder layer ``i`` reads hidden state ``i``. Refuses what the methods are not defined for."""
    config = model.config
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"reducing image tokens needs one vision_feature_layer, got {layer!r}.")
    if config.vision_feature_select_strategy != "default":
        raise ValueError("reducing image tokens needs vision_feature_select_strategy='default' (the [CLS] token dropped), "
                         f"got {config.vision_feature_select_strategy!r}.")
    n = len(vision_encoder_layers(model))
    index = layer % (n + 1)
    return index


@contextlib.contextmanager
def capture_layers(model: nn.Module, engine, indices: Iterable[int]):
    """Forward pre-hooks saving the input of encoder layers ``indices`` into
    ``engine.captured[("layer", i)]`` (the hidden states with [CLS] first: (images, 1 + N, C))."""
    layers = vision_encoder_layers(model)
    handles, patched = [], False

    def saver(i):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            engine.captured[("layer", i)] = hidden.detach()

        return hook

    try:
        for i in sorted(set(indices)):
            handles.append(layers[i].register_forward_pre_hook(saver(i), with_kwargs=True))

        # The images' sizes (LLaVA-NeXT): generate() encodes the images before the prefill, through
        # get_image_features, not the model's forward, so that method is wrapped (per instance).
        inner = getattr(model, "model", model)
        original = inner.get_image_features

        @functools.wraps(original)  # generate() reads its signature
        def get_image_features(*args, **kwargs):
            sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
            engine.captured["image_sizes"] = sizes
            return original(*args, **kwargs)

        inner.get_image_features = get_image_features
        patched = True
        yield
    finally:
        for handle in handles:
            handle.remove()
        if "inner" in locals() and patched:
            del inner.get_image_features


def captured_input(engine, i: int) -> torch.Tensor:
    """Encoder layer ``i``'s input in the last image encoding, taken (a later prefill without one fails)."""
    if ("layer", i) not in engine.captured:
        raise RuntimeError(
            f"vision encoder layer {i} did not run in this forward: the image tokens can only be reduced in the "
            "forward that encodes the images (call the model with pixel_values)."
        )
    return engine.captured.pop(("layer", i))


def cls_queries_keys(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The [CLS] query (images, C) and every token's key (images, 1 + N, C) of a CLIP encoder layer,
    from its input, in float32 (projections with their biases, unscaled)."""
    h = layer.layer_norm1(hidden)
    attn = layer.self_attn
    wide = torch.promote_types(h.dtype, torch.float32)  # half -> float32; float64 stays
    return attn.q_proj(h[:, 0]).to(wide), attn.k_proj(h).to(wide)


def cls_attention(layer: nn.Module, hidden: torch.Tensor, heads: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS]-to-patch attention (images, N) and the patches' keys (images, N, C).

    ``heads=False``: one attention over the full width, logits ``q . k / sqrt(C)`` (PruMerge's
    released code). ``heads=True``: the layer's own heads (``q_h . k_h / sqrt(d)``), softmax per
    head, summed over heads (HiRED's released code). Both softmax over every token, [CLS] included,
    and return the patch columns."""
    q, k = cls_queries_keys(layer, hidden)
    if heads:
        n_heads = layer.self_attn.num_heads if hasattr(layer.self_attn, "num_heads") else layer.self_attn.config.num_attention_heads
        d = q.shape[-1] // n_heads
        qh = q.view(q.shape[0], n_heads, d)
        kh = k.view(k.shape[0], k.shape[1], n_heads, d)
        logits = torch.einsum("bhd,bnhd->bhn", qh, kh) / math.sqrt(d)
        probs = torch.softmax(logits, dim=-1).sum(dim=1)
    else:
        logits = torch.einsum("bc,bnc->bn", q, k) / math.sqrt(q.shape[-1])
        probs = torch.softmax(logits, dim=-1)
    return probs[:, 1:], k[:, 1:]


def reduced_sequence(prev, items: list[list[tuple[int, int]]], image_entries: list[list[list[int]]],
                     merged: list[torch.Tensor | None], dtype: torch.dtype):
    """The stage's (index, merged, pad) from each sample's reduced images.

    ``image_entries[b][i]``: the positions (into ``prev``) of sample ``b``'s ``i``-th image's
    tokens, in order. ``items[b]``: the reduced tokens of sample ``b``'s images in order, each
    ``(i, e)``: entry ``e`` of image ``i`` kept (``e >= 0``), or merged vector ``-e - 1`` of the
    sample's ``merged[b]`` (M_b, C). A sample's reduced tokens of image ``i`` take the place of
    that image's first token; its other tokens go. Samples are left-padded to the longest.
    """
    batch = prev.real.shape[0]
    device = prev.real.device
    rows, n_merged = [], []
    for b in range(batch):
        image_pos = prev.image[b].nonzero()[:, 0].tolist()
        starts = {entries[0]: i for i, entries in enumerate(image_entries[b])}
        by_image: dict[int, list[int]] = {}
        for i, e in items[b]:
            by_image.setdefault(i, []).append(
                image_entries[b][i][e] if e >= 0 else prev.length + (-e - 1)
            )
        image_set = set(image_pos)
        row = []
        for pos in range(prev.length):
            if pos in starts:
                row.extend(by_image.get(starts[pos], []))
            elif pos not in image_set:
                row.append(pos)
        rows.append(row)
        n_merged.append(0 if merged[b] is None else merged[b].shape[0])
    width = max(len(r) for r in rows)
    index = torch.zeros(batch, width, dtype=torch.long, device=device)
    pad = torch.ones(batch, width, dtype=torch.bool, device=device)
    for b, row in enumerate(rows):
        if row:
            index[b, width - len(row):] = torch.tensor(row, device=device)
            pad[b, width - len(row):] = False
    out = None
    if max(n_merged) > 0:
        sample = next(m for m in merged if m is not None)
        out = torch.zeros(batch, max(n_merged), sample.shape[-1], dtype=dtype, device=device)
        for b, m in enumerate(merged):
            if m is not None:
                out[b, : m.shape[0]] = m.to(dtype)
    return index, out, pad


def image_token_spans(prev, lengths: list[int]) -> list[list[list[int]]]:
    """Each sample's images' token positions, from the images' token counts in batch order (the
    order LLaVA fills the image tokens with the images' features)."""
    out, k = [], 0
    for b in range(prev.real.shape[0]):
        pos = prev.image[b].nonzero()[:, 0].tolist()
        spans, start = [], 0
        while start < len(pos):
            if k >= len(lengths):
                raise ValueError("the prompt has more image tokens than the images' features.")
            spans.append(pos[start : start + lengths[k]])
            start += lengths[k]
            k += 1
        out.append(spans)
    if k != len(lengths):
        raise ValueError(f"the prompts hold {k} images' tokens but {len(lengths)} images were encoded.")
    return out
