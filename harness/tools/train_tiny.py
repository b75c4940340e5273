"""Train ``llava_tiny``: a LLaVA-architecture model that really answers the shapes benchmark.

    python -m harness.tools.train_tiny --out harness/assets/llava_tiny      # what `make tiny-model` runs

Everything is seeded: the architecture, the initial weights, the training samples (drawn from
the shapes *train* split only; its scenes can't occur in val or test) and their order. The
loss is next-token cross-entropy on the assistant's answer tokens, every turn of a multi-turn
sample included (teacher forcing with the gold earlier answers). The output directory is a
normal Hugging Face checkpoint (config, safetensors, tokenizer, processor) that
``harness.models.load_local`` and ``from_pretrained`` read offline, plus ``training.json`` with the
settings, the loss curve and the dense accuracy on a held-out val slice.
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
from transformers import LlavaForConditionalGeneration

from harness import ASSETS
from harness.generate import conversation
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
# Question types mixed into training; describe and multiturn are longer, so they get more weight.
TRAIN_MIX = {"colour": 1.0, "count": 1.0, "exist": 1.0, "position": 1.0, "describe": 1.5, "multiturn": 1.5}
# The recipe. One stage ships: it learns the answer formats, where objects are and how many
# (count and position near their ceiling) but colour and shape identity stay at chance: the model
# says "blue triangle" whatever the image. A linear probe shows why: colour and shape are linearly
# decodable from the vision tower's selected layer (0.93 / 1.00) but not after the projector's
# GELU (0.16 / 0.24), where 87 % of the units are dead: the LLaVA-1.5 MLP projector collapsed
# onto "is there an object". A second stage that swaps in a fresh linear projector and trains
# 3000 more steps on identity-weighted samples (``EXPERIMENTAL_STAGE_2``; run it with
# ``--first-stage 2 --init-from <stage 1>``) did not recover identity within the budget (val
# colour 0.10, describe F1 0.04) and lost some multi-turn accuracy (0.45 vs 0.70), so it is not
# part of the shipped recipe. Each stage has its own warm-up and cosine schedule and a fresh
# optimizer; its data and order depend only on (seed, stage).
STAGES: tuple[dict, ...] = (
    dict(steps=4000, lr=2e-3, vision_lr_mult=1.0, pool_size=50000, pool_offset=0, mix=TRAIN_MIX),
)
EXPERIMENTAL_STAGE_2 = dict(
    steps=3000, lr=1.5e-3, vision_lr_mult=1.0, pool_size=40000, pool_offset=50000, new_projector="linear",
    mix={"colour": 1.5, "count": 0.5, "exist": 1.5, "position": 0.5, "describe": 2.0, "multiturn": 1.5},
)
IGNORE = -100


def build_untrained(seed: int) -> Loaded:
    return build_random(**ARCH, seed=seed, name="llava_tiny")


def replace_projector(model, activation: str, seed: int) -> None:
    """A fresh LLaVA projector with ``activation`` between its two linear layers (std-0.02 init)."""
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    model.config.projector_hidden_act = activation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = LlavaMultiModalProjector(model.config)
        for linear in (projector.linear_1, projector.linear_2):
            torch.nn.init.normal_(linear.weight, std=ARCH["initializer_range"])
            if linear.bias is not None:
                torch.nn.init.zeros_(linear.bias)
    model.model.multi_modal_projector = projector


def encode_sample(processor, sample: shapes.Sample, image_size: int):
    """Token ids of the whole conversation with gold answers, and labels on the answer tokens only.

    The prompt of turn t (up to ``assistant :``) is a token prefix of the conversation through
    answer t, because the tokenizer splits on whitespace and punctuation only; the labels are
    the tokens in between, ``</s>`` included, so the model learns where to stop.
    """
    tok = processor.tokenizer
    full = processor.apply_chat_template(
        conversation(sample.questions, sample.answers), add_generation_prompt=False, tokenize=False
    )
    image = sample.image(image_size)
    enc = processor(text=[full], images=[image], return_tensors="pt")
    ids = enc["input_ids"][0]
    labels = torch.full_like(ids, IGNORE)
    for turn in range(len(sample.questions)):
        prompt = processor.apply_chat_template(
            conversation(sample.questions[: turn + 1], sample.answers[:turn]), add_generation_prompt=True, tokenize=False
        )
        with_answer = processor.apply_chat_template(
            conversation(sample.questions[: turn + 1], sample.answers[: turn + 1]), add_generation_prompt=False,
            tokenize=False,
        )
        start = len(processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"][0])
        through_answer = processor(text=[with_answer], images=[image], return_tensors="pt")["input_ids"][0]
        end = len(through_answer)
        assert ids[:end].tolist() == through_answer.tolist()
        labels[start:end] = ids[start:end]
    assert (labels[labels != IGNORE] != tok.pad_token_id).all()
    return ids, labels, enc["pixel_values"][0]


def make_pool(processor, n: int, seed: int, image_size: int, offset: int = 0, mix: dict | None = None):
    """Train-split samples ``offset .. offset + n - 1``, question types drawn by ``mix``."""
    mix = TRAIN_MIX if mix is None else mix
    rng = random.Random(seed)
    qtypes = list(mix)
    weights = [mix[q] for q in qtypes]
    pool = []
    # Sample i of the split with a qtype drawn per sample: each index is used once, so every
    # training example shows a fresh train-split scene draw (scenes may repeat by chance).
    for i in range(n):
        qtype = rng.choices(qtypes, weights)[0]
        sample = shapes._make_sample("train", offset + i, qtype, len(qtypes))
        pool.append(encode_sample(processor, sample, image_size))
    return pool


def collate(items, pad_id: int):
    length = max(len(ids) for ids, _, _ in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, (i, l, _) in enumerate(items):
        ids[row, -len(i):] = i  # left padding, as in evaluation
        labels[row, -len(l):] = l
        mask[row, -len(i):] = 1
    pixels = torch.stack([p for _, _, p in items])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


def answer_loss(model, batch) -> torch.Tensor:
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
    ).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE
    )


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def quick_eval(loaded: Loaded, n: int = 120, batch_size: int = 24) -> dict:
    """Dense accuracy on the first ``n`` samples of the *val* split (test stays untouched)."""
    from harness.tasks import ShapesTask
    from harness.generate import evaluate

    task = ShapesTask("shapes", "val", n, list(shapes.QTYPES), ARCH["vision"]["image_size"], {"short": 8, "describe": 48})
    samples = task.samples(None)
    loaded.model.eval()
    preds = evaluate(loaded.model, loaded.processor, task, samples, batch_size, torch.device("cpu"))
    return task.score(samples, preds)


def train(
    out: Path, seed: int, batch_size: int, threads: int, checkpoint_every: int = 0, stages=STAGES,
    init_from: Path | None = None, first_stage: int = 1, work: Path | None = None,
) -> dict:
    """Run the stages from ``first_stage`` on (1-based); ``init_from`` gives the weights the
    first of them starts from (the output of the stage before), else the seeded random init."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    loaded = build_untrained(seed)
    if init_from is not None:
        loaded.model = LlavaForConditionalGeneration.from_pretrained(init_from, local_files_only=True)
        loaded.name = "llava_tiny"
    model, processor = loaded.model, loaded.processor
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".work" if work is None else work  # stage snapshots and checkpoints, not shipped
    log, info_stages = [], []
    t_all = time.time()
    for number, stage in enumerate(stages, start=1):
        if number < first_stage:
            continue
        stage_seed = seed + 1000 * (number - 1)
        if stage.get("new_projector"):
            replace_projector(model, stage["new_projector"], stage_seed)
        t0 = time.time()
        pool = make_pool(processor, stage["pool_size"], stage_seed, ARCH["vision"]["image_size"], stage["pool_offset"], stage["mix"])
        print(f"stage {number}: pool of {len(pool)} train samples in {time.time() - t0:.0f}s", flush=True)
        vision = [p for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n]
        vision_ids = {id(p) for p in vision}
        rest = [p for p in model.parameters() if id(p) not in vision_ids]
        opt = torch.optim.AdamW(
            [{"params": rest, "mult": 1.0}, {"params": vision, "mult": stage["vision_lr_mult"]}],
            lr=stage["lr"], weight_decay=0.01, betas=(0.9, 0.98),
        )
        order_rng = np.random.default_rng(stage_seed)
        order, pos = order_rng.permutation(len(pool)), 0
        steps = stage["steps"]
        model.train()
        t0 = time.time()
        for step in range(steps):
            if pos + batch_size > len(order):
                order, pos = order_rng.permutation(len(pool)), 0
            batch = collate([pool[j] for j in order[pos : pos + batch_size]], processor.tokenizer.pad_token_id)
            pos += batch_size
            for group in opt.param_groups:
                group["lr"] = group["mult"] * lr_at(step, steps, stage["lr"], warmup=max(1, steps // 20))
            loss = answer_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 50 == 0 or step == steps - 1:
                log.append({"stage": number, "step": step, "loss": round(loss.item(), 5),
                            "seconds": round(time.time() - t0, 1)})
                print(f"stage {number} step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
            if checkpoint_every and step and step % checkpoint_every == 0:
                model.eval()
                print(f"stage {number} step {step} val:", json.dumps(quick_eval(loaded, n=60)), flush=True)
                model.save_pretrained(work / "checkpoint")  # progress survives an interrupted run
                processor.save_pretrained(work / "checkpoint")
                model.train()
        model.eval()
        scores = quick_eval(loaded)
        print(f"stage {number} val:", json.dumps(scores), flush=True)
        info_stages.append({**stage, "number": number, "seconds": round(time.time() - t0, 1), "val": scores})
        model.save_pretrained(work / f"stage{number}")  # what the next stage starts from (--init-from)
        processor.save_pretrained(work / f"stage{number}")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    info = {
        "seed": seed, "batch_size": batch_size, "threads": threads, "arch": ARCH, "stages": info_stages,
        "first_stage": first_stage, "init_from": None if init_from is None else str(init_from),
        "steps": sum(s["steps"] for s in info_stages), "pool_size": max(s["pool_offset"] + s["pool_size"] for s in stages),
        "train_seconds": round(time.time() - t_all, 1), "n_params": loaded.n_params,
        "val": info_stages[-1]["val"] if info_stages else None, "loss": log, "env": env_info(),
    }
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ASSETS / "llava_tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint-every", type=int, default=0, help="evaluate on val and save every N steps")
    p.add_argument("--first-stage", type=int, default=1, help="start at this stage (1-based), with --init-from")
    p.add_argument("--experimental-stage-2", action="store_true", help="append EXPERIMENTAL_STAGE_2 to the recipe")
    p.add_argument("--init-from", type=Path, default=None, help="weights the first stage run starts from")
    p.add_argument("--work", type=Path, default=Path(".cache/train_tiny"), help="stage snapshots and checkpoints")
    a = p.parse_args(argv)
    if (a.first_stage > 1) != (a.init_from is not None):
        p.error("--first-stage N > 1 needs --init-from DIR (the output of stage N-1), and vice versa.")
    stages = STAGES + ((EXPERIMENTAL_STAGE_2,) if a.experimental_stage_2 else ())
    train(a.out, a.seed, a.batch_size, a.threads, a.checkpoint_every, stages=stages, init_from=a.init_from,
          first_stage=a.first_stage, work=a.work)


if __name__ == "__main__":
    main()
