"""Greedy generation over conversations, batched with left padding, multi-turn aware.

Data flows one way: a task builds ``Conversation``s (first-turn messages and images, per-turn
budgets and questions), ``answer`` answers them, the task scores the ``Answer``s. Every caller
answers through ``answer``: the built-in tasks, the tiny model's training-time evaluation, and
the lmms-eval and VLMEvalKit models.

A conversation's answer depends on it alone: every row in a batch is cut to its own token
budget, so accuracy does not change with batch size. Each first-turn prompt goes through the
processor once; batches are formed among conversations with the same number of image tokens
(token pruning needs that; LLaVA-NeXT's anyres tiling and Qwen2-VL's dynamic resolution vary it
with the image), counted in that pass, and the same longest token budget (a batch decodes until
its longest row ends), and stacked from the processed prompts; answers still come out in order.

Multi-turn conversations run in one of two modes (``task.multiturn``):

- ``carry`` (what a chat server does): turn 1 is prefilled once, with the image; every later
  turn feeds only its new tokens (the model's own previous answer, as generated, then the next
  user turn and the generation prompt) as a continuation of the same KV cache. Token pruning
  keeps the decisions it made at turn 1's prefill; lazy layers keep reusing their anchors.
- ``reencode``: every turn re-encodes the whole conversation (image included) into a fresh
  cache, so a pruning method prunes again with the newest question in view.

Inside a batch, rows stop at different lengths; the tokens a row generates past its own end
(its stop token or its budget) stay in the cache but are masked out, and the positions of the
tokens after them are counted over real tokens only, so a row's numbers do not depend on its
neighbours. ``kv_bytes`` per sample counts the cache bytes of its real tokens only.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from lazyattn.cache import CACHE_KINDS, ConcatenatingCache, Growing, PreallocatedCache, new_cache, row_padding

MULTITURN_MODES = ("carry", "reencode")
# Answering learns whether every row has ended (its stop token) from the device at most once every this many
# steps; between two checks an ended row keeps generating into masked cache slots. Timed decodes never check.
CHECK_EVERY = 8


def conversation(questions: Sequence[str], answers: Sequence[str]) -> list[dict]:
    """Chat messages for turns so far: the image goes with the first question only."""
    messages = []
    for turn, question in enumerate(questions):
        content = ([{"type": "image"}] if turn == 0 else []) + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        if turn < len(answers):
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answers[turn]}]})
    return messages


def prompt_inputs(processor, histories: Sequence[list[dict]], images: Sequence, device, dtype=None) -> dict:
    """Left-padded model inputs; pixel values in the model's dtype when ``dtype`` is given."""
    texts = [processor.apply_chat_template(h, add_generation_prompt=True, tokenize=False) for h in histories]
    inputs = processor(text=texts, images=list(images) or None, padding=True, return_tensors="pt")
    return to_device(dict(inputs), device, dtype)


def to_device(inputs: dict, device, dtype=None) -> dict:
    """Processed inputs on ``device``, pixel values in ``dtype`` when given."""
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if dtype is not None and "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def cache_kwarg(model) -> str:
    """transformers 5.24 renamed forward's ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def row_kv_bytes(cache, mask: torch.Tensor) -> list[int]:
    """KV cache bytes of each row's real tokens: a layer holding ``T`` tokens keeps ``T - holes``
    of them for a row with ``holes`` masked positions (padding and tokens past its end; pruning
    drops only real image tokens, never those). Lazy layers hold values only. A reducer whose samples
    keep different counts pads the shorter ones in the layers after it; ``lazyattn.cache.row_padding``
    names those slots per layer (the pruning engine records them) and they are not counted either."""
    holes = (mask == 0).sum(dim=1)
    padding = row_padding(cache)
    total = torch.zeros_like(holes)
    for idx, layer in enumerate(cache.layers):
        layer_holes = holes + padding[idx].to(holes.device) if idx in padding else holes
        for tensor in (layer.keys, layer.values):
            if isinstance(tensor, torch.Tensor) and tensor.numel():
                per_token = tensor[0, ..., 0, :].numel() * tensor.element_size()
                total += per_token * (tensor.shape[-2] - layer_holes)
    return [int(x) for x in total]


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# what compiles the captured graph: inductor (generated kernels; CUDA graphs on a GPU). The suite checks
# some methods' capture with "aot_eager" (the same one static graph, run by ATen: no code generation)
COMPILE_BACKEND = "inductor"
RECOMPILE_LIMIT = 64  # graphs dynamo keeps for one forward (its default, 8, is one bench's variants)


def compiled_decode(model):
    """The model's forward compiled for one-token decode steps with static shapes, one per model, the
    way gpt-fast decodes: ``fullgraph=True, dynamic=False``, and on CUDA ``mode="reduce-overhead"``
    (CUDA graphs). The step it is given attends over the whole preallocated storage with a validity
    mask and writes the cache at device cursors (``PreallocatedCache.enter_graph``), so the shapes do
    not change as the cache fills and the graph is captured once per (batch, storage length). A
    method's patched attention forwards are traced too (another method recompiles once, by dynamo's
    guards)."""
    compiled = _COMPILED.setdefault(model, {})
    if COMPILE_BACKEND not in compiled:
        cuda = next(model.parameters()).device.type == "cuda"
        # one graph per (method, batch, storage length) on the model's forward: room for a bench's variants
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        inductor = COMPILE_BACKEND == "inductor"
        compiled[COMPILE_BACKEND] = torch.compile(model.forward, backend=COMPILE_BACKEND, fullgraph=True, dynamic=False,
                                                  mode="reduce-overhead" if cuda and inductor else None)
    return compiled[COMPILE_BACKEND]


def storage_mask(mask: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The (B, 1, 1, T) attention mask of a one-token step over the whole storage from its (B, T)
    validity (0 at padding, ended rows' slots and the room not yet written), as the backend takes a
    prepared mask: boolean for SDPA, additive for eager attention."""
    valid = mask.bool()[:, None, None, :]
    if implementation == "eager":
        return torch.zeros(valid.shape, dtype=dtype, device=mask.device).masked_fill(~valid, torch.finfo(dtype).min)
    return valid


@dataclasses.dataclass
class Dialogue:
    """The batch's KV cache and, per row, its mask over the cache and its next position."""

    cache: PreallocatedCache | ConcatenatingCache  # a kind of CACHE_KINDS (new_cache)
    grow_mask: Growing  # (B, cached tokens), preallocated with the cache: 1 for real tokens, written in place
    next_position: torch.Tensor  # (B,): the position of each row's next real token
    pending: list[list[int]]  # per row: generated answer tokens not yet fed to the cache
    holes: bool = False  # whether the mask may have a 0 (known on the host: no device read to decide)

    @property
    def mask(self) -> torch.Tensor:
        return self.grow_mask.view


class Generator:
    """Greedy decoding for one batch with a KV cache the caller may carry across turns.

    This is the one decode loop of the harness: the evaluation answers with it and the efficiency
    measurement (``harness.measure.generate_once``) times it. ``cache`` picks the KV cache
    (``lazyattn.cache.CACHE_KINDS``): ``static`` preallocates each layer for its prompt plus the
    turn's budget and writes in place, ``dynamic`` is transformers' concatenating cache.

    A decode step reads nothing from the device and builds no tensor from Python data: the
    greedy tokens stay on the device, the stop token is suppressed (``min_new_tokens``) by filling
    a logit column, a row's end (its stop token or its budget) is a device mask, and the attention
    mask is preallocated with the cache and written in place. Answering asks the device whether
    every row has ended once every ``CHECK_EVERY`` steps; a forced-length generation (timing:
    ``min_new_tokens`` above every budget) never asks until it is done. The mask goes to the model
    only when it may have a hole (padding, or a row that may have ended), which the host knows
    without asking the device.

    M-RoPE models (Qwen2-VL, Qwen2.5-VL) get the three-axis positions of their prompt from the
    model's own ``get_rope_index`` at prefill (as ``generate`` computes them); the tokens after it
    are text, one position a token on every axis.
    """

    def __init__(self, model, processor, device, min_new_tokens: int = 0, cache: str = "static",
                 compile: bool = False):
        if cache not in CACHE_KINDS:
            raise ValueError(f"cache must be one of {list(CACHE_KINDS)}, got {cache!r}.")
        self.model, self.processor, self.device = model, processor, device
        # single-token decode forwards through torch.compile (compiled_decode) as one static graph where the
        # cache allows it (``graph_blocker``); prefill and chunks stay eager
        self.decode_forward = compiled_decode(model) if compile else None
        self.graph_note: str | None = None  # why the last decode could not run as a graph (compile=True)
        self.cache_kind = cache
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.cache_arg = cache_kwarg(model)
        self.eos = model.generation_config.eos_token_id
        self.eos = self.eos[0] if isinstance(self.eos, list) else self.eos
        self.pad = model.generation_config.pad_token_id
        self.pad = self.eos if self.pad is None else self.pad
        self.pad = 0 if self.pad is None else self.pad
        # An image placeholder in an answer would break the next turn's prompt: never generate one.
        self.suppress = getattr(model.config, "image_token_id", None)
        # M-RoPE models (Qwen2-VL) position the prompt's image tokens on a grid: computed at prefill
        text_config = model.config.get_text_config(decoder=True)
        rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
        self.mrope = "mrope_section" in rope
        self.min_new_tokens = int(min_new_tokens)

    def _forward(self, dialogue: Dialogue, ids: torch.Tensor, new_mask: torch.Tensor, positions=None,
                 **extra) -> torch.Tensor:
        """Feed ``ids`` (B, n) with their mask; returns the next-token logits (B, vocab). ``positions``
        overrides the positions of these tokens (an M-RoPE prompt's three-axis ones)."""
        if positions is None:
            positions = dialogue.next_position[:, None] + new_mask.long().cumsum(dim=1) - 1
            positions = torch.where(new_mask.bool(), positions, torch.ones_like(positions))
        dialogue.grow_mask.append(new_mask)
        dialogue.next_position = dialogue.next_position + new_mask.long().sum(dim=1)
        if dialogue.holes:  # a masked step reads nothing on the host (where the cache kind allows it)
            dialogue.cache.masks_on_device = True
        # one static graph: the whole storage, a validity mask
        if dialogue.cache.graph:
            out = self.decode_forward(
                input_ids=ids, attention_mask=storage_mask(dialogue.grow_mask.storage, self.implementation,
                                                           self.model.dtype),
                use_cache=True, logits_to_keep=1, position_ids=positions, **{self.cache_arg: dialogue.cache},
            )
            dialogue.cache.catch_up(ids.shape[1])  # the valid views, on the host
            return out.logits[:, -1].float()
        out = self.model(
            input_ids=ids, attention_mask=dialogue.mask if dialogue.holes else None, use_cache=True,
            logits_to_keep=1, position_ids=positions, **{self.cache_arg: dialogue.cache}, **extra,
        )
        return out.logits[:, -1].float()

    @property
    def implementation(self) -> str:
        return self.model.config.get_text_config(decoder=True)._attn_implementation

    def _enter_graph(self, dialogue: Dialogue, steps: int) -> bool:
        """Switch the dialogue's cache to graph mode for ``steps`` one-token steps, where it can be."""
        cache = dialogue.cache
        blocker = cache.graph_blocker()
        if blocker is None and self.implementation not in ("sdpa", "eager"):
            blocker = f"the {self.implementation} backend (a static graph needs a prepared mask: sdpa or eager)"
        self.graph_note = None if blocker is None else f"decode ran eagerly: {blocker}"
        if blocker is not None:
            return False
        cache.enter_graph(steps)
        mask = dialogue.grow_mask
        mask.enter_graph(steps)
        # every layer (a pruner's stages too) takes the steps at the same storage columns as the mask
        if (cache.rooms() != {mask.storage.shape[1] - mask.length}
                or not cache.pruned and cache.storage_length() != mask.storage.shape[1]):
            cache.exit_graph()
            self.graph_note = "decode ran eagerly: the layers' storage and the mask's differ in length or room"
            return False
        return True

    def _decode(self, dialogue: Dialogue, logits: torch.Tensor, budgets: Sequence[int],
                on_step: Callable[[Dialogue], None] | None = None) -> list[list[int]]:
        """Greedy tokens per row until its stop token (not before ``min_new_tokens``) or its budget.
        ``on_step(dialogue)`` is called after every decode forward (the measurement counts bytes there).

        Within one call every row that has not ended has generated as many tokens as the step count,
        so the stop token is suppressed for all rows alike while the step is below ``min_new_tokens``.
        A row ends on the device (``alive``); its token of a step is fed (mask 1) only if the row goes
        on after it, so every row's last token is pending, not cached, at the end of the call. The
        host reads the device only every ``CHECK_EVERY`` steps (has every row ended?) and once at the
        end (the token table)."""
        batch, device = logits.shape[0], logits.device
        budgets = [max(0, int(b)) for b in budgets]
        horizon = max(budgets, default=0)
        if horizon == 0:
            dialogue.pending = [[] for _ in range(batch)]
            return [[] for _ in range(batch)]
        # which rows still have budget at each step, built once for the call
        within = torch.arange(horizon, device=device)[None, :] < torch.tensor(budgets, device=device)[:, None]
        mask_dtype = dialogue.mask.dtype
        stops = self.eos is not None
        steps: list[torch.Tensor] = []
        graph = self.decode_forward is not None and horizon > 1 and self._enter_graph(dialogue, horizon)
        try:
            alive = within[:, 0]
            for step in range(horizon):
                if self.suppress is not None:
                    logits.select(-1, self.suppress).fill_(float("-inf"))
                if stops and step < self.min_new_tokens:
                    logits.select(-1, self.eos).fill_(float("-inf"))
                tokens = logits.argmax(dim=-1)
                steps.append(tokens)
                if step + 1 == horizon:
                    break
                alive = alive & within[:, step + 1]
                if stops and step >= self.min_new_tokens:
                    alive = alive & (tokens != self.eos)
                    if (step + 1) % CHECK_EVERY == 0 and not bool(alive.any()):  # the only read in the loop
                        break
                # a row may have ended at this step or before (a budget, or a stop token): the mask may have a hole
                if min(budgets) <= step + 1 or (stops and step >= self.min_new_tokens):
                    dialogue.holes = True
                # a token goes into the cache only if its row goes on after it: a row's last token (its stop
                # token, or the last of its budget) stays pending, whichever step the row ends at and whatever
                # its neighbours do, so a row's KV bytes do not depend on the batch or the check cadence
                ids = torch.where(alive, tokens, self.pad)[:, None]
                logits = self._forward(dialogue, ids, alive[:, None].to(mask_dtype))
                if on_step is not None:
                    on_step(dialogue)
        finally:
            if graph:
                dialogue.cache.exit_graph()
        table = torch.stack(steps, dim=1).tolist()  # (B, steps): one device read
        answers = []
        for row, budget in zip(table, budgets):
            row = row[:budget]
            answers.append(row[: row.index(self.eos) + 1] if stops and self.eos in row else row)
        # a row's last token was never fed (``_steps``): it is the row's pending tail
        dialogue.pending = [[a[-1]] if a else [] for a in answers]
        return answers


    def new_dialogue(self, batch: int, reserve: int) -> Dialogue:
        """An empty dialogue with a fresh cache of the generator's kind (``reserve``: the tokens to
        preallocate beyond each layer's first chunk; the mask is preallocated alike)."""
        cache = new_cache(self.cache_kind, self.model.config, reserve)
        grow_mask = Growing(1, cache.reserve)  # preallocated where the cache is
        grow_mask.start(torch.zeros(batch, 0, dtype=torch.long, device=self.device))
        return Dialogue(
            cache=cache,
            grow_mask=grow_mask,
            next_position=torch.zeros(batch, dtype=torch.long, device=self.device),
            pending=[[] for _ in range(batch)],
        )

    def prefill(self, inputs: dict, reserve: int) -> tuple[Dialogue, torch.Tensor]:
        """Prefill processed prompt ``inputs`` (left-padded ids, mask, image tensors) into a fresh
        cache; returns the dialogue and the next-token logits."""
        inputs = dict(inputs)
        ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
        dialogue = self.new_dialogue(ids.shape[0], reserve)
        dialogue.holes = not bool(mask.all())
        positions = None
        if self.mrope:  # the prompt's three-axis positions, as `generate` computes them; text after it
            positions, _ = self.rope_index(ids, mask, inputs)
            dialogue.next_position = positions[0, :, -1] + 1 - mask.sum(dim=1)
        else:  # prompt positions are those of the padded sequence (0 .. L-1), as `generate` gives them
            dialogue.next_position = (ids.shape[1] - mask.sum(dim=1)).long()
        return dialogue, self._forward(dialogue, ids, mask, positions=positions, **inputs)

    def rope_index(self, ids: torch.Tensor, mask: torch.Tensor, inputs: dict):
        """An M-RoPE model's (3, B, L) prompt positions and its per-row deltas, from the model's own
        ``get_rope_index`` (the language model's, which ``generate`` calls)."""
        rope_index = self.model.model.get_rope_index
        accepted = inspect.signature(rope_index).parameters
        extra = {k: v for k, v in inputs.items() if k in accepted and k not in ("input_ids", "attention_mask")}
        return rope_index(ids, attention_mask=mask, **extra)

    def first_turn(self, histories, images, budgets) -> tuple[Dialogue, list[list[int]]]:
        """Prefill the prompts (with their images) into a fresh cache and answer them."""
        return self.answer_inputs(prompt_inputs(self.processor, histories, images, self.device, self.model.dtype),
                                  budgets)

    def answer_inputs(self, inputs: dict, budgets) -> tuple[Dialogue, list[list[int]]]:
        """Prefill processed prompts (left-padded ids, mask, image tensors, on the device) into a
        fresh cache and answer them."""
        dialogue, logits = self.prefill(inputs, max(budgets))
        return dialogue, self._decode(dialogue, logits, budgets)

    def next_turn(self, dialogue: Dialogue, continuations: Sequence[list[int] | None], budgets) -> list[list[int]]:
        """Feed each row's continuation tokens (None: the row has no further turn) into the carried
        cache, left-padded to one chunk, and answer."""
        if self.mrope:
            raise ValueError(
                "task.multiturn=carry is not supported for M-RoPE models (Qwen2-VL, Qwen2.5-VL): they position "
                "their tokens from the image grid; use task.multiturn=reencode."
            )
        width = max(len(c) for c in continuations if c is not None)
        ids = torch.full((len(continuations), width), self.pad, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for i, tokens in enumerate(continuations):
            if tokens:
                ids[i, width - len(tokens) :] = torch.tensor(tokens, device=self.device)
                mask[i, width - len(tokens) :] = 1
        if any(c is None or len(c) < width for c in continuations):
            dialogue.holes = True
        logits = self._forward(dialogue, ids, mask.to(dialogue.mask.dtype))
        return self._decode(dialogue, logits, [b if c is not None else 0 for b, c in zip(budgets, continuations)])

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def continuation(self, dialogue: Dialogue, row: int, questions: Sequence[str], answers: Sequence[str],
                     generated: list[int]) -> list[int]:
        """The tokens that take row ``row`` from its last generated token to the next turn's
        generation prompt: the answer's unfed tail, the end of the assistant turn, the next user
        turn. The chat template must close an assistant turn with the EOS token (LLaVA's does)."""
        before = self.processor.apply_chat_template(conversation(questions[:-1], answers), tokenize=False)
        after = self.processor.apply_chat_template(
            conversation(questions, answers), add_generation_prompt=True, tokenize=False
        )
        eos_text = self.tokenizer.eos_token
        if not after.startswith(before) or not before.rstrip().endswith(eos_text):
            raise ValueError(
                "task.multiturn=carry needs a chat template that ends an assistant turn with the EOS token and "
                "extends the conversation as a prefix; use task.multiturn=reencode with this model."
            )
        tail = list(dialogue.pending[row])
        if not generated or generated[-1] != self.eos:
            tail.append(self.eos)
        return tail + self.tokenizer(after[len(before) :], add_special_tokens=False)["input_ids"]


@dataclasses.dataclass
class Conversation:
    """One thing to answer, as a task builds it: the first turn's chat messages (image
    placeholders) and their images, each turn's token budget and, for a multi-turn conversation,
    every turn's question. The generator answers it; it never calls back into the task."""

    id: str
    history: list[dict]  # the first turn's chat messages
    images: list  # their images, in placeholder order (the first turn carries every image)
    budgets: list[int]  # one per turn
    questions: list[str] = dataclasses.field(default_factory=list)  # every turn's question; [] for one turn

    @classmethod
    def of_questions(cls, id: str, questions: Sequence[str], budgets: Sequence[int], images: list) -> Conversation:
        """The image with the first question, then one user question per turn."""
        if len(questions) != len(budgets):
            raise ValueError(f"conversation {id}: {len(questions)} questions but {len(budgets)} budgets")
        return cls(id, conversation(questions[:1], []), list(images), list(budgets), list(questions))

    def history_at(self, turn: int, answers: Sequence[str]) -> list[dict]:
        return self.history if turn == 0 else conversation(self.questions[: turn + 1], answers)


@dataclasses.dataclass
class Answer:
    conversation: Conversation
    turns: list[str]  # the text of every turn's answer
    kv_bytes: list[int]  # the conversation's KV cache bytes at the end of each turn

    @property
    def id(self) -> str:
        return self.conversation.id

    @property
    def prediction(self) -> str:
        return self.turns[-1]


# Tensors a processor returns one entry per prompt token: left-padded when prompts are batched.
PER_TOKEN = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
WINDOW_BATCHES = 16  # first turns are processed this many batches ahead (bounded memory), then grouped


def collate(items: Sequence[dict], pad_id: int) -> dict | None:
    """Prompts processed one by one (batch 1 each) -> the left-padded batch the processor would
    have made of them together; None where a tensor cannot be stacked (e.g. LLaVA-NeXT tiles of
    different counts), so the caller processes that batch jointly."""
    width = max(x["input_ids"].shape[1] for x in items)
    out = {}
    for key in items[0]:
        values = [x[key] for x in items]
        if key in PER_TOKEN:
            fill = pad_id if key == "input_ids" else 0
            padded = values[0].new_full((len(values), width), fill)
            for row, value in enumerate(values):
                padded[row, width - value.shape[1] :] = value[0]
            out[key] = padded
        elif all(v.shape[1:] == values[0].shape[1:] for v in values):
            out[key] = torch.cat(values, dim=0)
        else:
            return None
    return out


def batches(keys: Sequence, batch_size: int) -> list[list[int]]:
    """Indices ``0 .. len(keys)-1`` in batches of at most ``batch_size`` sharing a key, each batch
    in index order, the batches ordered by their first index."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    out = [g[s : s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]
    return sorted(out, key=lambda b: b[0])


def answer(model, processor, conversations: Iterable[Conversation], batch_size: int, device, multiturn: str = "carry",
           min_new_tokens: int = 0, cache: str = "static") -> Iterator[Answer]:
    """Every conversation's answers, in order, each as soon as every earlier one is done.

    ``conversations`` is read ``WINDOW_BATCHES`` batches ahead (pass a generator to load images
    lazily: memory stays bounded by the window). Each first-turn prompt goes through the
    processor once; within a window conversations with the same number of image tokens (counted
    in that one pass) and the same longest budget form batches of ``batch_size``, stacked from the
    processed prompts."""
    if multiturn not in MULTITURN_MODES:
        raise ValueError(f"task.multiturn must be one of {list(MULTITURN_MODES)}, got {multiturn!r}.")
    gen = Generator(model, processor, device, min_new_tokens, cache=cache)
    image_token = getattr(model.config, "image_token_id", None)
    pad_id = getattr(gen.tokenizer, "pad_token_id", None)
    pad_id = gen.pad if pad_id is None else pad_id
    window = WINDOW_BATCHES * max(1, batch_size)
    finished: dict[int, Answer] = {}
    next_out, start, source = 0, 0, iter(conversations)
    with torch.inference_mode():
        while chunk := list(itertools.islice(source, window)):
            processed = [prompt_inputs(processor, [c.history], c.images, "cpu") for c in chunk]
            # a batch shares its image-token count (pruning needs it) and its longest budget (a batch decodes
            # until its longest row ends: short answers batched with long ones would wait for them)
            keys = [(0 if image_token is None else int((p["input_ids"] == image_token).sum()),
                     max(c.budgets, default=0)) for p, c in zip(processed, chunk)]
            for index in batches(keys, batch_size):
                batch = [chunk[i] for i in index]
                inputs = collate([processed[i] for i in index], pad_id) if len(index) > 1 else processed[index[0]]
                if inputs is None:  # not stackable one by one: the processor batches them itself
                    inputs = prompt_inputs(processor, [c.history for c in batch], [i for c in batch for i in c.images],
                                           "cpu")
                inputs = to_device(inputs, device, model.dtype)
                for i, ans in zip(index, _answer_batch(gen, batch, inputs, multiturn)):
                    finished[start + i] = ans
                while next_out in finished:
                    yield finished.pop(next_out)
                    next_out += 1
            start += len(chunk)


def _answer_batch(gen: Generator, batch: Sequence[Conversation], inputs: dict, multiturn: str) -> list[Answer]:
    replies: list[list[str]] = [[] for _ in batch]
    tokens: list[list[int]] = [[] for _ in batch]
    kv: list[list[int]] = [[] for _ in batch]
    dialogue = None
    for turn in range(max(len(c.budgets) for c in batch)):
        active = [i for i, c in enumerate(batch) if len(c.budgets) > turn]
        budgets = {i: batch[i].budgets[turn] for i in active}
        if turn == 0:
            dialogue, out = gen.answer_inputs(inputs, [budgets[i] for i in active])
            rows = dict(zip(active, range(len(active))))
            out = dict(zip(active, out))
        elif multiturn == "reencode":
            dialogue, out = gen.first_turn(
                [batch[i].history_at(turn, replies[i]) for i in active],
                [image for i in active for image in batch[i].images],
                [budgets[i] for i in active],
            )
            rows = dict(zip(active, range(len(active))))
            out = dict(zip(active, out))
        else:  # carry: the cache holds every row of the batch since turn 0
            conts = [
                gen.continuation(dialogue, i, batch[i].questions[: turn + 1], replies[i], tokens[i])
                if i in budgets else None for i in range(len(batch))
            ]
            out = gen.next_turn(dialogue, conts, [budgets.get(i, 0) for i in range(len(batch))])
            rows = {i: i for i in range(len(batch))}
            out = {i: out[i] for i in active}
        row_bytes = row_kv_bytes(dialogue.cache, dialogue.mask)
        for i in active:
            tokens[i] = out[i]
            replies[i].append(gen.text(out[i]))
            kv[i].append(row_bytes[rows[i]])
    return [Answer(c, turns, sizes) for c, turns, sizes in zip(batch, replies, kv)]
