"""Visual-token pruning inside the decoder: FastV and SparseVLM, true drops with a KV cache.

Both methods work in *stages*. Stage 0 is the prompt as given. At prefill, a scoring layer's
observer ranks the current stage's image tokens from that layer's post-RoPE query and keys
(only the scoring rows are computed, so every layer keeps its attention backend), and from
the stage's first layer on the decoder carries only the kept tokens: the hidden states are
gathered, and those layers get their own attention mask and position embeddings, so their
KV cache holds kept tokens only. Decoding appends to every layer's cache; layers of stage s
attend over stage s's kept tokens plus the generated ones.

The image span is found from ``input_ids == image_token_id``, never from fixed offsets. Every
sample of a batch must have the same number of image tokens; then every sample keeps the same
number of tokens, and left padding is carried along as masked (kept) columns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lazyattn.arch import decoder_layers


# --------------------------------------------------------------------------- stage bookkeeping


@dataclasses.dataclass
class Stage:
    """The tokens layers ``first_layer ..`` carry, fixed at prefill."""

    first_layer: int
    source: torch.Tensor  # (B, L_s): index into the original prompt, -1 for merged tokens
    real: torch.Tensor  # (B, L_s) bool: not padding
    image: torch.Tensor  # (B, L_s) bool: visual token (kept or merged)
    positions: torch.Tensor  # (B, L_s) position ids (or (3, B, L_s) for M-RoPE)
    shift: torch.Tensor  # (B,) decode positions are the model's positions minus this
    # Filled once per forward: what the stage's layers get instead of the decoder's arguments.
    mask: Any = None
    position_embeddings: Any = None
    position_ids: Any = None

    @property
    def length(self) -> int:
        return self.source.shape[1]


def _repeat_kv(key: torch.Tensor, n_heads: int) -> torch.Tensor:
    groups = n_heads // key.shape[1]
    return key if groups == 1 else key.repeat_interleave(groups, dim=1)


def attention_rows(module: nn.Module, query: torch.Tensor, key: torch.Tensor, rows: torch.Tensor,
                   real: torch.Tensor) -> torch.Tensor:
    """Head-averaged softmax attention of query ``rows`` (B, R) over all keys, causal and padding
    masked: (B, R, L). Only these rows are computed; queries and keys are the layer's post-RoPE ones.
    """
    b_idx = torch.arange(query.shape[0], device=query.device)[:, None]
    q = query.transpose(1, 2)[b_idx, rows].transpose(1, 2)  # (B, H, R, d)
    k = _repeat_kv(key, q.shape[1])
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * module.scaling  # (B, H, R, L)
    cols = torch.arange(k.shape[-2], device=k.device)
    offset = k.shape[-2] - query.shape[-2]  # keys cached before these queries
    allowed = (cols[None, None, :] <= rows[:, :, None] + offset) & real[:, None, :]
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(dim=1)


def _stage_mask(impl: str, real: torch.Tensor, q_len: int, dtype: torch.dtype):
    """The attention mask the model's backend expects, for ``q_len`` queries at the end of ``real``.

    Same conventions as transformers' own masks: sdpa a 4D bool (True attends), eager a 4D float
    (0 or the dtype's minimum), flash-attention a 2D padding mask (None when nothing is padded).
    """
    kv = real.shape[1]
    if impl.startswith("flash"):
        return None if bool(real.all()) else real.to(torch.long)
    cols = torch.arange(kv, device=real.device)
    rows = torch.arange(q_len, device=real.device) + (kv - q_len)
    allowed = (cols[None, :] <= rows[:, None])[None, None] & real[:, None, None, :]
    if impl == "eager":
        zero = torch.zeros((), dtype=dtype, device=real.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    return allowed


# --------------------------------------------------------------------------- the engine


class PruneEngine:
    """Runs a token pruner's stages inside one model while installed (``with engine.install():``)."""

    def __init__(self, model: nn.Module, pruner: "TokenPruner"):
        self.model = model
        self.pruner = pruner
        self.layers = decoder_layers(model)
        self.decoder = model.get_decoder()
        self.n_layers = len(self.layers)
        self.image_token_id = _image_token_id(model)
        self.stage_layers = pruner.stage_layers(self.n_layers)  # [(score_layer, first_layer), ...]
        text_config = model.config.get_text_config(decoder=True)
        self.impl = text_config._attn_implementation or "eager"
        rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
        self.mrope = "mrope_section" in rope
        self.stages: list[Stage] = []
        self.scores: dict[int, torch.Tensor] = {}
        self.input_ids: torch.Tensor | None = None
        self.history: list[list[Stage]] = []  # the stages of the last 16 prefills, for inspection and tests

    # -- hooks -------------------------------------------------------------------------------
    def _outer_pre_hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.input_ids = ids

    def _decoder_pre_hook(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise ValueError("token pruning expects the language model to be called with inputs_embeds (LLaVA-style).")
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        past = cache.get_seq_length() if cache is not None else 0
        batch, q_len = embeds.shape[:2]
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = (torch.arange(q_len, device=embeds.device) + past)[None].expand(batch, -1)
        if positions.dim() == 2 and self.mrope:
            positions = positions[None].expand(3, -1, -1)  # what the M-RoPE text model does with 2D ids
        mask2d = kwargs.get("attention_mask")
        if mask2d is not None and not (isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2):
            raise ValueError(
                "token pruning needs a 2D padding mask (batch, length) or none, not a prepared mask "
                f"({type(mask2d).__name__}); call the model with the processor's attention_mask."
            )
        self.step = {"positions": positions, "mask2d": mask2d, "past": past}
        self.prefill = past == 0
        if self.prefill:
            self._start_prefill(embeds, positions, mask2d)
        for stage in self.stages:
            stage.mask = stage.position_embeddings = stage.position_ids = None

    def _start_prefill(self, embeds, positions, mask2d):
        ids = self.input_ids
        if ids is None or ids.shape[:2] != embeds.shape[:2]:
            raise ValueError(
                "token pruning needs the prompt's input_ids (to find the image tokens); call the model "
                "with input_ids and pixel_values, not precomputed inputs_embeds."
            )
        batch, length = ids.shape
        real = torch.ones_like(ids, dtype=torch.bool) if mask2d is None else mask2d[:, -length:].bool()
        image = ids == self.image_token_id
        counts = image.sum(dim=1)
        if bool((counts != counts[0]).any()):
            raise ValueError(f"every sample of a batch must have the same number of image tokens, got {counts.tolist()}.")
        if int(counts[0]) == 0:
            raise ValueError("the prompt has no image tokens (input_ids == image_token_id): nothing to prune.")
        source = torch.arange(length, device=ids.device)[None].expand(batch, -1)
        # the prompt's highest position per sample: contiguous stages continue decoding after it
        self.last_position = positions.amax(dim=-1) if positions.dim() == 2 else positions.amax(dim=(0, -1))
        base = Stage(0, source, real, image, positions, torch.zeros_like(self.last_position))
        self.base = base
        self.prefill_len = length
        self.stages = []
        self.scores = {}
        self.history.append(self.stages)
        del self.history[:-16]  # the latest prefills only: a long evaluation must not accumulate them
        self.pruner.begin(self, base, embeds)

    def current(self) -> Stage:
        return self.stages[-1] if self.stages else self.base

    def observer(self, stage_idx: int):
        def observe(module, query, key):
            if self.prefill:
                self.scores[stage_idx] = self.pruner.score_tokens(self, stage_idx, module, query, key, self.current())

        return observe

    def _layer_forward(self, layer: nn.Module, idx: int):
        original = type(layer).forward
        firsts = [first for _, first in self.stage_layers]

        def forward(hidden_states, *args, **kwargs):
            if args:
                raise ValueError("token pruning expects decoder layers to be called with keyword arguments.")
            stage_idx = sum(1 for f in firsts if f <= idx) - 1
            if self.prefill and idx == firsts[stage_idx]:
                hidden_states = self._build_stage(stage_idx, hidden_states)
            stage = self.stages[stage_idx]
            self._stage_inputs(stage, hidden_states)
            kwargs["attention_mask"] = stage.mask
            kwargs["position_embeddings"] = stage.position_embeddings
            kwargs["position_ids"] = stage.position_ids
            return original(layer, hidden_states, **kwargs)

        return forward

    # -- stages ------------------------------------------------------------------------------
    def _build_stage(self, stage_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        prev = self.current()
        if stage_idx not in self.scores:
            raise RuntimeError(f"pruning stage {stage_idx} has no scores: its scoring layer did not run.")
        index, merged = self.pruner.select(self, stage_idx, self.scores.pop(stage_idx), prev, hidden)
        n_prev = prev.length
        b_idx = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        from_prev = index < n_prev
        safe = index.clamp(max=n_prev - 1)
        if merged is not None:
            pool = torch.cat([hidden, merged], dim=1)
        else:
            pool = hidden
        new_hidden = pool[b_idx, index]
        source = torch.where(from_prev, prev.source[b_idx, safe], torch.full_like(index, -1))
        real = torch.where(from_prev, prev.real[b_idx, safe], torch.ones_like(from_prev))
        image = torch.where(from_prev, prev.image[b_idx, safe], torch.ones_like(from_prev))
        positions, shift = self.pruner.positions(self, prev, index, real)
        stage = Stage(self.stage_layers[stage_idx][1], source, real, image, positions, shift)
        self.stages.append(stage)
        return new_hidden

    def _stage_inputs(self, stage: Stage, hidden: torch.Tensor) -> None:
        if stage.position_embeddings is not None:  # already built in this forward
            return
        q_len = hidden.shape[1]
        if self.prefill:
            real, positions = stage.real, stage.positions
        else:
            mask2d = self.step["mask2d"]
            n_new = self.step["past"] + q_len - self.prefill_len  # tokens after the prompt, these included
            new = (
                torch.ones(hidden.shape[0], n_new, dtype=torch.bool, device=hidden.device)
                if mask2d is None
                else mask2d[:, -n_new:].bool()
            )
            real = torch.cat([stage.real, new], dim=1)
            step_pos = self.step["positions"]
            positions = step_pos - (stage.shift[:, None] if step_pos.dim() == 2 else stage.shift[None, :, None])
        stage.mask = _stage_mask(self.impl, real, q_len, hidden.dtype)
        if positions.dim() == 3 and positions.shape[0] == 4:  # M-RoPE with text positions prepended
            stage.position_ids, rope_positions = positions[0], positions[1:]
        elif positions.dim() == 3:  # M-RoPE (temporal, height, width)
            stage.position_ids, rope_positions = None, positions
        else:
            stage.position_ids, rope_positions = positions, positions
        stage.position_embeddings = self.decoder.rotary_emb(hidden, rope_positions)

    # -- installation ------------------------------------------------------------------------
    def observers(self) -> dict[int, list]:
        return {score: [self.observer(i)] for i, (score, _) in enumerate(self.stage_layers)}

    @contextlib.contextmanager
    def install(self):
        handles = [
            self.model.register_forward_pre_hook(self._outer_pre_hook, with_kwargs=True),
            self.decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True),
        ]
        patched = []
        try:
            first = self.stage_layers[0][1]
            for idx in range(first, self.n_layers):
                layer = self.layers[idx]
                layer.forward = self._layer_forward(layer, idx)
                patched.append(layer)
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for layer in patched:
                del layer.forward
            self.stages, self.scores, self.input_ids = [], {}, None

    # -- reporting -----------------------------------------------------------------------------
    def kept_lengths(self) -> list[int]:
        """Tokens per layer in the last prefill (same for every sample)."""
        lengths, stages = [], self.history[-1] if self.history else []
        for idx in range(self.n_layers):
            length = self.prefill_len
            for stage in stages:
                if stage.first_layer <= idx:
                    length = stage.length
            lengths.append(length)
        return lengths


def _image_token_id(model: nn.Module) -> int:
    config = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(model).__name__} has no image_token_id in its config: token pruning needs one.")


# --------------------------------------------------------------------------- the methods


class TokenPruner:
    """What FastV and SparseVLM share: stages, application, and the original-position rule."""

    positions_mode = "original"

    def stage_layers(self, n_layers: int) -> list[tuple[int, int]]:
        raise NotImplementedError

    def begin(self, engine: PruneEngine, base: Stage, embeds: torch.Tensor) -> None:
        pass

    def first_layers(self, n_layers: int) -> list[int]:
        """The layers from which fewer tokens are carried: none of them may be lazy."""
        return [first for _, first in self.stage_layers(n_layers)]

    def positions(self, engine, prev: Stage, index, real):
        """Position ids of the new stage, and the per-sample shift applied to decode positions.

        ``original``: kept tokens keep their positions (gaps allowed); a merged token takes the
        position of the token before it; decoding continues after the prompt's original length.
        ``contiguous``: real tokens are re-numbered 0, 1, ... (padding gets 1, as transformers
        does), and decoding continues right after the last kept token.
        """
        n_prev = prev.length
        b_idx = torch.arange(index.shape[0], device=index.device)[:, None]
        safe = index.clamp(max=n_prev - 1)
        if self.positions_mode == "original":
            if prev.positions.dim() == 2:
                new = torch.where(index < n_prev, prev.positions[b_idx, safe], torch.full_like(index, -1))
                new = new.cummax(dim=1).values
            else:  # M-RoPE position ids (3, B, L)
                if bool((index >= n_prev).any()):
                    raise ValueError("merged tokens are not supported with M-RoPE positions; set recycle=0.")
                new = prev.positions[:, b_idx, safe]
            return new, torch.zeros(index.shape[0], dtype=torch.long, device=index.device)
        if prev.positions.dim() != 2:
            raise ValueError("contiguous re-indexing is defined for 1-D position ids only; use positions='original'.")
        new = (real.long().cumsum(dim=1) - 1).masked_fill(~real, 1)
        shift = engine.last_position + 1 - real.sum(dim=1)
        return new, shift

    def apply(self, model: nn.Module):
        return run_pruner(model, self, {})


@contextlib.contextmanager
def run_pruner(model: nn.Module, pruner: TokenPruner, anchor_of: dict[int, int]):
    """Install ``pruner`` on ``model``, with the lazy layers ``anchor_of`` (lazy -> anchor), if any."""
    from lazyattn.lazy import patch_attention

    engine = PruneEngine(model, pruner)
    with patch_attention(model, anchor_of, engine.observers()), engine.install():
        yield engine


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}.")


@dataclasses.dataclass
class FastV(TokenPruner):
    """FastV (Chen et al., ECCV 2024): after layer ``k - 1``, drop a fraction ``ratio`` of the image
    tokens, ranked by the attention they receive in layer ``k - 1`` (head-averaged) from the last
    prompt token (``score="last_token"``, as released) or averaged over all prompt tokens
    (``score="mean"``, as the paper's text says). Layers ``k ..`` carry the kept tokens only, at
    their original positions.
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

    def stage_layers(self, n_layers: int) -> list[tuple[int, int]]:
        if self.k >= n_layers:
            raise ValueError(f"FastV k={self.k} is out of range: this model has {n_layers} decoder layers (1 <= k < {n_layers}).")
        return [(self.k - 1, self.k)]

    def n_keep(self, n_image: int) -> int:
        return int(round(n_image * (1 - self.ratio)))

    def score_tokens(self, engine, stage_idx, module, query, key, stage: Stage) -> torch.Tensor:
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

    def select(self, engine, stage_idx, scores, prev: Stage, hidden):
        n_image = int(prev.image[0].sum())
        keep = self.n_keep(n_image)
        ranked = scores.masked_fill(~prev.image, float("-inf"))
        top = ranked.topk(keep, dim=1).indices if keep else ranked[:, :0].long()
        kept = ~prev.image
        kept = kept.scatter(1, top, True)
        index = kept.nonzero()[:, 1].view(kept.shape[0], -1)
        return index, None


# SparseVLM v1.5's kept visual tokens after its three pruning layers, per named budget, for
# LLaVA-1.5's 576 image tokens (Gumpest/SparseVLMs score.py); scaled to other image-token counts.
SPARSEVLM_SCHEDULES: dict[int, tuple[int, ...]] = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
SPARSEVLM_LAYERS_32 = (2, 6, 15)  # LLaVA-1.5-7B (32 layers); scaled to the model's depth


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

    ``keep`` (explicit kept visual counts per stage) overrides ``budget`` (a named schedule:
    192, 128 or 64 for 576 image tokens, scaled to the model's image-token count).
    """

    budget: int | None = 192
    layers: Sequence[int] | None = None
    keep: Sequence[int] | None = None
    recycle: float = 0.3
    positions_mode: str = "contiguous"
    name = "sparsevlm"

    def __post_init__(self) -> None:
        if self.keep is None:
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
        if self.positions_mode not in ("contiguous", "original"):
            raise ValueError(f"SparseVLM positions_mode must be 'contiguous' or 'original', got {self.positions_mode!r}.")

    def params(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "layers": self.layers,
            "keep": self.keep,
            "recycle": self.recycle,
            "positions_mode": self.positions_mode,
        }

    def scoring_layers(self, n_layers: int) -> list[int]:
        if self.layers is not None:
            layers = list(self.layers)
        else:
            layers = sorted({max(0, int(round(x * n_layers / 32))) for x in SPARSEVLM_LAYERS_32})
        bad = [x for x in layers if x >= n_layers - 1]
        if bad:
            raise ValueError(
                f"SparseVLM scoring layers {bad} are out of range for {n_layers} decoder layers: a scoring "
                f"layer p prunes from layer p + 1, so p must be <= {n_layers - 2}."
            )
        n_stages = len(self.keep) if self.keep is not None else len(SPARSEVLM_SCHEDULES[self.budget])
        if len(layers) != n_stages:
            raise ValueError(f"SparseVLM has {len(layers)} scoring layers {layers} but {n_stages} keep counts.")
        return layers

    def stage_layers(self, n_layers: int) -> list[tuple[int, int]]:
        return [(p, p + 1) for p in self.scoring_layers(n_layers)]

    def keep_counts(self, n_image: int) -> list[int]:
        if self.keep is not None:
            counts = list(self.keep)
        else:
            counts = [max(1, int(round(c * n_image / 576))) for c in SPARSEVLM_SCHEDULES[self.budget]]
        if counts[0] > n_image:
            raise ValueError(f"SparseVLM keeps {counts[0]} visual tokens but the image has only {n_image}.")
        return counts

    def begin(self, engine, base: Stage, embeds: torch.Tensor) -> None:
        """Choose the raters from the input embeddings (once per prompt)."""
        self._counts = self.keep_counts(int(base.image[0].sum()))
        self._raters = []
        for b in range(embeds.shape[0]):
            image_idx = base.image[b].nonzero()[:, 0]
            after = torch.arange(int(image_idx.max()) + 1, base.length, device=embeds.device)
            after = after[base.real[b, after]]
            if len(after) == 0:
                raise ValueError("SparseVLM needs text after the image to rate visual tokens; the prompt has none.")
            v, t = embeds[b, image_idx].float(), embeds[b, after].float()
            relevance = torch.softmax(v @ t.T, dim=-1).mean(dim=0)
            self._raters.append(after[relevance > relevance.mean()] if bool((relevance > relevance.mean()).any()) else after)

    def score_tokens(self, engine, stage_idx, module, query, key, stage: Stage) -> torch.Tensor:
        scores = []
        for b, raters in enumerate(self._raters):
            rows = (stage.source[b][None, :] == raters[:, None]).float().argmax(dim=1)  # raters are never dropped
            probs = attention_rows(module, query[b : b + 1], key[b : b + 1], rows[None], stage.real[b : b + 1])
            scores.append(probs[0].mean(dim=0))
        return torch.stack(scores)

    def select(self, engine, stage_idx, scores, prev: Stage, hidden):
        keep = self._counts[stage_idx]
        indices, merged_all = [], []
        for b in range(hidden.shape[0]):
            image_idx = prev.image[b].nonzero()[:, 0]
            n_visual = len(image_idx)
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
        index = torch.stack(indices)
        merged = torch.stack(merged_all).to(hidden.dtype) if merged_all else None
        return index, merged


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
