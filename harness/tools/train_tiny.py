"""Train ``llava_tiny``: a LLaVA-architecture model that really answers the shapes benchmark.

    python -m harness.tools.train_tiny --out harness/assets/llava_tiny      # what `make tiny-model` runs

Everything is seeded: the architecture, the initial weights, the auxiliary heads, the training
samples (drawn from the shapes *train* split only; its scenes can't occur in val or test) and
their order. The main loss is next-token cross-entropy on the assistant's answer tokens, every
turn of a multi-turn sample included (teacher forcing with the gold earlier answers). The output
directory is a normal Hugging Face checkpoint (config, safetensors, tokenizer, processor) that
``harness.models.load_local`` and ``from_pretrained`` read offline, plus ``training.json`` with the
recipe, the loss curves, val accuracy after each stage and the adjacent-layer attention
divergence profile of the final model.

The recipe is six named stages (A-F), each with its own seed-derived data pool, schedule and fresh
optimizer (see ``STAGES``):

A  *cells*: vision tower + projector + a linear per-cell head only. Each projected image token k
   (grid cell (k // 4, k % 4)) must predict that cell's shape and colour (or "empty"), so the
   identity of what is in a cell survives the projector (with LM loss alone the projector
   collapsed onto "is there an object": 87 % dead GELU units, colour and shape at chance).
B  *joint*: everything, LM loss + 0.5 x the per-cell loss. Learns describe, count and the answer
   formats; but attention from the answer spreads evenly over the objects, so colour / exist /
   position questions (which must pick one object by its shape) stay near chance.
C  *retrieval*: LM loss + per-cell loss + attention supervision: at layer ``ATTN_LAYER``, head
   ``ATTN_HEAD``, the query token naming the shape in the question must attend to the image token
   of the cell holding that shape (loss -log attention on it), on every answer turn whose
   question names a shape present in the scene; + a readout: linear heads on layer
   ``READOUT_LAYER``'s output at the position that predicts the answer, for the target's colour
   (6-way) and cell (16-way), and for exist questions the yes/no answer.
D  *continuation*: the same losses at a lower learning rate on a fresh pool, more exist.
E  *exist*: fresh auxiliary heads, no per-cell loss, and a match head on layer ``MATCH_LAYER``'s
   output at the shape word of an exist question predicting its yes/no (so "is the colour of the
   cell this word retrieved the colour just named?" is computed where both are at hand); an
   exist- and multiturn-heavy pool. After D, val exist was 0.90 and multiturn 0.85; after E 1.00
   and 0.95 (20 samples each).
F  *long answers*: E's losses and fresh heads on a pool weighted to the long description (30-140
   answer tokens: every object's colour, half, side and cell in reading order) and the 4-6-turn
   dialogue (one sequence, so the later turns read the earlier ones as a carried cache does), with
   every earlier type kept in the mix so the short answers do not drift. Before F, dense scored
   fact-F1 0.0 on long (it answered with the short description) and about 50 % on dialogue.

Seeded per stage, so ``--first-stage F --resume-from DIR`` (DIR: a finished run of A-E with its
training.json, such as the shipped model) gives the same weights as the full recipe (checked bit for
bit at 1 % scale).

All auxiliary heads live outside the model and are never saved. Tried and failed before this
recipe: one LM-only stage (colour/exist at chance, describe F1 0.02), and a second LM-only stage
with a fresh linear projector (``EXPERIMENTAL_STAGE_2``, removed: colour 0.10, describe F1 0.04).
Attention supervision from the *answer* token (rather than the shape word) plateaued at ~0.5.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from harness import ASSETS
from harness.models import Loaded
from harness.models.families import build_random
from harness.results import env_info
from harness.tasks import shapes

# The shipped architecture. Text: 12 Llama layers, hidden 128, 4 query heads sharing 2 KV
# heads (GQA). Vision: a 3-layer CLIP tower over 16x16 patches of a 64x64 image (16 image tokens,
# one per cell of the shapes grid).
ARCH = dict(
    family="llava",
    text=dict(backbone="llama", layers=12, hidden=128, heads=4, kv_heads=2, mlp=384, max_positions=512, rms_eps=1e-6),
    vision=dict(layers=3, hidden=64, mlp=128, heads=4, patch=16, image_size=64, projection_dim=64),
    initializer_range=0.02,
)
# The deeper variant (``model=llava_tiny_deep``): twice the layers at hidden 96, the same vision side.
ARCH_DEEP = dict(ARCH, text=dict(ARCH["text"], layers=24, hidden=96, mlp=288))
ARCHES = {"llava_tiny": ARCH, "llava_tiny_deep": ARCH_DEEP}
ATTN_LAYER, ATTN_HEAD, READOUT_LAYER, MATCH_LAYER = 2, 0, 5, 4
RETRIEVAL_TYPES = ("colour", "exist", "position")  # questions that name one shape
IGNORE = -100

_B_MIX = {"colour": 1.5, "count": 0.5, "exist": 1.5, "position": 1.0, "describe": 2.0, "multiturn": 1.5}
_C_MIX = {"colour": 2.0, "count": 0.3, "exist": 2.0, "position": 2.0, "describe": 0.5, "multiturn": 1.5}
_D_MIX = {"colour": 1.5, "count": 0.3, "exist": 3.0, "position": 1.5, "describe": 0.7, "multiturn": 2.0}
_E_MIX = {"colour": 1.0, "count": 0.3, "exist": 4.0, "position": 1.0, "describe": 0.7, "multiturn": 2.0}
# F adds the long description and the 4-6-turn dialogue, and keeps every earlier type in the mix.
_F_MIX = {"colour": 0.6, "count": 0.3, "exist": 1.2, "position": 1.2, "describe": 0.8, "multiturn": 0.8,
          "long": 3.0, "dialogue": 3.0}
STEPS_F = 1200
# Loss weights: lm (answer tokens), cells (per-cell head), attn (shape word -> its cell), readout.
STAGES: tuple[dict, ...] = (
    dict(name="A", steps=300, lr=3e-3, warmup=0.05, pool_size=12000, pool_offset=0, mix=_B_MIX,
         only_vision=True, weights=dict(lm=0.0, cells=1.0, attn=0.0, readout=0.0)),
    dict(name="B", steps=1500, lr=1e-3, warmup=0.05, pool_size=12000, pool_offset=0, mix=_B_MIX,
         weights=dict(lm=1.0, cells=0.5, attn=0.0, readout=0.0)),
    dict(name="C", steps=1300, lr=7e-4, warmup=30, pool_size=8000, pool_offset=12000, mix=_C_MIX,
         weights=dict(lm=1.0, cells=0.5, attn=1.0, readout=0.5)),
    dict(name="D", steps=700, lr=5e-4, warmup=30, pool_size=8000, pool_offset=20000, mix=_D_MIX,
         weights=dict(lm=1.0, cells=0.5, attn=1.0, readout=0.5)),
    dict(name="E", steps=600, lr=4e-4, warmup=30, pool_size=8000, pool_offset=28000, mix=_E_MIX, fresh_heads=True,
         weights=dict(lm=1.0, cells=0.0, attn=1.0, readout=0.5, match=1.0)),
    dict(name="F", steps=STEPS_F, lr=4e-4, warmup=30, pool_size=8000, pool_offset=36000, mix=_F_MIX, fresh_heads=True,
         weights=dict(lm=1.0, cells=0.0, attn=1.0, readout=0.5, match=1.0)),
)


def build_untrained(seed: int, name: str = "llava_tiny") -> Loaded:
    return build_random(**ARCHES[name], seed=seed, name=name)


class Heads(nn.Module):
    """Training-only heads: per-cell shape/colour on projected image tokens; readout at the answer."""

    def __init__(self, hidden: int, seed: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.cell_shape = nn.Linear(hidden, len(shapes.SHAPES) + 1)  # 0 = empty
            self.cell_colour = nn.Linear(hidden, len(shapes.COLOURS) + 1)
            self.read_colour = nn.Linear(hidden, len(shapes.COLOURS))
            self.read_cell = nn.Linear(hidden, shapes.GRID * shapes.GRID)
            self.read_exist = nn.Linear(hidden, 2)
            self.match = nn.Linear(hidden, 2)  # at the shape word: is there a <colour> <shape>?


def encode_sample(processor, sample: shapes.Sample, image_size: int, ids_of: dict):
    """Token ids of the whole conversation with gold answers, labels on the answer tokens only,
    pixel values, per-cell targets, and per-turn retrieval targets.

    The tokenizer splits on whitespace and punctuation only, so the answer of each turn is the
    tokens after its ``assistant :`` through the next ``</s>`` (included: the model learns to stop).
    Each turn gives ``(answer_pos, shape_pos, cell, colour, exist, word_pos)``: the position
    predicting the answer's first token, the question's shape-word position (-1 if none or the
    shape is absent), the target cell and colour (-1 if none), 1/0 for an exist question's yes/no
    (-1 otherwise), and the shape word's position whether or not the shape is present (-1 if none).
    """
    full = processor.apply_chat_template(
        _conversation(sample.questions, sample.answers), add_generation_prompt=False, tokenize=False
    )
    enc = processor(text=[full], images=[sample.image(image_size)], return_tensors="pt")
    ids = enc["input_ids"][0]
    seq = ids.tolist()
    labels = torch.full_like(ids, IGNORE)
    starts = [i + 2 for i in range(len(seq) - 1) if seq[i] == ids_of["assistant"] and seq[i + 1] == ids_of[":"]]
    assert len(starts) == len(sample.questions)
    turns = []
    for turn, start in enumerate(starts):
        end = seq.index(ids_of["</s>"], start) + 1
        labels[start:end] = ids[start:end]
        kind = sample.turn_types[turn]
        shape_pos, cell, colour, exist, word_pos = -1, -1, -1, -1, -1
        if kind in RETRIEVAL_TYPES:
            shape_pos = word_pos = max(i for i in range(start) if seq[i] in ids_of["shapes"])
            shape = processor.tokenizer.convert_ids_to_tokens(seq[shape_pos])
            obj = next((o for o in sample.scene.objects if o.shape == shape), None)
            if obj is None:
                shape_pos = -1
            else:
                cell, colour = obj.row * shapes.GRID + obj.col, list(shapes.COLOURS).index(obj.colour)
            if kind == "exist":
                exist = int(sample.answers[turn] == shapes.YES)
        turns.append((start - 1, shape_pos, cell, colour, exist, word_pos))
    cell_shape = torch.zeros(shapes.GRID * shapes.GRID, dtype=torch.long)
    cell_colour = torch.zeros(shapes.GRID * shapes.GRID, dtype=torch.long)
    for o in sample.scene.objects:
        cell_shape[o.row * shapes.GRID + o.col] = 1 + shapes.SHAPES.index(o.shape)
        cell_colour[o.row * shapes.GRID + o.col] = 1 + list(shapes.COLOURS).index(o.colour)
    return ids, labels, enc["pixel_values"][0], (cell_shape, cell_colour), turns


def _conversation(questions, answers):
    from harness.generate import conversation

    return conversation(questions, answers)


def token_ids(processor) -> dict:
    tok = processor.tokenizer
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("assistant", ":", "</s>")}
    ids["shapes"] = set(tok.convert_tokens_to_ids(list(shapes.SHAPES)))
    assert tok.unk_token_id not in ids["shapes"]
    return ids


def make_pool(processor, n: int, seed: int, image_size: int, offset: int, mix: dict):
    """Train-split samples ``offset .. offset + n - 1``, question types drawn by ``mix``."""
    rng = random.Random(seed)
    qtypes = list(mix)
    weights = [mix[q] for q in qtypes]
    ids_of = token_ids(processor)
    pool = []
    # Sample i of the split with a qtype drawn per sample: each index is used once, so every
    # training example shows a fresh train-split scene draw (scenes may repeat by chance).
    for i in range(n):
        qtype = rng.choices(qtypes, weights)[0]
        sample = shapes._make_sample("train", offset + i, qtype, len(qtypes))
        pool.append(encode_sample(processor, sample, image_size, ids_of))
    return pool


def collate(items, pad_id: int):
    length = max(len(it[0]) for it in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    turns = []
    for row, (i, l, _, _, t) in enumerate(items):
        ids[row, -len(i):] = i  # left padding, as in evaluation
        labels[row, -len(l):] = l
        mask[row, -len(i):] = 1
        shift = length - len(i)
        turns += [(row, a + shift, s + shift if s >= 0 else -1, c, k, e, w + shift if w >= 0 else -1)
                  for a, s, c, k, e, w in t]
    return {
        "input_ids": ids, "attention_mask": mask, "labels": labels,
        "pixel_values": torch.stack([it[2] for it in items]),
        "cell_shape": torch.stack([it[3][0] for it in items]), "cell_colour": torch.stack([it[3][1] for it in items]),
        "turns": torch.tensor(turns, dtype=torch.long).reshape(-1, 7),
    }


class Capture:
    """Forward hooks: the projector's output (image tokens) and the attention layer's inputs."""

    def __init__(self, model):
        self.values = {}
        lm = model.model.language_model
        self.handles = [
            model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: self.values.__setitem__("image", out)),
            lm.layers[ATTN_LAYER].self_attn.register_forward_pre_hook(self._attn, with_kwargs=True),
        ]

    def _attn(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.values["attn_in"] = (module, hidden, kwargs["position_embeddings"])

    def remove(self):
        for h in self.handles:
            h.remove()


def attention_on_target(capture: Capture, batch, image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of head ATTN_HEAD at ATTN_LAYER from each supervised shape word, on its cell's image
    token (softmax(q k^T) over the row's unpadded causal keys, post-RoPE, as the model computes it)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    turns = batch["turns"]
    sel = turns[turns[:, 2] >= 0]
    module, hidden, (cos, sin) = capture.values["attn_in"]
    rows, qpos, cells = sel[:, 0], sel[:, 2], sel[:, 3]
    d = module.head_dim
    kv_head = ATTN_HEAD // module.num_key_value_groups
    h = hidden[rows]  # (N, T, H)
    q = module.q_proj(h).view(*h.shape[:2], -1, d)[:, :, ATTN_HEAD].unsqueeze(1)  # (N, 1, T, d)
    k = module.k_proj(h).view(*h.shape[:2], -1, d)[:, :, kv_head].unsqueeze(1)
    if cos.shape[0] == 1:  # positions shared by the batch
        cos, sin = cos.expand(len(hidden), -1, -1), sin.expand(len(hidden), -1, -1)
    q, k = apply_rotary_pos_emb(q, k, cos[rows], sin[rows])
    q, k = q[:, 0], k[:, 0]  # (N, T, d)
    qv = q[torch.arange(len(sel)), qpos]  # (N, d)
    scores = torch.einsum("nd,ntd->nt", qv, k) * module.scaling
    T = k.shape[1]
    pos = torch.arange(T)
    allowed = (batch["attention_mask"][rows] > 0) & (pos[None] <= qpos[:, None])
    logp = torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    image_pos = (batch["input_ids"][rows] == image_token_id).float().cumsum(-1)  # k-th image token -> k
    is_img = batch["input_ids"][rows] == image_token_id
    target = (is_img & (image_pos == (cells + 1)[:, None])).float().argmax(-1)
    return -logp[torch.arange(len(sel)), target], logp[torch.arange(len(sel)), target].exp()


def stage_losses(model, heads: Heads, capture: Capture, batch, stage: dict) -> dict:
    w = stage["weights"]
    cfg = model.config
    losses = {}
    if stage.get("only_vision"):
        model.model.get_image_features(
            pixel_values=batch["pixel_values"], vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        out = None
    else:
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
            output_hidden_states=w["readout"] > 0 or w.get("match", 0) > 0,
        )
        losses["lm"] = nn.functional.cross_entropy(
            out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE
        )
    image = capture.values["image"]  # (B, 16, H)
    if w["cells"] > 0:
        losses["cells"] = nn.functional.cross_entropy(heads.cell_shape(image).flatten(0, 1), batch["cell_shape"].flatten()) \
            + nn.functional.cross_entropy(heads.cell_colour(image).flatten(0, 1), batch["cell_colour"].flatten())
    turns = batch["turns"]
    if w["attn"] > 0 and (turns[:, 2] >= 0).any():
        nll, p = attention_on_target(capture, batch, cfg.image_token_id)
        losses["attn"] = nll.mean()
        losses["attn_p"] = p.mean().detach()
    if w["readout"] > 0:
        hidden = out.hidden_states[READOUT_LAYER + 1]
        read = []
        t = turns[turns[:, 3] >= 0]
        if len(t):
            h = hidden[t[:, 0], t[:, 1]]
            read += [nn.functional.cross_entropy(heads.read_colour(h), t[:, 4]),
                     nn.functional.cross_entropy(heads.read_cell(h), t[:, 3])]
        t = turns[turns[:, 5] >= 0]
        if len(t):
            read.append(nn.functional.cross_entropy(heads.read_exist(hidden[t[:, 0], t[:, 1]]), t[:, 5]))
        if read:
            losses["readout"] = sum(read)
    if w.get("match", 0) > 0:
        t = turns[(turns[:, 5] >= 0) & (turns[:, 6] >= 0)]
        if len(t):
            h = out.hidden_states[MATCH_LAYER + 1][t[:, 0], t[:, 6]]
            losses["match"] = nn.functional.cross_entropy(heads.match(h), t[:, 5])
    losses["total"] = sum(w[k] * v for k, v in losses.items() if k in w and w[k] > 0)
    return losses


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def quick_eval(loaded: Loaded, image_size: int, n: int = 160, batch_size: int = 24) -> dict:
    """Dense accuracy on the first ``n`` samples of the *val* split (test stays untouched)."""
    from harness.tasks import ShapesTask

    task = ShapesTask("shapes", "val", n, list(shapes.QTYPES), image_size, {"short": 8, "describe": 48, "long": 160})
    samples = task.samples(None)
    loaded.model.eval()
    return task.score(samples, task.predictions(loaded.model, loaded.processor, samples, batch_size, torch.device("cpu")))


def divergence_profile(loaded: Loaded, image_size: int, n: int = 8) -> dict:
    """Adjacent-layer attention JS divergence (``lazyattn.calibrate``) on ``n`` val first-turn prompts."""
    import lazyattn
    from harness.generate import conversation, prompt_inputs

    samples = shapes.load_split("val", n)
    batch = prompt_inputs(
        loaded.processor, [conversation(s.questions[:1], []) for s in samples],
        [s.image(image_size) for s in samples], torch.device("cpu"), loaded.model.dtype,
    )
    with torch.no_grad():
        cal = lazyattn.calibrate(loaded.model.eval(), [batch], ratio=0.5)
    adjacent = [round(x, 5) for x in cal.adjacent]
    return {"adjacent": adjacent, "mean": round(sum(adjacent) / len(adjacent), 5),
            "min": min(adjacent), "max": max(adjacent), "lazy_layers_r0.5": cal.lazy_layers, "n_prompts": n}


def scaled(stages, scale: float) -> tuple[dict, ...]:
    """The recipe with steps, pool sizes and pool offsets multiplied by ``scale`` (for tests)."""
    if scale == 1:
        return tuple(stages)
    return tuple(
        {**s, "steps": max(1, int(s["steps"] * scale)), "pool_size": max(4, int(s["pool_size"] * scale)),
         "pool_offset": int(s["pool_offset"] * scale),
         "warmup": s["warmup"] if isinstance(s["warmup"], float) else max(1, int(s["warmup"] * scale))}
        for s in stages
    )


def train(
    out: Path, seed: int, batch_size: int, threads: int, checkpoint_every: int = 0, stages=STAGES,
    work: Path | None = None, evaluate: bool = True, profile: bool = True, name: str = "llava_tiny",
    first_stage: str | None = None, resume_from: Path | None = None,
) -> dict:
    """Run the stages in order from the seeded random init; write the checkpoint and training.json.

    With ``first_stage`` and ``resume_from`` (a directory this function wrote: the output of the
    stage before, with its training.json), the earlier stages are taken from there instead of run;
    the result is the same as a full run because every stage's data, order and optimizer depend only
    on (seed, stage), and a resumed stage must start with fresh auxiliary heads (``fresh_heads``)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    arch = ARCHES[name]
    loaded = build_untrained(seed, name)
    model, processor = loaded.model, loaded.processor
    heads = Heads(arch["text"]["hidden"], seed + 7)
    earlier = {"stages": [], "loss": [], "train_seconds": 0.0}
    if first_stage is not None:
        from transformers import LlavaForConditionalGeneration

        names = [st["name"] for st in stages]
        assert stages[names.index(first_stage)].get("fresh_heads"), "a resumed stage must start with fresh heads"
        earlier = json.loads((Path(resume_from) / "training.json").read_text())
        assert [st["name"] for st in earlier["stages"]] == names[: names.index(first_stage)], earlier["stages"]
        loaded.model = model = LlavaForConditionalGeneration.from_pretrained(resume_from, local_files_only=True)
    capture = Capture(model)
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".work" if work is None else work  # checkpoints, not shipped
    log, info_stages = [], []
    t_all = time.time()
    pools: dict = {}
    for number, stage in enumerate(stages):
        stage_seed = seed + 1000 * number
        if number < len(earlier["stages"]):
            continue
        if stage.get("fresh_heads"):
            heads = Heads(arch["text"]["hidden"], stage_seed + 7)
        t0 = time.time()
        key = (stage["pool_offset"], stage["pool_size"])
        if key not in pools:  # stages that share a pool (A and B) share its draw
            pools = {key: make_pool(processor, stage["pool_size"], seed + 1000 * number, arch["vision"]["image_size"],
                                    stage["pool_offset"], stage["mix"])}
        pool = pools[key]
        print(f"stage {stage['name']}: pool of {len(pool)} train samples in {time.time() - t0:.0f}s", flush=True)
        if stage.get("only_vision"):
            params = [p for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n]
            params += list(heads.cell_shape.parameters()) + list(heads.cell_colour.parameters())
        else:
            params = list(model.parameters()) + list(heads.parameters())
        opt = torch.optim.AdamW(params, lr=stage["lr"], weight_decay=0.01, betas=(0.9, 0.98))
        order_rng = np.random.default_rng(stage_seed)
        order, pos = order_rng.permutation(len(pool)), 0
        steps = stage["steps"]
        warmup = stage["warmup"]
        warmup = max(1, int(steps * warmup)) if isinstance(warmup, float) else warmup
        model.train()
        t0 = time.time()
        for step in range(steps):
            if pos + batch_size > len(order):
                order, pos = order_rng.permutation(len(pool)), 0
            batch = collate([pool[j] for j in order[pos : pos + batch_size]], processor.tokenizer.pad_token_id)
            pos += batch_size
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, stage["lr"], warmup)
            losses = stage_losses(model, heads, capture, batch, stage)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if step % 25 == 0 or step == steps - 1:
                row = {"stage": stage["name"], "step": step, "seconds": round(time.time() - t0, 1),
                       **{k: round(v.item(), 5) for k, v in losses.items()}}
                log.append(row)
                print(json.dumps(row), flush=True)
            if checkpoint_every and step and step % checkpoint_every == 0:
                model.eval()
                print(f"stage {stage['name']} step {step} val:", json.dumps(quick_eval(loaded, arch["vision"]["image_size"], n=60)), flush=True)
                model.save_pretrained(work / "checkpoint")  # progress survives an interrupted run
                processor.save_pretrained(work / "checkpoint")
                model.train()
        model.eval()
        seconds = round(time.time() - t0, 1)
        scores = quick_eval(loaded, arch["vision"]["image_size"]) if evaluate else None
        print(f"stage {stage['name']} done in {seconds}s val:", json.dumps(scores), flush=True)
        model.save_pretrained(work / f"stage{stage['name']}")  # snapshot after each stage, not shipped
        processor.save_pretrained(work / f"stage{stage['name']}")
        info_stages.append({**stage, "seed": stage_seed, "warmup_steps": warmup, "seconds": seconds, "val": scores})
        snapshot = {"stages": earlier["stages"] + info_stages, "loss": earlier["loss"] + log, "seed": seed,
                    "train_seconds": round(earlier["train_seconds"] + time.time() - t_all, 1)}
        (work / f"stage{stage['name']}" / "training.json").write_text(json.dumps(snapshot) + "\n")
    capture.remove()
    train_seconds = round(earlier["train_seconds"] + time.time() - t_all, 1)
    info_stages, log = earlier["stages"] + info_stages, earlier["loss"] + log
    model.save_pretrained(out)  # the model only: the auxiliary heads are not part of it
    processor.save_pretrained(out)
    info = {
        "seed": seed, "batch_size": batch_size, "threads": threads, "name": name, "arch": arch,
        "attention_supervision": {"layer": ATTN_LAYER, "head": ATTN_HEAD, "readout_layer": READOUT_LAYER,
                                  "match_layer": MATCH_LAYER},
        "resumed_at": first_stage,
        "optimizer": "AdamW(wd 0.01, betas 0.9/0.98), clip 1.0, warm-up then cosine to 5 % of peak",
        "stages": info_stages,
        "steps": sum(s["steps"] for s in info_stages),
        "pool_size": max(s["pool_offset"] + s["pool_size"] for s in stages),
        "train_seconds": train_seconds, "n_params": loaded.n_params,
        "val": info_stages[-1]["val"] if info_stages else None,
        "divergence": divergence_profile(loaded, arch["vision"]["image_size"]) if profile else None,
        "loss": log, "env": env_info(),
    }
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m harness.tools.train_tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHES), default="llava_tiny", help="which architecture (ARCHES)")
    p.add_argument("--out", type=Path, default=None, help="default: harness/assets/<arch>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)  # a concurrent job can make 2 threads slower than 1
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps and pool size")
    p.add_argument("--checkpoint-every", type=int, default=0, help="evaluate on val and save every N steps")
    p.add_argument("--first-stage", default=None, help="resume: start at this stage (with --resume-from)")
    p.add_argument("--resume-from", type=Path, default=None, help="the snapshot of the stage before --first-stage")
    p.add_argument("--work", type=Path, default=Path(".cache/train_tiny"), help="checkpoints")
    a = p.parse_args(argv)
    train(a.out or ASSETS / a.arch, a.seed, a.batch_size, a.threads, a.checkpoint_every,
          stages=scaled(STAGES, a.steps_scale), work=a.work, name=a.arch, first_stage=a.first_stage,
          resume_from=a.resume_from)


if __name__ == "__main__":
    main()
