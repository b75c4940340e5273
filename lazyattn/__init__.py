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
from lazyattn.base import Dense, Method, Plan
from lazyattn.cache import (PreallocatedCache, ValueOnlyLayer, kv_allocated_bytes, kv_cache_bytes, kv_read_bytes,
                            new_cache)
from lazyattn.calibrate import Calibration, calibrate, layer_divergence, select_lazy_layers
from lazyattn.compose import Composed, compose
from lazyattn.engine import PruneEngine, TokenPruner
from lazyattn.fastv import FastV
from lazyattn.hired import HiRED
from lazyattn.lazy import LazyAttention, anchors_of, uniform_lazy_layers
from lazyattn.control import ExplicitDense
from lazyattn.prumerge import PruMerge
from lazyattn.sparsevlm import SparseVLM
from lazyattn.vision import check_family
from lazyattn.vtw import VTW, choose_withdrawal_layer, withdrawal_kl


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
    or as its settings; its two settings are named ``lazy`` and ``<pruner>`` (the registry key)."""
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
    make.parts = ("lazy", pruner)  # the registry keys of its two parts
    make.__name__ = make.__qualname__ = name
    make.__doc__ = f"``compose(lazy, {pruner})``; either part may be given as its settings."
    return make


def _is_pruner(constructor: Any) -> bool:
    return isinstance(constructor, type) and issubclass(constructor, TokenPruner)


def register(name: str, constructor: Callable[..., Method]) -> None:
    """Add a method to the registry (after the built-in ones: its rows come last in tables). A token
    pruner (a ``TokenPruner`` subclass) also gets its composition with Lazy Attention, ``lazy_<name>``.
    ``constructor(**settings)`` must return a method keeping the ``Method`` protocol."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a method name is an identifier like 'mymethod', got {name!r}.")
    if name in METHODS and METHODS[name] is not constructor:
        raise ValueError(f"method {name!r} is registered already ({METHODS[name]!r}).")
    METHODS[name] = constructor
    if _is_pruner(constructor):
        METHODS.setdefault(f"lazy_{name}", composition(name))


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
# Every token pruner composes with Lazy Attention: lazy_fastv, lazy_sparsevlm, ... after the methods.
METHODS.update({f"lazy_{name}": composition(name) for name, ctor in list(METHODS.items()) if _is_pruner(ctor)})
METHODS["dense_explicit"] = ExplicitDense  # the backend control (lazyattn/control.py), last in tables


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
    "check_method_family",
    "choose_withdrawal_layer",
    "compose",
    "kv_cache_bytes",
    "kv_allocated_bytes",
    "kv_read_bytes",
    "new_cache",
    "PreallocatedCache",
    "Plan",
    "composition",
    "register",
    "layer_divergence",
    "method_families",
    "select_lazy_layers",
    "settings_of",
    "uniform_lazy_layers",
    "withdrawal_kl",
]
