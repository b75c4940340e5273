"""``method.layers=auto``: lazy layers chosen by ``lazyattn.calibrate`` on the task's calibration
prompts (the shapes val split), resolved here and nowhere else.

The choice is cached in a small JSON file (``calibration.dir``, outside the source tree) keyed by
the model's config and weights, the task and the calibration settings, so repeated runs and
sweeps calibrate once, and a retrained checkpoint calibrates again.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from harness.config import method_spec, plain
from harness.generate import prompt_inputs
from harness.results import config_key, write_json_atomic
from lazyattn import calibrate

AUTO = "auto"


def wanted(method_cfg: DictConfig) -> bool:
    """Whether the method asks for calibrated lazy layers (only a lazy method's ``layers`` can)."""
    return method_cfg.get("layers") == AUTO


def refuse(where: str) -> None:
    raise ValueError(
        f"method.layers=auto needs the harness's calibration (python -m harness ... task=shapes); {where} takes "
        "explicit layers: pass the chosen ones (result.json method.lazy_layers) as method.layers=[...]."
    )


def weights_fingerprint(model) -> str:
    """A cheap identity of the weights: every parameter's name, shape and first values. A
    checkpoint retrained in place keeps its path and config, so those alone cannot key a cache."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(param.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _key(cfg: DictConfig, spec: dict, model) -> str:
    return config_key({
        "model": plain(cfg.model),
        "weights": weights_fingerprint(model),
        "task": plain(cfg.task),
        "ratio": spec.get("ratio"),
        "threshold": cfg.calibration.threshold,
        "samples": int(cfg.calibration.samples),
    })


def resolve(cfg: DictConfig, loaded, task, device) -> tuple[dict, dict]:
    """The method spec with explicit layers (its ratio kept as the budget they were chosen for),
    and the calibration record for result.json."""
    spec = method_spec(cfg.method)
    n, threshold = int(cfg.calibration.samples), cfg.calibration.threshold
    key = _key(cfg, spec, loaded.model)
    path = Path(str(cfg.calibration.dir)).expanduser() / f"{key}.json"
    if path.exists():
        record = json.loads(path.read_text())
    else:
        batches = [
            prompt_inputs(loaded.processor, [history], images, device, loaded.model.dtype)
            for history, images in task.calibration_prompts(n)
        ]
        ratio = None if threshold is not None else spec.get("ratio")
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
    spec["layers"] = list(record["lazy_layers"])
    return spec, {**record, "ratio": spec.get("ratio"), "threshold": threshold}


def label(record: dict) -> str:
    """The table label of a calibrated lazy run: the budget it was calibrated for."""
    if record.get("threshold") is not None:
        return f"Lazy JS<={record['threshold']:g} (calibrated)"
    return f"Lazy r={record['ratio']:g} (calibrated)"


def sort_key(record: dict) -> list:
    return ["calibrated", record.get("ratio") or 0]
