"""What loading a model gives the harness: the model, its processor, and a name for results."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Loaded:
    model: torch.nn.Module
    processor: object
    name: str
    random_weights: bool = False  # answers are noise: say so wherever accuracy is printed

    @property
    def n_layers(self) -> int:
        return self.model.config.get_text_config(decoder=True).num_hidden_layers

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def set_generation_ids(model, tokenizer) -> None:
    """Give ``generate`` the tokenizer's end-of-sequence and padding ids when the model has none."""
    gen = model.generation_config
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
