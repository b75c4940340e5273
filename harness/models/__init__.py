"""Models the harness can run, one registry of kinds (``model.kind`` in ``conf/model/*.yaml``):

- ``hf``: a Hugging Face checkpoint in a local directory (``model.path``), never downloaded;
  the shipped trained tiny model (``model=llava_tiny``) is one, under ``harness/assets``.
- ``random_shape``: a model family at a named shape with seeded random weights, built in
  memory on the run's device (``model=llava_tiny_random`` for tests, ``*_7b_random`` for GPU
  throughput); its answers are noise.
"""

from __future__ import annotations

import sys

import torch
from omegaconf import DictConfig, OmegaConf

from harness.models.base import Loaded
from harness.models.families import build_random
from harness.models.local import load_local
from harness.registry import Registry

__all__ = ["DTYPES", "KINDS", "Loaded", "load_model"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KINDS = Registry("model.kind")


def _dtype(cfg: DictConfig, allow_auto: bool):
    dtype = str(cfg.get("dtype", "auto"))
    if dtype in DTYPES:
        return DTYPES[dtype]
    if allow_auto and dtype == "auto":
        return dtype
    choices = ", ".join(list(DTYPES) + (["auto"] if allow_auto else []))
    raise ValueError(f"model.dtype must be one of {choices}, got {dtype!r}.")


@KINDS.register("random_shape")
def _random_shape(cfg: DictConfig, device) -> Loaded:
    return build_random(
        cfg.family,
        OmegaConf.to_container(cfg.text, resolve=True),
        OmegaConf.to_container(cfg.vision, resolve=True),
        seed=int(cfg.seed),
        attn_implementation=cfg.attn_implementation,
        dtype=_dtype(cfg, allow_auto=False),
        device=device,
        name=cfg.name,
        initializer_range=float(cfg.get("initializer_range", 0.02)),
    )


@KINDS.register("hf")
def _hf(cfg: DictConfig, device) -> Loaded:
    return load_local(
        cfg.path,
        attn_implementation=cfg.attn_implementation,
        dtype=_dtype(cfg, allow_auto=True),
        name=cfg.name if cfg.name != "hf" else None,
        model_type=cfg.get("model_type"),
    )


def random_weights_warning(name: str) -> str:
    return (f"warning: {name} has RANDOM weights (model.kind=random_shape): its answers are noise and its accuracy "
            "means nothing; for accuracy use model=llava_tiny (trained, shipped) or a real checkpoint.")


def load_model(cfg: DictConfig, device: torch.device | str | None = None) -> Loaded:
    """The model a ``model=`` preset names, on ``device``, in eval mode. Every entry point loads
    through here, so a model with random weights is announced on stderr wherever it runs."""
    loaded = KINDS.get(str(cfg.kind))(cfg, device)
    if loaded.random_weights:
        print(random_weights_warning(loaded.name), file=sys.stderr)
    if device is not None:
        loaded.model.to(device)
    return loaded
