"""``method.layers=auto``: lazy layers chosen by ``lazyattn.calibrate`` on the task's val split.

The result is cached in a small JSON file keyed by the model config and the calibration
settings, so repeated runs (and sweeps) calibrate once.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from harness.generate import conversation, prompt_inputs
from harness.results import config_key, write_json_atomic
from lazyattn import calibrate


def wants_calibration(method_cfg: DictConfig) -> bool:
    return method_cfg.get("layers") == "auto"


def calibration_key(model_cfg: DictConfig, method_cfg: DictConfig, task_cfg: DictConfig, n_samples: int) -> str:
    settings = {
        "model": OmegaConf.to_container(model_cfg, resolve=True),
        "ratio": method_cfg.get("ratio"),
        "threshold": method_cfg.get("threshold"),
        "samples": n_samples,
        "task": task_cfg.name,
        "image_size": task_cfg.get("image_size"),
    }
    return config_key(settings)


def resolve(cfg: DictConfig, loaded, task, device) -> tuple[DictConfig, dict]:
    """A copy of ``cfg.method`` with explicit layers, and the calibration record for result.json."""
    method_cfg = cfg.method.copy()
    n = int(method_cfg.get("calibration_samples", 8))
    key = calibration_key(cfg.model, method_cfg, cfg.task, n)
    path = Path(cfg.get("calibration_dir", ".cache/calibration")) / f"{key}.json"
    if path.exists():
        record = json.loads(path.read_text())
    else:
        samples = task.calibration_samples(n)
        batches = [
            prompt_inputs(loaded.processor, [conversation(s.questions[:1], [])], [task.image(s)], device,
                          loaded.model.dtype)
            for s in samples
        ]
        ratio, threshold = method_cfg.get("ratio"), method_cfg.get("threshold")
        if threshold is not None:
            ratio = None
        result = calibrate(loaded.model, batches, ratio=ratio, threshold=threshold)
        record = {
            "key": key,
            "lazy_layers": result.lazy_layers,
            "adjacent_js": result.adjacent,
            "divergence": result.divergence,
            "samples": n,
            "split": "val",
        }
        write_json_atomic(path, record)
    with open_dict(method_cfg):
        method_cfg.layers = list(record["lazy_layers"])
    return method_cfg, {**record, "cache_file": str(path)}
