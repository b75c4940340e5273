"""The benchmark's constants, in one place."""

from __future__ import annotations

from harness.tasks import shapes

RESULT = "bench.json"  # the result file in out_dir
QUESTION = "describe the image ."
# Extra words that lengthen the prompt; all in the tiny tokenizer's vocabulary.
FILLER = tuple(shapes.words("a red circle at the top left , a blue square at the bottom right ."))
# Settings that don't change the numbers don't change whether earlier points can be resumed.
KEY_EXCLUDE = ("out_dir", "overwrite", "wandb", "threads")
TIMINGS = ("prefill_ms", "decode_tokens_per_s", "e2e_tokens_per_s")  # the timed figures, each with its IQR
