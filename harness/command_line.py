"""The command line checked before Hydra runs: every preset it picks exists, every key it sets is a
setting (or one line naming the closest one), a launcher it names can launch here, and whatever the
entry point's ``preflight`` refuses in the composed config; each refusal one line, exit status 2."""

from __future__ import annotations

import difflib
import itertools
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.config import CONF_DIR, compose, presets
from harness.settings import RunError


def _leaves(node: Any, prefix: str = "") -> list[str]:
    """The dotted paths of a config node's settings (a dict's keys, recursively; lists are leaves)."""
    if not isinstance(node, DictConfig):
        return [prefix]
    out: list[str] = []
    for key in node.keys():
        out += (_leaves(node._get_node(key), f"{prefix}{key}.") if isinstance(node._get_node(key), DictConfig)
                else [f"{prefix}{key}"])
    return [p.rstrip(".") for p in out]


def _has(cfg: DictConfig, key: str) -> bool:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig):
            return True  # below a list or a leaf: Hydra judges it
        if part not in node.keys():
            return False
        node = node._get_node(part)
    return True


def _closest(word: str, choices: Sequence[str]) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {match[0]!r}? " if match else ""


def check_overrides(overrides: Sequence[str], config_name: str = "config") -> None:
    """Every preset a command line picks exists and every key it sets (``key=``, ``+key=``) is a
    setting of the composed config, or a RunError of one line naming the key and the closest
    known one. Hydra itself would advise ``+limt=16`` for a typo ``limt=16`` and then ignore the
    new key; a method's unknown key (``method=fastv method.layers=[2,3]``) names the method and
    its settings. Hydra's own overrides (``hydra.*``, ``hydra/launcher=``) are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # a syntax error: Hydra's own message points at it
        return
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"}
    prefix = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++"}
    choices, keys = [], []
    for o in parsed:
        if o.is_hydra_override() or o.type == OverrideType.DEL:
            continue
        if o.key_or_group not in groups:
            keys.append(o)
            continue
        try:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        except Exception:  # glob or range sweeps of a group: Hydra expands them
            continue
        known = presets(o.key_or_group)  # conf/GROUP/*.yaml and a registered method's or task's preset
        for value in values:  # a _-prefixed YAML is taken where named in full
            if isinstance(value, str) and (value in known or (CONF_DIR / o.key_or_group / f"{value}.yaml").is_file()):
                continue
            raise RunError(f"unknown {o.key_or_group} preset {value!r} (in {o.input_line!r}); "
                           f"{_closest(str(value), known)}the presets: {', '.join(known)} "
                           f"(conf/{o.key_or_group}/ and registered).")
        choices.append((o.key_or_group, [f"{prefix.get(o.type, '')}{o.key_or_group}={v}" for v in values]))
    if not keys:
        return
    # Only the choices of the groups the keys live under (and of exp and preset, which may set any
    # key) change which keys exist: compose each combination of those, the other groups at their first
    # value. A sweep over models and tasks with method.* keys composes once per method, not per point.
    tops = {o.key_or_group.partition(".")[0] for o in keys} | {"exp", "preset"}
    varied = [values if group in tops else values[:1] for group, values in choices]
    for combo in itertools.islice(itertools.product(*varied), 64):  # each relevant group choice of a sweep
        try:
            cfg = compose(list(combo), config_name=config_name)
        except Exception:  # a preset that does not compose, a group this config has not: Hydra says so
            return
        known = list(cfg.keys())
        for o in keys:
            key = o.key_or_group
            top, _, rest = key.partition(".")
            if top not in cfg.keys():
                raise RunError(f"unknown setting {top!r} (in {o.input_line!r}); {_closest(top, known)}"
                               f"the settings: {', '.join(known)} (conf/{config_name}.yaml).")
            if _has(cfg, key):
                continue
            if top == "method" and "name" in cfg.method:
                settings = [s for s in _leaves(cfg.method) if s.rsplit(".", 1)[-1] != "name"]
                raise RunError(f"method {cfg.method.name} has no setting {rest!r} (in {o.input_line!r}); "
                               f"{_closest(rest, settings)}its settings: {', '.join(settings)}.")
            parent = key.rsplit(".", 1)[0]
            node = OmegaConf.select(cfg, parent)
            siblings = [f"{parent}.{k}" for k in node.keys()] if isinstance(node, DictConfig) else []
            where = (f"{parent} has: {', '.join(k.rsplit('.', 1)[1] for k in siblings)}" if siblings
                     else f"{parent} holds no settings")
            raise RunError(f"unknown setting {key!r} (in {o.input_line!r}); {_closest(key, siblings)}{where}.")


SLURM_LAUNCHERS = ("slurm", "submitit_slurm")  # conf/hydra/launcher/slurm.yaml and the plugin's own


def check_launcher(overrides: Sequence[str], multirun: bool) -> None:
    """A SLURM launcher where SLURM is absent (no ``sbatch`` on PATH) refused in one line, naming
    submitit_local (the same submitit machinery, jobs as local processes) for a rehearsal; a launcher
    without ``-m`` too, since Hydra would ignore it and run one point here."""
    launchers = [o.split("=", 1)[1] for o in overrides if o.lstrip("+~").startswith("hydra/launcher=")]
    if not launchers:
        return
    if not multirun:
        raise RunError(f"hydra/launcher={launchers[-1]} launches the points of a multirun: add -m (a single run "
                       "runs here, without a launcher).")
    if launchers[-1] in SLURM_LAUNCHERS and shutil.which("sbatch") is None:
        raise RunError(f"hydra/launcher={launchers[-1]} needs SLURM, and this machine has none (no sbatch on PATH); "
                       "rehearse the sweep here with hydra/launcher=submitit_local, or submit from a SLURM login node.")


def check_command_line(config_name: str = "config", preflight=None) -> None:
    """Refuse unknown presets and keys on the command line, and whatever ``preflight(cfg,
    multirun)`` refuses in the composed config (``harness.run.preflight`` for ``python -m
    harness``), in one line with exit status 2, before Hydra runs and writes anything."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args()
    if args.shell_completion or args.help or args.hydra_help or args.cfg or args.info:
        return
    try:
        check_launcher(args.overrides, bool(args.multirun))
        check_overrides(args.overrides, config_name)
        cfg = _compose_plain_point(args.overrides, config_name) if preflight is not None else None
        if cfg is not None:
            preflight(cfg, multirun=bool(args.multirun))
    except (RunError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def _compose_plain_point(overrides: Sequence[str], config_name: str) -> DictConfig | None:
    """The config of the command line without its sweeps (a multirun's shared settings), or None
    when it does not compose here (Hydra then reports it) or names Hydra's own settings."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        plain_overrides = [o.input_line for o in parsed if not o.is_sweep_override() and not o.is_hydra_override()]
        return compose(plain_overrides, config_name=config_name)
    except Exception:  # noqa: BLE001 - Hydra's own parser and composer say what is wrong
        return None
