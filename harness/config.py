"""The harness config composed from ``conf/``: ``compose`` builds it from the presets plus overrides,
exactly as ``python -m harness`` would (the efficiency benchmark and the lmms-eval model use it to
build their methods), with a preset for every registered method and task (``presets``); ``result_key``
says which settings define a result. What is checked in a config is ``harness.settings``'s; where a run writes,
``harness.folders``'; the command line before Hydra runs, ``harness.command_line``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.results import REPO_ROOT, config_key

CONF_DIR = REPO_ROOT / "conf"
# The settings a result (its predictions and scores) depends on; everything else (out_dir, W&B,
# timing repeats, threads, device) changes how it is produced or logged, not what it is.
RESULT_KEYS = ("model", "method", "task", "seed", "limit")


def presets(group: str) -> list[str]:
    """Every preset ``GROUP=NAME`` accepts: the YAML files in ``conf/GROUP/`` (but ``_``-prefixed
    partials) and the presets code stored in Hydra's ConfigStore under ``GROUP``: a registered method's
    without a YAML (``register_method_presets``, run here for ``method``), a registered task's
    (``harness.tasks.register``)."""
    from hydra.core.config_store import ConfigStore

    if group == "method":
        register_method_presets()
    shipped = {p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_")}
    try:
        stored = {name.removesuffix(".yaml") for name in ConfigStore.instance().list(group)}
    except OSError:  # nothing stored under this group
        stored = set()
    return sorted(shipped | stored)


_STORED: dict[str, object] = {}  # method name -> the constructor whose preset is in Hydra's ConfigStore


def register_method_presets() -> None:
    """A preset for every method registered in ``lazyattn.METHODS`` that has no YAML in
    ``conf/method/``: its name and its constructor's settings at their defaults (None where a setting
    has none; a composition ``lazy_<pruner>`` nests the presets of its two parts, as the shipped
    ``lazy_fastv.yaml`` does), stored in Hydra's ConfigStore. So a method registered from code alone
    (``lazyattn.register``) runs with ``method=NAME method.SETTING=...`` like a shipped one."""
    import inspect

    import lazyattn
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    shipped = {p.stem for p in (CONF_DIR / "method").glob("*.yaml")}

    def preset(name: str) -> dict:
        if name in shipped:
            node = plain(OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml"))
            node.pop("defaults", None)
            return node
        parts = lazyattn.parts_of(name)  # a composition: its parts' presets, nested
        if parts:
            return {"name": name, **{part: {k: v for k, v in preset(part).items() if k != "name"} for part in parts}}
        return {"name": name, **{key: (None if p.default is inspect.Parameter.empty else p.default)
                                 for key, p in inspect.signature(lazyattn.METHODS[name]).parameters.items()}}

    for name, constructor in lazyattn.METHODS.items():
        if name not in shipped and _STORED.get(name) is not constructor:  # each registration stored once
            store.store(group="method", name=name, node=preset(name))
            _STORED[name] = constructor


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The harness config composed from ``conf/`` with Hydra ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_method_presets()
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
