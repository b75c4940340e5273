"""A run's method, resolved once: from its ``method:`` config to a ``lazyattn`` method.

``RunMethod.from_config(cfg.method, cfg.model)`` reads the settings and checks them before anything
loads (unknown names and settings, values out of range, a model family the method is not defined
for: one line each); ``resolve`` then chooses its ``auto`` settings on the val split
(``harness.calibration``), builds the method and says what result.json keeps of it (``describe``). Everything the harness learns about the method it asks the method, its plan or its
calibrators: nothing here names a method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf

import lazyattn
from harness import calibration
from harness.generate import prompt_inputs


def method_settings(method_cfg: Any) -> dict:
    """The method config as the plain mapping ``lazyattn.build`` takes (name plus settings)."""
    spec = OmegaConf.to_container(method_cfg, resolve=True) if OmegaConf.is_config(method_cfg) else method_cfg
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"a method config needs a name (a conf/method preset), got {spec!r}.")
    return dict(spec)


def preset_family(model_cfg: Any) -> str | None:
    """The model's family as its preset names it (``family``, or ``model_type`` for a checkpoint),
    before it loads; None where the preset says neither."""
    family = model_cfg.get("family") or model_cfg.get("model_type")
    return None if family is None else str(family)


@dataclasses.dataclass(frozen=True)
class RunMethod:
    """The method of a run as configured: its settings (``spec``, ``auto`` where calibration chooses)
    and those that calibration chooses (``auto``: where, and the calibrator that chooses)."""

    spec: dict
    auto: tuple[calibration.Auto, ...] = ()

    @classmethod
    def from_config(cls, method_cfg: Any, model_cfg: Any = None) -> "RunMethod":
        """The settings, each checked as the method checks them (``auto`` ones by a stand-in), and
        the model's family (``preset_family``; none without a model), before the model loads."""
        spec = method_settings(method_cfg)
        auto = tuple(calibration.auto_settings(spec))
        family = None if model_cfg is None else preset_family(model_cfg)
        lazyattn.check_method_family(lazyattn.build(calibration.with_stand_ins(spec, list(auto))), family)
        return cls(spec, auto)

    def fixed(self, where: str) -> lazyattn.Method:
        """The method, where nothing can be calibrated (the efficiency benchmark, the lmms-eval and
        VLMEvalKit models): an ``auto`` setting is refused in one line naming ``where``."""
        if self.auto:
            asked = " and ".join(f"method.{'.'.join(path)}=auto" for path, _ in self.auto)
            raise ValueError(
                f"{asked} {'needs' if len(self.auto) == 1 else 'need'} the harness's calibration (python -m harness "
                f"... task=shapes); {where} takes explicit settings: pass the chosen ones (a calibrated run's "
                "result.json method.params)."
            )
        return lazyattn.build(self.spec)

    def resolve(self, cfg, loaded, task, device) -> tuple[lazyattn.Method, dict]:
        """The method with every ``auto`` setting chosen on the task's val prompts (``cfg``'s
        ``calibration:`` settings; the model and task settings key the cache), built, and what
        result.json says of it (``describe``; its ``calibration``: the record, None when nothing
        was calibrated)."""
        if not self.auto:
            method = lazyattn.build(self.spec)
            return method, self.describe(method, loaded.n_layers, None)

        def batches(n: int) -> list[dict]:
            return [prompt_inputs(loaded.processor, [history], images, device, loaded.model.dtype)
                    for history, images in task.calibration_prompts(n)]

        where = {"model": OmegaConf.to_container(cfg.model, resolve=True),
                 "task": OmegaConf.to_container(cfg.task, resolve=True)}
        options = OmegaConf.to_container(cfg.calibration, resolve=True)
        spec, record = calibration.choose(self.spec, list(self.auto), where, options, loaded, batches)
        method = lazyattn.build(spec)
        return method, self.describe(method, loaded.n_layers, record)

    def describe(self, method: lazyattn.Method, n_layers: int, calibrated: dict | None) -> dict:
        """What result.json says of the method: its parameters, its plan for this model (lazy layers,
        reading, pruning), and its table label, order and figure series (the calibrated ones when its
        settings were chosen by calibration)."""
        plan = method.plan(n_layers)  # validates the settings against this model's depth
        named = (calibration.describe(method, n_layers, list(self.auto), calibrated) if calibrated else
                 {"label": method.label(n_layers), "sort_key": list(method.sort_key(n_layers)),
                  "series": plan.series})
        return {
            "name": method.name,
            "params": method.params(),
            "lazy_layers": list(plan.lazy_layers),
            "plan": {"share": plan.share, "scope": plan.scope, "pruner": plan.pruner,
                     "pruned_from": plan.pruned_from, "schedule": plan.schedule},
            **named,
            "calibration": calibrated,
        }


def fixed_method(method_cfg: Any, where: str) -> lazyattn.Method:
    """The method of a config that has no ``auto`` setting (``RunMethod.fixed``)."""
    return RunMethod.from_config(method_cfg).fixed(where)
