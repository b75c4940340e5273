"""From Hydra configs to the objects a run needs, in one place.

``compose`` builds the harness config from ``conf/`` plus overrides, exactly as
``python -m harness`` would (the efficiency benchmark and the lmms-eval model use it to build
their methods); ``result_key`` says which settings define a result; ``check_run`` validates
the run-level settings before anything is loaded, each error naming its key.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from harness.results import REPO_ROOT, config_key

CONF_DIR = REPO_ROOT / "conf"
# The settings a result (its predictions and scores) depends on; everything else (out_dir, W&B,
# timing repeats, threads, device) changes how it is produced or logged, not what it is.
RESULT_KEYS = ("model", "method", "task", "seed", "limit")


class RunError(Exception):
    """A problem with the run's settings, reported as one clear line."""


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The harness config composed from ``conf/`` with Hydra ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if not CONF_DIR.is_dir():
        raise FileNotFoundError(f"{CONF_DIR} not found: the harness reads its presets from the repository's conf/.")
    if GlobalHydra.instance().is_initialized():  # inside a running Hydra app: compose beside it
        return hydra_compose(config_name=config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def plain(cfg: Any) -> Any:
    """A config node as plain Python (dicts, lists), interpolations resolved."""
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def result_key(cfg: DictConfig) -> str:
    """What a finished sample depends on (``RESULT_KEYS``): a resumed run reuses only samples with this key."""
    return config_key({k: plain(cfg.get(k)) for k in RESULT_KEYS})


def output_dir(cfg: DictConfig) -> Path:
    """``out_dir``, or when it is null Hydra's output dir for this job (a time-stamped folder under
    ``runs_root``; in a multirun ``sweep_root/<the point's overrides>``)."""
    if cfg.get("out_dir"):
        return Path(str(cfg.out_dir))
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise RunError("out_dir is not set; pass out_dir=DIR.")
    return Path(HydraConfig.get().runtime.output_dir)


def positive_int(value: Any, key: str, minimum: int = 1, allow_none: bool = False) -> int | None:
    """``value`` as an int >= ``minimum``, or a RunError that names ``key`` and says what to pass."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = f"an integer >= {minimum}" + (" or null" if allow_none else "")
        raise RunError(f"{key} must be {what}, got {value!r}; e.g. {key}={max(minimum, 16)}.")
    return value


def check_run(cfg: DictConfig) -> None:
    """The run-level settings, checked before any data or model is touched."""
    positive_int(cfg.limit, "limit", allow_none=True)
    positive_int(cfg.batch_size, "batch_size")
    positive_int(cfg.seed, "seed", minimum=0)
    if cfg.get("threads") is not None:
        positive_int(cfg.threads, "threads")
    eff = cfg.efficiency
    if eff.enabled:
        positive_int(eff.batch_size, "efficiency.batch_size")
        positive_int(eff.new_tokens, "efficiency.new_tokens")
        positive_int(eff.repeats, "efficiency.repeats")
        positive_int(eff.warmup, "efficiency.warmup", minimum=0)
    resolve_device(str(cfg.device))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise RunError(f"device must be auto, cpu or cuda, got {name!r}.")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError("device=cuda but no CUDA device is visible; use device=cpu or device=auto.")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg: DictConfig) -> torch.device:
    """What every entry point does before loading a model: CPU threads, seeds, the device."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    seed_everything(int(cfg.seed))
    return resolve_device(str(cfg.device))


def method_spec(method_cfg: DictConfig | Mapping) -> dict:
    """The method config as the plain mapping ``lazyattn.build`` takes (name plus fields)."""
    spec = plain(method_cfg)
    if not isinstance(spec, dict) or "name" not in spec:
        raise RunError(f"a method config needs a name (a conf/method preset), got {spec!r}.")
    return spec


def relative_to_repo(data: Any, root: Path = REPO_ROOT) -> Any:
    """``data`` with every absolute path inside the repository written relative to it and every
    path in the home folder written from ``~``, so a result means the same on any machine."""
    if isinstance(data, dict):
        return {k: relative_to_repo(v, root) for k, v in data.items()}
    if isinstance(data, list):
        return [relative_to_repo(v, root) for v in data]
    if isinstance(data, str) and data.startswith(str(root) + "/"):
        return data[len(str(root)) + 1 :]
    home = str(Path.home())
    if isinstance(data, str) and home not in ("/", "") and data.startswith(home + "/"):
        return "~" + data[len(home) :]  # the user's own folders (runs_root, caches): no machine's name
    return data
