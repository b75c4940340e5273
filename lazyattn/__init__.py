"""Inference-efficiency methods for multimodal LLMs, applied to Hugging Face models in place.

A method is a small dataclass whose fields are its hyper-parameters; ``with method.apply(model):``
installs it, yields the model, and restores the model exactly on exit, so one loaded model
serves every method. ``build({"name": "fastv", "k": 2, "ratio": 0.5})`` makes one from plain
settings (``METHODS`` lists them). What the methods install is mapped in ``lazyattn.attention``;
the methods are defined in docs/methods.md. This package imports neither Hydra, W&B nor the harness.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from lazyattn.attention import QCache
from lazyattn.base import Calibrator, Dense, Method, Plan
from lazyattn.cache import (PreallocatedCache, ValueOnlyLayer, kv_allocated_bytes, kv_cache_bytes, kv_read_bytes,
                            new_cache)
from lazyattn.calibration import Calibration, LazyLayersCalibrator, calibrate, layer_divergence, select_lazy_layers
from lazyattn.compose import Composed, compose
from lazyattn.engine import PruneEngine, TokenPruner
from lazyattn.fastv import FastV
from lazyattn.hired import HiRED
from lazyattn.lazy import LazyAttention, anchors_of, uniform_lazy_layers
from lazyattn.control import ExplicitDense
from lazyattn.prumerge import PruMerge
from lazyattn.sparsevlm import SparseVLM
from lazyattn.vision import check_family
from lazyattn.vtw import VTW, WithdrawalCalibrator, choose_withdrawal_layer, withdrawal_kl


def _part(method: str, role: str, value: Any) -> Method:
    """One part of a composed method: a method, or the settings of method ``role`` (a mapping)."""
    part = build({"name": role, **value}) if isinstance(value, Mapping) else value
    expected = METHODS[role]
    if not isinstance(part, expected):
        raise ValueError(
            f"method {method}: its {role} part must be a {expected.__name__} or its settings, got {part!r}."
        )
    return part


def composition(pruner: str) -> Callable[..., Composed]:
    """The constructor of ``lazy_<pruner>``: ``compose(lazy, pruner)``, either part given as a method
    or as its settings; its two settings are named ``lazy`` and ``<pruner>`` (the registry key).
    The registry records its parts (``parts_of``)."""
    name = f"lazy_{pruner}"
    signature = inspect.Signature([inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                   for p in ("lazy", pruner)])

    def make(*args, **kwargs) -> Composed:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as err:
            raise ValueError(f"method {name} takes the settings lazy and {pruner}: {err}.") from None
        return compose(_part(name, "lazy", bound.arguments["lazy"]), _part(name, pruner, bound.arguments[pruner]))

    make.__signature__ = signature
    make.__name__ = make.__qualname__ = name
    make.__doc__ = f"``compose(lazy, {pruner})``; either part may be given as its settings."
    return make


def _is_pruner(constructor: Any) -> bool:
    return isinstance(constructor, type) and issubclass(constructor, TokenPruner)


Examples = Callable[[int, str], "dict[str, dict[str, Any]]"]


def register(name: str, constructor: Callable[..., Method], calibrators: Mapping[str, Calibrator] | None = None,
             examples: Examples | None = None) -> None:
    """Add a method to the registry (after the built-in ones: its rows come last in tables). A token
    pruner (a ``TokenPruner`` subclass) also gets its composition with Lazy Attention, ``lazy_<name>``.
    ``constructor(**settings)`` must return a method keeping the ``Method`` protocol.

    ``calibrators``: setting -> how it is chosen when given as ``auto`` (a ``Calibrator``);
    ``examples(n_layers, family)``: the settings the checks run it at on a model of that depth and
    family, by entry name (default: its constructor's defaults, under its own name)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a method name is an identifier like 'mymethod', got {name!r}.")
    if name in METHODS and METHODS[name] is not constructor:
        raise ValueError(f"method {name!r} is registered already ({METHODS[name]!r}).")
    METHODS[name] = constructor
    if calibrators:
        CALIBRATORS[name] = dict(calibrators)
    if examples is not None:
        EXAMPLES[name] = examples
    if _is_pruner(constructor) and f"lazy_{name}" not in METHODS:
        METHODS[f"lazy_{name}"] = composition(name)
        PARTS[f"lazy_{name}"] = ("lazy", name)


def parts_of(name: str) -> tuple[str, ...]:
    """The registry keys of a composition's parts (its settings of the same names); () for a method
    that is not composed."""
    return PARTS.get(name, ())


def calibrators_of(name: str) -> dict[str, Calibrator]:
    """Setting -> its ``Calibrator``, for each setting of method ``name`` that may be ``auto``."""
    return CALIBRATORS.get(name, {})


def examples_of(name: str, n_layers: int, family: str) -> dict[str, dict[str, Any]]:
    """The method specs (``{"name": name, **settings}``) the checks run method ``name`` at, by entry
    name, on a model of ``n_layers`` layers and family ``family``. A composition's default is its
    parts' first examples, nested."""
    if name in EXAMPLES:
        return {entry: {"name": name, **settings} for entry, settings in EXAMPLES[name](n_layers, family).items()}
    parts = parts_of(name)
    if parts:
        firsts = [next(iter(examples_of(part, n_layers, family).values())) for part in parts]
        return {name: {"name": name, **{part: {k: v for k, v in spec.items() if k != "name"}
                                        for part, spec in zip(parts, firsts)}}}
    return {name: {"name": name}}


def check_method_family(method: Method, family: str | None, n_layers: int | None = None) -> None:
    """Refuse, in one line, a model family ``method`` is not defined for (before the model loads;
    the families do not depend on the depth, so any ``n_layers`` the plan accepts will do)."""
    families = method_families(method, n_layers)
    if families is not None:
        check_family(method.name, families, family)


def method_families(method: Method, n_layers: int | None = None) -> tuple[str, ...] | None:
    """The model families (``config.model_type``) a method is defined for (its plan's); None: every one."""
    if n_layers is None:  # before a model is loaded: the deepest plan any setting accepts
        n_layers = 1024
    return method.plan(n_layers).families


# The registry: name -> constructor. Its order is the order of rows in tables.
METHODS: dict[str, Callable[..., Method]] = {
    "dense": Dense,
    "lazy": LazyAttention,
    "fastv": FastV,
    "sparsevlm": SparseVLM,
    "vtw": VTW,
    "prumerge_plus": PruMerge,
    "hired": HiRED,
}
PARTS: dict[str, tuple[str, ...]] = {}  # a composition's name -> its parts' names
# Every token pruner composes with Lazy Attention: lazy_fastv, lazy_sparsevlm, ... after the methods.
for _name, _ctor in list(METHODS.items()):
    if _is_pruner(_ctor):
        METHODS[f"lazy_{_name}"], PARTS[f"lazy_{_name}"] = composition(_name), ("lazy", _name)
METHODS["dense_explicit"] = ExplicitDense  # the backend control (lazyattn/control.py), last in tables
del _name, _ctor

# How each setting that may be ``auto`` is chosen (``Calibrator``), by method and setting.
CALIBRATORS: dict[str, dict[str, Calibrator]] = {
    "lazy": {"layers": LazyLayersCalibrator()},
    "vtw": {"k": WithdrawalCalibrator()},
}

# The settings the checks (the GPU check's correctness matrix, the device plan) run each method at,
# by entry name, for a model of a depth and family; a method without an entry runs at its defaults.
EXAMPLES: dict[str, Examples] = {
    "lazy": lambda n, family: {"lazy": {"ratio": 0.5}, "lazy_qkv": {"ratio": 0.5, "share": "qkv"},
                               "lazy_visual": {"ratio": 0.5, "scope": "visual"},
                               "lazy_visual_scores": {"ratio": 0.5, "scope": "visual_scores"}},
    "fastv": lambda n, family: {"fastv": {"k": 2, "ratio": 0.5}},
    # M-RoPE positions (Qwen2-VL, Qwen2.5-VL): no re-indexing, no merging
    "sparsevlm": lambda n, family: {"sparsevlm": {"budget": 128, **({"positions": "original", "recycle": 0}
                                                                   if family.startswith("qwen") else {})}},
    "vtw": lambda n, family: {"vtw": {"k": n - 1}},
    # one scoring layer: the release's three leave no layer a lazy one may take in a shallow model
    "lazy_sparsevlm": lambda n, family: {"lazy_sparsevlm": {"lazy": {"ratio": 0.5}, "sparsevlm": {
        "layers": [1], "keep": [4], **({"positions": "original", "recycle": 0} if family.startswith("qwen") else {})}}},
    "lazy_vtw": lambda n, family: {"lazy_vtw": {"lazy": {"ratio": 0.5, "share": "qkv"}, "vtw": {"k": n - 1}}},
}


def settings_of(name: str) -> list[str]:
    """The settings (constructor arguments) of registered method ``name``."""
    return list(inspect.signature(METHODS[name]).parameters)


def build(spec: Mapping[str, Any]) -> Method:
    """The method ``spec["name"]`` with every other key of ``spec`` as a constructor argument.

    A value that is itself a mapping with a ``"name"`` key is built first, the same way (so a
    composed method's parts can be given as specs). Lists may be lists or tuples. Unknown names
    and unknown settings are refused with a one-line ``ValueError``; each method validates its
    own values.
    """
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"a method spec is a mapping with a 'name' key (one of: {', '.join(METHODS)}), got {spec!r}.")
    settings = dict(spec)
    name = settings.pop("name")
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}.")
    allowed = settings_of(name)
    for key in settings:
        if key not in allowed:
            raise ValueError(f"method {name} has no setting {key!r}; its settings: {', '.join(allowed) or 'none'}.")
    kwargs = {key: build(v) if isinstance(v, Mapping) and "name" in v else v for key, v in settings.items()}
    return METHODS[name](**kwargs)


__all__ = [
    "METHODS",
    "anchors_of",
    "Calibration",
    "Calibrator",
    "Composed",
    "Dense",
    "ExplicitDense",
    "FastV",
    "HiRED",
    "LazyAttention",
    "Method",
    "PruMerge",
    "PruneEngine",
    "QCache",
    "SparseVLM",
    "TokenPruner",
    "VTW",
    "ValueOnlyLayer",
    "build",
    "calibrate",
    "calibrators_of",
    "check_method_family",
    "choose_withdrawal_layer",
    "compose",
    "examples_of",
    "kv_cache_bytes",
    "kv_allocated_bytes",
    "kv_read_bytes",
    "new_cache",
    "PreallocatedCache",
    "Plan",
    "composition",
    "parts_of",
    "register",
    "layer_divergence",
    "method_families",
    "select_lazy_layers",
    "settings_of",
    "uniform_lazy_layers",
    "withdrawal_kl",
]
