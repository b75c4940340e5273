"""The token-pruning engine behind FastV and SparseVLM: true drops inside the decoder, with a KV cache.

Pruners work in *stages*. Stage 0 is the prompt as given. At prefill, a scoring layer's
observer ranks the current stage's image tokens from that layer's post-RoPE query and keys
(only the scoring rows are computed, so every layer keeps its attention backend), and from
the stage's first layer on the decoder carries only the kept tokens: the hidden states are
gathered, and those layers get their own attention mask and position embeddings, so their
KV cache holds kept tokens only. Decoding appends to every layer's cache; layers of stage s
attend over stage s's kept tokens plus the generated ones.

The image span is found from ``input_ids == image_token_id``, never from fixed offsets. For the
in-LLM pruners every sample of a batch must have the same number of image tokens; then every
sample keeps the same number of tokens, and left padding is carried along as masked (kept)
columns. A pruner that reduces the image tokens before the LLM (PruMerge+, HiRED: one stage at
layer 0 scored outside it, ``lazyattn.vision``) may keep different counts per sample: its
``select`` marks the padding slots, masked like left padding.

What the engine installs (forward pre-hooks on the outer model and the decoder, per-instance
``forward`` of the decoder layers from the first pruned layer, and the scoring observers on
attention modules) is mapped in ``lazyattn.attention``; all of it is removed on exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lazyattn.arch import attention_modules, decoder_layers, image_token_id, sliding_window
from lazyattn.attention import patch_attention
from lazyattn.base import Plan
from lazyattn.cache import PreallocatedCache, pad_rows


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
    unpadded: bool | None = None  # no padding column in the prompt part (read once, at prefill)
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


_EXPLICIT_MASKS = [False]  # set inside ``explicit_stage_masks()``


@contextlib.contextmanager
def explicit_stage_masks():
    """Inside this block every pruned stage gets its explicit mask, even where none is needed (an
    unpadded prefill or decode step on SDPA): the reference against which the checks compare the
    mask-free path (flash attention, which takes no explicit mask, is left as it is)."""
    before = _EXPLICIT_MASKS[0]
    _EXPLICIT_MASKS[0] = True
    try:
        yield
    finally:
        _EXPLICIT_MASKS[0] = before


def _stage_mask(impl: str, real: torch.Tensor, q_len: int, dtype: torch.dtype, unpadded: bool | None = None):
    """The attention mask the model's backend expects, for ``q_len`` queries at the end of ``real``.

    Same conventions as transformers' own masks: flash-attention a 2D padding mask, eager a 4D
    float (0 or the dtype's minimum), sdpa (and any other backend) a 4D bool (True attends).
    Like transformers (``_ignore_causal_mask_sdpa``), no mask at all (None) whenever the stage
    holds no padding and the causal structure is the default one: the queries are the whole
    sequence (a prefill: SDPA's ``is_causal``) or a single token (a decode step attends to every
    cached column). A stage of kept or merged tokens, gaps in its positions included, is causal
    over its own sequence, so this holds for it too. That keeps pruned layers on SDPA's flash
    kernel, as dense and lazy layers are. Eager always gets its mask, as transformers gives it.
    ``unpadded`` (whether ``real`` is all True), when the caller knows it, saves a host sync.
    """
    kv = real.shape[1]
    unpadded = bool(real.all()) if unpadded is None else unpadded
    if impl.startswith("flash"):
        return None if unpadded else real.to(torch.long)
    if impl != "eager" and unpadded and (q_len == 1 or q_len == kv) and not _EXPLICIT_MASKS[0]:
        return None
    cols = torch.arange(kv, device=real.device)
    rows = torch.arange(q_len, device=real.device) + (kv - q_len)
    allowed = (cols[None, :] <= rows[:, None])[None, None] & real[:, None, None, :]
    if impl == "eager":
        zero = torch.zeros((), dtype=dtype, device=real.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    return allowed


# --------------------------------------------------------------------------- the engine


class PruneEngine:
    """Runs a token pruner's stages inside one model while installed.

    ``pruner.apply(model)`` installs one of these (with the lazy layers ``anchor_of``, lazy
    layer -> anchor, when composed with Lazy Attention) and yields the model. To inspect a
    prompt's stages, construct the engine yourself and read ``engine.stages`` inside the block::

        engine = PruneEngine(model, FastV(k=2, ratio=0.5))
        with engine.install():
            model(**inputs)
            stages = engine.stages  # the stages of the last prefill, in layer order

    One engine holds one prompt's state at a time (the attributes ``__init__`` lists under
    "per-prompt state"): it is replaced at each prefill and released on exit. The pruner itself
    holds none: what ``pruner.begin`` returns is kept here as ``prompt_state``.
    """

    def __init__(self, model: nn.Module, pruner: "TokenPruner", anchor_of: Mapping[int, int] | None = None,
                 share: str = "qk"):
        self.model = model
        self.pruner = pruner
        self.anchor_of = dict(anchor_of or {})
        self.share = share  # what the lazy layers take from their anchors (LazyAttention.share)
        self.layers = decoder_layers(model)
        self.decoder = model.get_decoder()
        self.n_layers = len(self.layers)
        self.image_token_id = image_token_id(model)
        self.stage_layers = pruner.stage_layers(self.n_layers)  # [(score_layer, first_layer), ...]
        # the stages' own masks are full causal ones: fine while no sequence outgrows a window
        windows = [w for w in map(sliding_window, attention_modules(model)) if w is not None]
        self.window = min(windows) if windows else None
        text_config = model.config.get_text_config(decoder=True)
        self.impl = text_config._attn_implementation or "eager"
        rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
        self.mrope = "mrope_section" in rope
        # Per-prompt state, all of it: replaced at each prefill, released on exit.
        self.input_ids: torch.Tensor | None = None  # the outer model's input_ids in this forward
        self.step: dict[str, Any] | None = None  # this forward's positions, 2D mask and cached length
        self.prefill = False  # whether this forward is the prompt's prefill
        self.base: Stage | None = None  # stage 0: the prompt as given
        self.prefill_len = 0  # the prompt's length
        self.last_position: torch.Tensor | None = None  # (B,) the prompt's highest position per sample
        self.stages: list[Stage] = []  # the stages built at this prompt's prefill
        self.scores: dict[int, torch.Tensor] = {}  # stage index -> scores, until the stage is built
        self.prompt_state: Any = None  # what pruner.begin returned for this prompt
        self.captured: dict[str, Any] = {}  # what the pruner's own hooks (``pruner.hooks``) saw in this forward

    # -- hooks -------------------------------------------------------------------------------
    def _outer_pre_hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.input_ids = ids

    def _decoder_pre_hook(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise ValueError("token pruning expects the language model to be called with inputs_embeds (LLaVA-style).")
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if isinstance(cache, PreallocatedCache) and cache.graph:
            self._graph_step(kwargs)
            return
        past = cache.get_seq_length() if cache is not None else 0
        if past and self.stages and self.stages[0].first_layer == 0:
            # layer 0 caches the reduced prompt (a pre-LLM reducer): the prompt's own length is the model's
            past += self.prefill_len - self.stages[0].length
        batch, q_len = embeds.shape[:2]
        if self.window is not None and self.stage_layers and past + q_len > self.window:
            raise ValueError(
                f"the sequence ({past + q_len} tokens) outgrew the model's sliding window of {self.window} tokens: "
                "token pruning builds full causal masks for its stages, so it runs sequences up to the window."
            )
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
        self.step = {"positions": positions, "mask2d": mask2d, "past": past, "cache": cache}
        if cache is not None:  # its layers hold different numbers of tokens (a static graph checks their room)
            cache.pruned = True
        self.prefill = past == 0
        if self.prefill:
            self._start_prefill(embeds, positions, mask2d)
        for stage in self.stages:
            stage.mask = stage.position_embeddings = stage.position_ids = None

    def _graph_step(self, kwargs) -> None:
        """A decode step compiled as one static graph (``PreallocatedCache.enter_graph``): the decoder
        gets the prepared (B, 1, 1, T) mask over its layers' whole storage, and each stage's layers
        get theirs over their own storage (the stage's prompt columns, then the decoder's columns after
        the prompt: every layer holds the same tokens since), built on the device; nothing is read on
        the host and no shape depends on how full the cache is."""
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or positions is None:
            raise ValueError("a compiled decode step with token pruning needs the prepared storage mask (B, 1, 1, T) "
                             "and the position ids, as harness.generate passes them.")
        valid = mask[:, 0, 0, :] if mask.dtype == torch.bool else mask[:, 0, 0, :] == 0
        if positions.dim() == 2 and self.mrope:
            positions = positions[None].expand(3, -1, -1)
        self.step = {"positions": positions, "after_prompt": valid[:, self.prefill_len:]}
        self.prefill = False
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
        if self.pruner.equal_image_counts and bool((counts != counts[0]).any()):
            raise ValueError(f"every sample of a batch must have the same number of image tokens, got {counts.tolist()}.")
        if int(counts.min()) == 0:
            raise ValueError("the prompt has no image tokens (input_ids == image_token_id): nothing to prune.")
        source = torch.arange(length, device=ids.device)[None].expand(batch, -1)
        # the prompt's highest position per sample: contiguous stages continue decoding after it
        self.last_position = positions.amax(dim=-1) if positions.dim() == 2 else positions.amax(dim=(0, -1))
        base = Stage(0, source, real, image, positions, torch.zeros_like(self.last_position))
        self.base = base
        self.prefill_len = length
        self.stages = []
        self.scores = {}
        self.prompt_state = self.pruner.begin(self, base, embeds)

    def current(self) -> Stage:
        return self.stages[-1] if self.stages else self.base

    def observer(self, stage_idx: int):
        def observe(module, query, key):
            if self.prefill:
                self.scores[stage_idx] = self.pruner.score_tokens(
                    self, self.prompt_state, stage_idx, module, query, key, self.current()
                )

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
        if self.stage_layers[stage_idx][0] is None:  # reduced before the language model: no scoring layer
            scores = None
        elif stage_idx not in self.scores:
            raise RuntimeError(f"pruning stage {stage_idx} has no scores: its scoring layer did not run.")
        else:
            scores = self.scores.pop(stage_idx)
        picked = self.pruner.select(self, self.prompt_state, stage_idx, scores, prev, hidden)
        index, merged = picked[:2]
        pad = picked[2] if len(picked) > 2 else None  # slots that are padding (samples keep different counts)
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
        if pad is not None:
            real, image = real & ~pad, image & ~pad
        positions, shift = self.pruner.stage_positions(self, prev, index, real)
        stage = Stage(self.stage_layers[stage_idx][1], source, real, image, positions, shift)
        cache = self.step.get("cache")
        if pad is not None and cache is not None:  # the cache says which of its slots are padding, per row
            extra = (~real).sum(dim=1) - (~self.base.real).sum(dim=1)
            pad_rows(cache, {layer: extra for layer in range(stage.first_layer, self.n_layers)})
        self.stages.append(stage)
        return new_hidden

    def _stage_inputs(self, stage: Stage, hidden: torch.Tensor) -> None:
        if stage.position_embeddings is not None:  # already built in this forward
            return
        q_len = hidden.shape[1]
        if self.prefill:
            real, positions = stage.real, stage.positions
            stage.unpadded = unpadded = bool(real.all())
        else:
            if "after_prompt" in self.step:  # a static-graph step: the whole storage, its room masked
                real, unpadded = torch.cat([stage.real, self.step["after_prompt"]], dim=1), False
            else:
                mask2d = self.step["mask2d"]
                n_new = self.step["past"] + q_len - self.prefill_len  # tokens after the prompt, these included
                new = (
                    torch.ones(hidden.shape[0], n_new, dtype=torch.bool, device=hidden.device)
                    if mask2d is None
                    else mask2d[:, -n_new:].bool()
                )
                real = torch.cat([stage.real, new], dim=1)
                unpadded = stage.unpadded if mask2d is None else None  # no decode-time host sync when unpadded
            step_pos = self.step["positions"]
            positions = step_pos - (stage.shift[:, None] if step_pos.dim() == 2 else stage.shift[None, :, None])
        stage.mask = _stage_mask(self.impl, real, q_len, hidden.dtype, unpadded)
        if positions.dim() == 3 and positions.shape[0] == 4:  # M-RoPE with text positions prepended
            stage.position_ids, rope_positions = positions[0], positions[1:]
        elif positions.dim() == 3:  # M-RoPE (temporal, height, width)
            stage.position_ids, rope_positions = None, positions
        else:
            stage.position_ids, rope_positions = positions, positions
        stage.position_embeddings = self.decoder.rotary_emb(hidden, rope_positions)

    # -- installation ------------------------------------------------------------------------
    def observers(self) -> dict[int, list]:
        return {score: [self.observer(i)] for i, (score, _) in enumerate(self.stage_layers) if score is not None}

    @contextlib.contextmanager
    def install(self):
        """Install the pruner (and the lazy layers ``anchor_of``) on the model and yield the model;
        on exit remove every hook and forward, and clear the per-prompt state."""
        with patch_attention(self.model, self.anchor_of, self.observers(), self.share), self.pruner.hooks(self):
            handles, patched = [], []
            try:
                if not self.stage_layers:  # nothing to prune in this model (e.g. VTW at k = n_layers)
                    yield self.model
                    return
                handles.append(self.model.register_forward_pre_hook(self._outer_pre_hook, with_kwargs=True))
                handles.append(self.decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True))
                first = self.stage_layers[0][1]
                for idx in range(first, self.n_layers):
                    layer = self.layers[idx]
                    layer.forward = self._layer_forward(layer, idx)
                    patched.append(layer)
                yield self.model
            finally:
                for handle in handles:
                    handle.remove()
                for layer in patched:
                    del layer.forward
                # release the last prompt's tensors (a long evaluation must not keep them alive)
                self.input_ids = self.step = self.base = self.last_position = self.prompt_state = None
                self.stages, self.scores, self.captured = [], {}, {}


# --------------------------------------------------------------------------- the pruner base


class TokenPruner:
    """What FastV and SparseVLM share: their stages, their application, and the position rule.

    A pruner is a dataclass of hyper-parameters and holds no per-prompt state: ``begin`` returns
    that state once per prompt, the engine keeps it (``engine.prompt_state``) and passes it back
    to ``score_tokens`` and ``select``. ``positions`` ("original" or "contiguous") picks the rule
    of ``stage_positions``; a subclass may make it a field.
    """

    positions = "original"
    equal_image_counts = True  # every sample of a batch must have as many image tokens (False: pre-LLM reducers)
    families = None  # the model families (config.model_type) it is defined for; None: every supported one
    host_sync = False  # True where selecting tokens waits on the host (data-dependent counts)

    def schedule(self, n_layers: int) -> str:
        """One phrase: what the pruner changes (its settings, unless a subclass says more)."""
        return f"{self.name}: " + " ".join(f"{k}={v}" for k, v in self.params().items())

    def plan(self, n_layers: int) -> Plan:
        return Plan(pruner=self.name, pruned_from=min(self.first_layers(n_layers), default=None),
                    families=self.families, host_sync=self.host_sync, schedule=self.schedule(n_layers),
                    series=self.name)

    def hooks(self, engine: PruneEngine):
        """A context manager installing the pruner's own hooks (e.g. on the vision tower; they write
        into ``engine.captured``) for as long as the engine is installed; none by default."""
        return contextlib.nullcontext()

    def stage_layers(self, n_layers: int) -> list[tuple[int, int]]:
        """``(scoring layer, first pruned layer)`` of every stage, for ``n_layers`` decoder layers.

        A scoring layer of None marks a stage scored outside the language model (``(None, 0)``: the
        image tokens are reduced before it, from what ``begin`` computed); ``select`` then gets
        ``scores=None``."""
        raise NotImplementedError

    def begin(self, engine: PruneEngine, base: Stage, embeds: torch.Tensor) -> Any:
        """The per-prompt state, computed at prefill before layer 0 (none by default)."""
        return None

    def score_tokens(self, engine: PruneEngine, state: Any, stage_idx: int, module: nn.Module,
                     query: torch.Tensor, key: torch.Tensor, stage: Stage) -> torch.Tensor:
        """(B, L) scores of the current stage's tokens, from the scoring layer's query and keys."""
        raise NotImplementedError

    def select(self, engine: PruneEngine, state: Any, stage_idx: int, scores: torch.Tensor, prev: Stage,
               hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L') indices of the kept tokens into ``prev`` (indices ``>= prev.length`` point at the
        merged tokens), and the merged tokens' hidden states (B, M, C) or None. A pruner whose samples
        keep different counts returns a third element, (B, L') bool: the slots that are padding
        (masked like left padding; their index may point anywhere valid)."""
        raise NotImplementedError

    def first_layers(self, n_layers: int) -> list[int]:
        """The layers from which fewer tokens are carried: none of them may be lazy."""
        return [first for _, first in self.stage_layers(n_layers)]

    def stage_positions(self, engine: PruneEngine, prev: Stage, index, real):
        """Position ids of the new stage, and the per-sample shift applied to decode positions.

        ``original``: kept tokens keep their positions (gaps allowed); a merged token takes the
        position of the token before it; decoding continues after the prompt's original length.
        ``contiguous``: real tokens are re-numbered 0, 1, ... (padding gets 1, as transformers
        does), and decoding continues right after the last kept token.
        """
        n_prev = prev.length
        b_idx = torch.arange(index.shape[0], device=index.device)[:, None]
        safe = index.clamp(max=n_prev - 1)
        if self.positions == "original":
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
        """Install this pruner on ``model`` (a ``PruneEngine``); yields the model."""
        return run_pruner(model, self)


@contextlib.contextmanager
def run_pruner(model: nn.Module, pruner: TokenPruner, anchor_of: Mapping[int, int] | None = None,
               share: str = "qk"):
    """Install ``pruner`` on ``model``, with the lazy layers ``anchor_of`` (lazy -> anchor, sharing
    ``share``), if any; yields the model."""
    with PruneEngine(model, pruner, anchor_of, share).install():
        yield model
