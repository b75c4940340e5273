"""From Hydra configs to the objects a run needs, in one place.

``compose`` builds the harness config from ``conf/`` plus overrides, exactly as
``python -m harness`` would (the efficiency benchmark and the lmms-eval model use it to build
their methods); ``result_key`` says which settings define a result; ``check_run`` validates
the run-level settings before anything is loaded, each error naming its key.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from harness.results import REPO_ROOT, config_key

CONF_DIR = REPO_ROOT / "conf"
# The settings a result (its predictions and scores) depends on; everything else (out_dir, W&B,
# timing repeats, threads, device) changes how it is produced or logged, not what it is.
RESULT_KEYS = ("model", "method", "task", "seed", "limit")


class RunError(Exception):
    """A problem with the run's settings, reported as one clear line."""


def method_presets() -> list[str]:
    """Every method preset ``method=NAME`` accepts: the YAML files in ``conf/method/`` and the
    registered methods without one (``register_method_presets``)."""
    import lazyattn

    return sorted({p.stem for p in (CONF_DIR / "method").glob("*.yaml")} | set(lazyattn.METHODS))


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
        constructor = lazyattn.METHODS[name]
        parts = getattr(constructor, "parts", None)  # a composition: its parts' presets, nested
        if parts:
            return {"name": name, **{part: {k: v for k, v in preset(part).items() if k != "name"} for part in parts}}
        return {"name": name, **{key: (None if p.default is inspect.Parameter.empty else p.default)
                                 for key, p in inspect.signature(constructor).parameters.items()}}

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


def positive_int(value: Any, key: str, minimum: int = 1, allow_none: bool = False) -> int | None:
    """``value`` as an int >= ``minimum``, or a RunError that names ``key`` and says what to pass."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = f"an integer >= {minimum}" + (" or null" if allow_none else "")
        raise RunError(f"{key} must be {what}, got {value!r}; e.g. {key}={max(minimum, 16)}.")
    return value


def check_run(cfg: DictConfig) -> None:
    """The run-level settings, checked before any data or model is touched."""
    positive_int(cfg.limit, "limit", allow_none=True)
    positive_int(cfg.batch_size, "batch_size")
    positive_int(cfg.seed, "seed", minimum=0)
    if cfg.get("threads") is not None:
        positive_int(cfg.threads, "threads")
    eff = cfg.efficiency
    if eff.enabled:
        positive_int(eff.batch_size, "efficiency.batch_size")
        positive_int(eff.new_tokens, "efficiency.new_tokens")
        positive_int(eff.repeats, "efficiency.repeats")
        positive_int(eff.warmup, "efficiency.warmup", minimum=0)
    cal = cfg.calibration
    if cal.get("select", "pairwise") not in ("pairwise", "anchor", "blocks"):
        raise RunError(f"calibration.select must be pairwise, anchor or blocks (the paper's rule), got {cal.select!r}.")
    if cal.get("select") == "blocks" and cal.get("max_per_anchor") is not None:
        raise RunError("calibration.select=blocks takes no calibration.max_per_anchor (it merges every layer below "
                       "epsilon into its block); drop one of them.")
    positive_int(cal.get("max_per_anchor"), "calibration.max_per_anchor", allow_none=True)
    positive_int(cal.get("samples"), "calibration.samples")
    threshold = cal.get("threshold")
    # a JS divergence is >= 0: a negative threshold selects no lazy layer at all, and the run would
    # report "lazy layers none" as if it were a result
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or threshold < 0):
        raise RunError(f"calibration.threshold must be a JS divergence >= 0 (or null: method.ratio decides), "
                       f"got {threshold!r}; e.g. calibration.threshold=0.05.")
    check_cache(cfg.get("cache", "static"))
    resolve_device(str(cfg.device))


def check_dtype(cfg: DictConfig) -> None:
    """float16 on a CPU refused in one line: its kernels are slow emulation, so the timings mean
    nothing, and a run would go on silently with KV bytes half float32's. ``model.dtype=auto`` is
    judged by the dtype it would read, a checkpoint's config.json."""
    import json

    if resolve_device(str(cfg.device)).type != "cpu":
        return
    dtype, read = str(cfg.model.get("dtype", "auto")), ""
    if dtype == "auto" and cfg.model.get("path"):
        try:
            config = json.loads((Path(str(cfg.model.path)).expanduser() / "config.json").read_text())
        except (OSError, ValueError):
            return  # the checkpoint check says what is wrong with it
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "auto")
        read = " (model.dtype=auto: config.json)"
    if dtype == "float16":
        raise RunError(f"model.dtype=float16{read} on a CPU: emulated half-precision kernels make timings meaningless; "
                       "pass model.dtype=float32 (or bfloat16), or run on device=cuda.")


def check_cache(cache) -> None:
    from lazyattn.cache import CACHE_KINDS

    if cache not in CACHE_KINDS:
        raise RunError(f"cache must be static (preallocated, written in place) or dynamic (transformers' "
                       f"concatenating DynamicCache), got {cache!r}.")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise RunError(f"device must be auto, cpu or cuda, got {name!r}.")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError("device=cuda but no CUDA device is visible; use device=cpu or device=auto.")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg: DictConfig) -> torch.device:
    """What every entry point does before loading a model: CPU threads, seeds, the device."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    seed_everything(int(cfg.seed))
    return resolve_device(str(cfg.device))


def method_spec(method_cfg: DictConfig | Mapping) -> dict:
    """The method config as the plain mapping ``lazyattn.build`` takes (name plus fields)."""
    spec = plain(method_cfg)
    if not isinstance(spec, dict) or "name" not in spec:
        raise RunError(f"a method config needs a name (a conf/method preset), got {spec!r}.")
    return spec


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
    import difflib

    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {match[0]!r}? " if match else ""


def check_overrides(overrides: Sequence[str], config_name: str = "config") -> None:
    """Every preset a command line picks exists and every key it sets (``key=``, ``+key=``) is a
    setting of the composed config, or a RunError of one line naming the key and the closest
    known one. Hydra itself would advise ``+limt=16`` for a typo ``limt=16`` and then ignore the
    new key; a method's unknown key (``method=fastv method.layers=[2,3]``) names the method and
    its settings. Hydra's own overrides (``hydra.*``, ``hydra/launcher=``) are left to Hydra."""
    import itertools

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
        presets = sorted(p.stem for p in (CONF_DIR / o.key_or_group).glob("*.yaml") if not p.stem.startswith("_"))
        if o.key_or_group == "method":  # registered methods without a YAML have a preset too
            presets = method_presets()
        for value in values:
            if not isinstance(value, str) or value not in presets and not (CONF_DIR / o.key_or_group / f"{value}.yaml").is_file():
                raise RunError(f"unknown {o.key_or_group} preset {value!r} (in {o.input_line!r}); "
                               f"{_closest(str(value), presets)}the presets: {', '.join(presets)} "
                               f"(conf/{o.key_or_group}/).")
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


def writable_dir(path: Path, key: str) -> None:
    """A RunError of one line unless ``path`` can be created and written: its nearest existing
    ancestor is a folder in which a file can be made (tried and removed at once, so a read-only
    file system or a folder of another user is caught, even for root)."""
    import os
    import tempfile

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
    import shutil

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


SLURM_LAUNCHERS = ("slurm", "submitit_slurm")  # conf/hydra/launcher/slurm.yaml and the plugin's own


def check_launcher(overrides: Sequence[str], multirun: bool) -> None:
    """A SLURM launcher where SLURM is absent (no ``sbatch`` on PATH) refused in one line, naming
    submitit_local (the same submitit machinery, jobs as local processes) for a rehearsal; a launcher
    without ``-m`` too, since Hydra would ignore it and run one point here."""
    import shutil

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
    import sys

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
