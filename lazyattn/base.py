"""What every method shares (the ``Method`` protocol and its ``Plan``), and ``Dense``, the unmodified model."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any, ContextManager, Protocol, runtime_checkable

from torch import nn


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a method does to a model of a given depth, in the terms the harness needs: which layers
    are lazy and whose attention they take, which reading they use, where tokens are pruned, what
    the cache keeps, which families it is defined for, and how it is named in text and figures.

    The harness reads a method only through ``method.plan(n_layers)`` (and ``apply``, ``params``,
    ``label``, ``sort_key``; a composition also names its ``parts()`` and ``part_labels``), and
    through what the registry records of it (``lazyattn.parts_of``, ``calibrators_of``,
    ``examples_of``): it never asks what type a method is or which attributes it has."""

    lazy_layers: tuple[int, ...] = ()
    anchors: Mapping[int, int] = dataclasses.field(default_factory=dict)  # lazy layer -> its anchor
    share: str = "qk"  # what a lazy layer takes from its anchor (qk | qkv)
    scope: str = "all"  # over which keys (all | visual | visual_scores)
    reading: str = ""  # the label suffix of a non-default reading, e.g. " QKV", " VLA"
    pruner: str | None = None  # the token pruner's name, if the method prunes
    pruned_from: int | None = None  # first decoder layer that holds fewer tokens (0: reduced before the LLM)
    families: tuple[str, ...] | None = None  # config.model_type values it is defined for; None: every one
    host_sync: bool = False  # its prefill waits on the host (data-dependent shapes), which timings must say
    schedule: str = "nothing changed (the reference)"  # one phrase: what it changes
    series: str = "dense"  # the figure series its points belong to (one line per series)

    def keeps(self, layer: int) -> str:
        """What ``layer``'s cache slot keeps: "kv", "v" (a lazy layer sharing qk), "" (sharing qkv),
        or "v+text k" (a visual-scope lazy layer: every value and the text tokens' keys)."""
        if layer not in self.anchors:
            return "kv"
        if self.share == "qkv":
            return ""
        return "v" if self.scope == "all" else "v+text k"

    def skips(self, layer: int) -> tuple[str, ...]:
        """The projections a decode step of ``layer`` does not compute, by what its slot keeps: a
        values-only slot skips ``q_proj`` and ``k_proj`` (the anchor's), an empty one ``v_proj`` too;
        a text-key slot (visual scope) computes every projection."""
        return {"v": ("q_proj", "k_proj"), "": ("q_proj", "k_proj", "v_proj")}.get(self.keeps(layer), ())

    def keyless_layers(self) -> list[int]:
        """The layers whose cache slot holds no keys (``keeps`` is "v" or "")."""
        return [layer for layer in self.lazy_layers if self.keeps(layer) in ("v", "")]


class Calibrator(Protocol):
    """How a method's ``auto`` setting is chosen on held-out prompts. A method declares one per
    calibrated setting when it is registered (``lazyattn.register(..., calibrators=...)``); the
    harness runs it, caches its measurement and records it, and never names the method.

    - ``setting``: the setting it chooses (``"layers"``, ``"k"``);
    - ``composable``: whether the setting may be ``auto`` inside a composition (``lazy_<pruner>``);
      ``refusal`` says what to do instead where it may not;
    - ``stand_in``: a valid value of the setting, so the other settings are checked before it is chosen;
    - ``key(settings, options, n_layers)``: what the measurement depends on besides the model and the
      prompts (a cache key: it must stay the same for the same measurement);
    - ``measure(model, batches, settings, options)``: the measurement, as a JSON-able record;
    - ``choose(record, settings, options, n_layers)``: the chosen value and the record a result keeps;
    - ``label``, ``sort_key``, ``series``: how a calibrated point is named, ordered and drawn
      (``label`` names the method's part whose setting it chose).

    ``settings`` are the method's (or its part's) settings as given; ``options`` the run's
    calibration settings (``conf/config.yaml``, ``calibration:``)."""

    setting: str
    composable: bool
    refusal: str
    stand_in: Any

    def key(self, settings: Mapping[str, Any], options: Mapping[str, Any], n_layers: int) -> dict: ...

    def measure(self, model: nn.Module, batches: list[dict], settings: Mapping[str, Any],
                options: Mapping[str, Any]) -> dict: ...

    def choose(self, record: dict, settings: Mapping[str, Any], options: Mapping[str, Any],
               n_layers: int) -> tuple[Any, dict]: ...

    def label(self, record: dict, method: "Method", n_layers: int) -> str: ...

    def sort_key(self, record: dict, method: "Method", n_layers: int) -> list: ...

    def series(self, record: dict, plan: Plan) -> str: ...


@runtime_checkable
class Method(Protocol):
    """A method is a dataclass whose fields are its hyper-parameters.

    - ``name``: its key in ``lazyattn.METHODS``;
    - ``apply(model)``: a context manager that installs the method, yields the model itself, and
      removes everything it installed on exit (also when the body raises);
    - ``params()``: the constructor fields as given (``build({"name": name, **params()})``
      rebuilds the method); it never changes after construction;
    - ``label(n_layers)``: the short row label of tables, for a model with ``n_layers`` decoder layers;
    - ``sort_key(n_layers)``: orders rows of the same method by their setting;
    - ``plan(n_layers)``: its ``Plan`` for a model with ``n_layers`` decoder layers (validated: a
      setting out of range for that depth raises ``ValueError``).
    """

    name: str

    def apply(self, model: nn.Module) -> ContextManager[nn.Module]: ...

    def params(self) -> dict[str, Any]: ...

    def label(self, n_layers: int) -> str: ...

    def sort_key(self, n_layers: int) -> tuple: ...

    def plan(self, n_layers: int) -> Plan: ...


@dataclasses.dataclass
class Dense:
    """The unmodified model: the reference every method is compared against."""

    name = "dense"

    def params(self) -> dict[str, Any]:
        return {}

    def label(self, n_layers: int) -> str:
        return "Dense"

    def sort_key(self, n_layers: int) -> tuple:
        return ()

    def plan(self, n_layers: int) -> Plan:
        return Plan()

    @contextlib.contextmanager
    def apply(self, model: nn.Module):
        yield model
