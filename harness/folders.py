"""Where a run writes: its folder (``out_dir`` or Hydra's), whether a finished one is skipped, whether
a folder can be written, what a refused run leaves behind, and paths written relative to the
repository so a result means the same on any machine."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from harness.results import REPO_ROOT
from harness.settings import RunError


def output_dir(cfg: DictConfig) -> Path:
    """``out_dir``, or when it is null Hydra's output dir for this job (a time-stamped folder under
    ``runs_root``; in a multirun ``sweep_root/<the point's overrides>``)."""
    if cfg.get("out_dir"):
        return Path(str(cfg.out_dir))
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise RunError("out_dir is not set; pass out_dir=DIR.")
    return Path(HydraConfig.get().runtime.output_dir)


def in_multirun() -> bool:
    """Whether this run is one point of a Hydra multirun (``-m``; a SLURM or submitit job included)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def skips_finished(cfg: DictConfig) -> bool:
    """Whether a finished out_dir is skipped rather than refused. A multirun point is skipped by
    default: re-running an interrupted sweep's own command (or a requeued SLURM job) must resume it,
    not stop at its first finished point nor redo finished work; ``skip_finished=true`` asks the
    same of a single run. ``overwrite=true`` redoes either."""
    return not cfg.overwrite and (bool(cfg.get("skip_finished")) or in_multirun())


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


def writable_dir(path: Path, key: str) -> None:
    """A RunError of one line unless ``path`` can be created and written: its nearest existing
    ancestor is a folder in which a file can be made (tried and removed at once, so a read-only
    file system or a folder of another user is caught, even for root)."""
    target = Path(path).expanduser().absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunError(f"{key} {target} cannot be made: {existing} is a file, not a folder; choose another {key}=DIR.")
    try:
        fd, tmp = tempfile.mkstemp(dir=existing, prefix=".lazyattn-write-check-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise RunError(f"{key} {target} cannot be written ({existing}: {err.strerror or err}); "
                       f"choose another {key}=DIR.") from None


# out_dir -> whether it existed before Hydra ran (filled by ``harness.run.preflight``, read by ``clean_refused``)
PREEXISTING: dict[str, bool] = {}


def clean_refused(out_dir: Path) -> None:
    """After a refused run: remove what Hydra wrote for it (``.hydra/`` and an empty log) when the
    folder holds nothing else, and the folder itself when this run made it."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    logs = [p for p in out_dir.glob("*.log") if p.is_file() and p.stat().st_size == 0]
    if {p.name for p in out_dir.iterdir()} - {".hydra", *(p.name for p in logs)}:
        return  # an earlier run's files: leave the folder as it is
    shutil.rmtree(out_dir / ".hydra", ignore_errors=True)
    for log in logs:
        log.unlink(missing_ok=True)
    if not PREEXISTING.get(str(out_dir), False) and not any(out_dir.iterdir()):
        out_dir.rmdir()
