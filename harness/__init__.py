"""The benchmarking harness: Hydra configs in, result.json (and a W&B run) out."""

from pathlib import Path

from omegaconf import OmegaConf

ASSETS = Path(__file__).resolve().parent / "assets"


def asset_path(name: str) -> str:
    """Absolute path of a file shipped in harness/assets (``${asset:llava_tiny}`` in configs)."""
    return str(ASSETS / name)


if not OmegaConf.has_resolver("asset"):
    OmegaConf.register_new_resolver("asset", asset_path)


def first_set(*values):
    """The first value that is set (not null or empty): ``${first:${out_dir},runs/...}``."""
    return next((v for v in values if v not in (None, "", "None")), None)


if not OmegaConf.has_resolver("first"):
    OmegaConf.register_new_resolver("first", first_set)
