"""What every entry point does before loading a model: CPU threads, seeds, the device."""

from __future__ import annotations

import random

import torch
from omegaconf import DictConfig

from harness.settings import resolve_device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg: DictConfig) -> torch.device:
    """What every entry point does before loading a model: CPU threads, seeds, the device."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    seed_everything(int(cfg.seed))
    return resolve_device(str(cfg.device))
