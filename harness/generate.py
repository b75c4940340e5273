"""Greedy generation over a task's samples, batched with left padding, multi-turn aware.

A sample's answer depends on that sample alone: every sample in a batch is cut to its own
token budget, so accuracy does not change with batch size. Batches are formed among samples
with the same number of image tokens (token pruning needs that; LLaVA-NeXT's anyres tiling and
Qwen2-VL's dynamic resolution vary it with the image), and answers still come out in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch


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
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if dtype is not None and "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


@torch.inference_mode()
def generate_batch(model, processor, histories, images, budgets: Sequence[int], device) -> list[str]:
    inputs = prompt_inputs(processor, histories, images, device, model.dtype)
    # An image placeholder in an answer would break the next turn's prompt: never generate one.
    image_token = getattr(model.config, "image_token_id", None)
    suppress = {"suppress_tokens": [image_token]} if image_token is not None else {}
    out = model.generate(**inputs, max_new_tokens=max(budgets), do_sample=False, **suppress)
    new = out[:, inputs["input_ids"].shape[1] :]
    tokenizer = getattr(processor, "tokenizer", processor)
    return [tokenizer.decode(row[:budget], skip_special_tokens=True).strip() for row, budget in zip(new, budgets)]


def image_token_count(model, processor, task, sample) -> int:
    """The image tokens of the sample's first-turn prompt (0 when the model names no image token)."""
    image_token = getattr(model.config, "image_token_id", None)
    if image_token is None:
        return 0
    inputs = prompt_inputs(processor, [conversation(sample.questions[:1], [])], [task.image(sample)], "cpu")
    return int((inputs["input_ids"] == image_token).sum())


def batches(keys: Sequence, batch_size: int) -> list[list[int]]:
    """Indices ``0 .. len(keys)-1`` in batches of at most ``batch_size`` sharing a key, each batch
    in index order, the batches ordered by their first index."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    out = [g[s : s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]
    return sorted(out, key=lambda b: b[0])


def answer(model, processor, task, samples: Sequence, batch_size: int, device) -> Iterator[tuple[object, str, list[str]]]:
    """Yield (sample, last-turn prediction, all turn predictions) in the samples' order; batches
    are grouped by image-token count (``batches``)."""
    keys = [image_token_count(model, processor, task, s) for s in samples] if batch_size > 1 else [0] * len(samples)
    finished: dict[int, tuple] = {}
    next_out = 0
    for index in batches(keys, batch_size):
        batch = [samples[i] for i in index]
        replies: list[list[str]] = [[] for _ in batch]
        for turn in range(max(len(s.questions) for s in batch)):
            active = [i for i, s in enumerate(batch) if len(s.questions) > turn]
            texts = generate_batch(
                model,
                processor,
                [conversation(batch[i].questions[: turn + 1], replies[i]) for i in active],
                [task.image(batch[i]) for i in active],
                [task.turn_budget(batch[i].turn_types[turn]) for i in active],
                device,
            )
            for i, text in zip(active, texts):
                replies[i].append(text)
        for i, sample, turns in zip(index, batch, replies):
            finished[i] = (sample, turns[-1], turns)
        while next_out in finished:  # in order, as soon as every earlier sample is done
            yield finished.pop(next_out)
            next_out += 1


def evaluate(model, processor, task, samples, batch_size, device, on_sample: Callable | None = None, done=None):
    """Predictions for every sample; ``done`` maps sample ids to predictions finished earlier."""
    done = done or {}
    todo = [s for s in samples if s.id not in done]
    predictions = dict(done)
    for sample, prediction, turns in answer(model, processor, task, todo, batch_size, device):
        predictions[sample.id] = prediction
        if on_sample is not None:
            on_sample(sample, prediction, turns)
    return [predictions[s.id] for s in samples]
