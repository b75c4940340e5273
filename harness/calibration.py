"""Settings chosen on the val split, resolved here and nowhere else.

A method whose setting may be ``auto`` declares, when it is registered, how that setting is chosen:
a ``lazyattn.Calibrator`` (``lazyattn.calibrators_of``). This module finds the ``auto`` settings
of a method spec (in a composition's parts too, ``lazyattn.parts_of``), runs each calibrator on
the task's val prompts, caches what it measured and records its choice; it names no method.
The two shipped ones (docs/methods.md, "Calibration"):

- ``method.layers=auto`` (Lazy Attention): lazy layers chosen by ``lazyattn.calibrate`` for the
  budget ``method.ratio`` (or ``calibration.threshold``), by ``calibration.select`` with at most
  ``calibration.max_per_anchor`` lazy layers per anchor;
- ``method.k=auto`` (VTW, also ``method.vtw.k=auto`` in ``lazy_vtw``): the withdrawal layer by
  the method's ``rule`` and ``eta`` (``lazyattn.withdrawal_kl``, ``choose_withdrawal_layer``).

Each measurement is cached in a small JSON file (``calibration.dir``, outside the source tree) keyed
by the model's config and weights, the task and what the calibrator says it depends on, so
repeated runs and sweeps calibrate once, and a retrained checkpoint calibrates again.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import lazyattn
from harness.results import config_key, write_json_atomic
from lazyattn import Calibrator

AUTO = "auto"
Auto = tuple[tuple[str, ...], Calibrator]  # where a setting is "auto" (("k",), ("vtw", "k")) and who chooses it


def auto_settings(spec: dict) -> list[Auto]:
    """The settings of a method spec given as ``auto``, each with its calibrator; a composition's
    parts included, refused in one line where the calibrator cannot serve a part."""
    name = spec["name"]
    found = [((setting,), cal) for setting, cal in lazyattn.calibrators_of(name).items() if spec.get(setting) == AUTO]
    for part in lazyattn.parts_of(name):
        settings = spec.get(part) or {}
        for setting, cal in lazyattn.calibrators_of(part).items():
            if settings.get(setting) != AUTO:
                continue
            if not cal.composable:
                raise ValueError(f"method.{part}.{setting}=auto is not supported in {name}: {cal.refusal}.")
            found.append(((part, setting), cal))
    return found


def _owner(spec: dict, path: tuple[str, ...]) -> dict:
    """The settings that hold ``path``'s last key: the method's own, or its part's."""
    return spec if len(path) == 1 else spec[path[0]]


def with_stand_ins(spec: dict, found: list[Auto]) -> dict:
    """``spec`` with a valid stand-in for every ``auto`` setting, so the others can be checked."""
    spec = copy.deepcopy(spec)
    for path, cal in found:
        _owner(spec, path)[path[-1]] = copy.copy(cal.stand_in)
    return spec


def weights_fingerprint(model) -> str:
    """A cheap identity of the weights: every parameter's name, shape and first values. A
    checkpoint retrained in place keeps its path and config, so those alone cannot key a cache."""
    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(param.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _cached(where: dict, options: dict, model, what: dict, compute: Callable[[], dict]) -> dict:
    """``compute()``'s record, cached under a key of the model, its weights, the task and ``what``."""
    samples = int(options["samples"])
    key = config_key({"model": where["model"], "weights": weights_fingerprint(model), "task": where["task"],
                      "samples": samples, **what})
    path = Path(str(options["dir"])).expanduser() / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    record = {"key": key, **compute(), "samples": samples, "split": "val"}
    write_json_atomic(path, record)
    return record


def choose(spec: dict, found: list[Auto], where: dict, options: dict, loaded, batches: Callable[[int], list]
           ) -> tuple[dict, dict]:
    """The method spec with every ``auto`` setting chosen, and the calibration record for result.json
    (a setting of the method's own: its calibrator's record; a part's: under the part's name).
    ``where``: the model's and the task's settings (the cache key); ``options``: the run's
    ``calibration:`` settings; ``batches(n)``: n val prompts, as model inputs."""
    spec, record = copy.deepcopy(spec), {}
    n_layers = loaded.n_layers
    for path, cal in found:
        settings = _owner(spec, path)
        measured = _cached(where, options, loaded.model, cal.key(settings, options, n_layers),
                           lambda: cal.measure(loaded.model, batches(int(options["samples"])), settings, options))
        settings[path[-1]], kept = cal.choose(measured, settings, options, n_layers)
        record = {**record, **kept} if len(path) == 1 else {**record, path[0]: kept}
    return spec, record


def describe(method, n_layers: int, found: list[Auto], record: dict) -> dict:
    """The table label, order and figure series of a point whose settings were calibrated: each
    calibrator names the method (or, in a composition, its part) by the rule that chose it."""
    plan = method.plan(n_layers)
    label, sort_key, series = method.label(n_layers), list(method.sort_key(n_layers)), plan.series
    for path, cal in found:
        if len(path) == 1:
            label, sort_key, series = (cal.label(record, method, n_layers), cal.sort_key(record, method, n_layers),
                                       cal.series(record, plan))
            continue
        part = path[0]
        labels = method.part_labels(n_layers)  # a composition (its name has parts) names its parts' labels
        labels[part] = cal.label(record[part], method.parts()[part], n_layers)
        label = " + ".join(labels.values())
    return {"label": label, "sort_key": sort_key, "series": series}
