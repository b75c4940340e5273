"""Prompts of a given length: the image plus the question, lengthened with extra words."""

from __future__ import annotations


import torch

from harness.generate import conversation, prompt_inputs
from harness.tasks import shapes
from harness.bench.constants import FILLER, QUESTION
from harness.bench.variants import BenchError


class Prompts:
    def __init__(self, loaded, device: torch.device) -> None:
        self.processor = loaded.processor
        self.dtype = loaded.model.dtype
        self.device = device
        self.image = shapes.load_split("val", 1)[0].image(224)
        self._lengths: dict[int, int] = {}

    @staticmethod
    def text(extra_words: int) -> str:
        return " ".join([FILLER[i % len(FILLER)] for i in range(extra_words)] + [QUESTION])

    def inputs(self, extra_words: int, batch_size: int, device=None) -> dict:
        history = conversation([self.text(extra_words)], [])
        inputs = prompt_inputs(
            self.processor, [history] * batch_size, [self.image] * batch_size, device or self.device, self.dtype
        )
        assert bool(inputs["attention_mask"].all()), "benchmark prompts must not be padded"
        return inputs

    def length(self, extra_words: int) -> int:
        if extra_words not in self._lengths:
            self._lengths[extra_words] = int(self.inputs(extra_words, 1, "cpu")["input_ids"].shape[1])
        return self._lengths[extra_words]

    def fit(self, target: int | None) -> dict:
        """The most extra words whose prompt has at most ``target`` tokens (exactly, whenever each
        word is a token, as with the tiny tokenizer)."""
        base = self.length(0)
        if target is None:
            return {"context_length": None, "prompt_tokens": base, "extra_words": 0}
        if target < base:
            raise BenchError(
                f"context length {target} is shorter than the unpadded prompt ({base} tokens: the image and "
                f"{QUESTION!r}); use lengths >= {base}, or null for the unpadded prompt."
            )
        words = target - base
        if self.length(words) > target:
            lo, hi = 0, words  # largest word count whose prompt still fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if self.length(mid) <= target else (lo, mid - 1)
            words = lo
        return {"context_length": target, "prompt_tokens": self.length(words), "extra_words": words}
