"""The benchmark's settings and method entries: each ``methods`` entry composed from its preset and
built (``make_variant``), the settings checked in one line each, the resume key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig

from harness.method import fixed_method
from harness.config import compose, plain, presets
from harness.settings import RunError
from harness.results import config_key
from harness.bench.constants import KEY_EXCLUDE


class BenchError(RunError):
    """A problem with the benchmark's settings, reported as one clear line."""


@dataclasses.dataclass
class Variant:
    label: str
    config: str
    method: Any
    lazy_layers: list[int] = dataclasses.field(default_factory=list)


def _dotlist(d: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in d.items():
        if isinstance(value, dict):
            out += _dotlist(value, f"{prefix}{key}.")
        else:
            text = json.dumps(value, separators=(",", ":")) if isinstance(value, (list, type(None))) else value
            out.append(f"{prefix}{key}={text}")
    return out


def parse_entry(entry: Any) -> tuple[str, list[str]]:
    """(preset name, ``key=value`` overrides of it) of one ``methods`` entry."""
    entry = plain(entry)
    if isinstance(entry, str) and entry.split():
        name, *dotlist = entry.split()
    elif isinstance(entry, dict) and "config" in entry and set(entry) <= {"config", "overrides"}:
        raw = entry.get("overrides") or {}
        if not isinstance(raw, dict):
            raise BenchError(f"method entry {entry!r}: overrides must be a mapping like {{ratio: 0.5}}.")
        name, dotlist = str(entry["config"]), _dotlist(raw)
    else:
        raise BenchError(f"method entry {entry!r} must be a string 'PRESET key=value ...' or {{config: PRESET, overrides: {{...}}}}.")
    bad = [p for p in dotlist if "=" not in p]
    if bad:
        raise BenchError(f"method entry {entry!r}: overrides must be key=value, got {bad}.")
    return name, dotlist


def make_variant(entry: Any) -> Variant:
    """The method of one entry, composed from its conf/method preset exactly as `method=PRESET
    method.key=value` would be, and built by lazyattn.build."""
    name, dotlist = parse_entry(entry)
    label = " ".join([name, *dotlist])
    if any(p.split("=", 1)[0] == "name" for p in dotlist):
        raise BenchError(f"method entry {label!r}: the method's name comes from its preset; don't override it.")
    known = presets("method")
    if name not in known:
        raise BenchError(f"unknown method preset {name!r} in methods; known: {', '.join(known)} (conf/method/).")
    try:
        cfg = compose([f"method={name}", *(f"method.{p}" for p in dotlist)])
        method = fixed_method(cfg.method, "the efficiency benchmark")
    except ConfigCompositionException as err:  # "Could not override 'method.ratoi'."
        raise BenchError(f"method entry {label!r}: {str(err).splitlines()[0]} (not a key of conf/method/{name}.yaml)") from err
    except ValueError as err:
        raise BenchError(f"method entry {label!r}: {err}") from err
    return Variant(label=label, config=name, method=method)


def _int(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BenchError(f"{what} must be an integer >= {minimum}, got {value!r}.")
    return value


def _compile_modes(value) -> list[bool]:
    """``compile``: false (eager decode), true (compiled static-graph decode) or both (every point
    timed eager, then compiled: the rows side by side)."""
    if isinstance(value, bool):
        return [value]
    if value == "both":
        return [False, True]
    raise BenchError(f"compile must be false, true or both, got {value!r}.")


def check_settings(cfg: DictConfig) -> dict:
    batch_sizes = plain(cfg.batch_sizes)
    contexts = plain(cfg.context_lengths)
    if not isinstance(batch_sizes, list) or not batch_sizes:
        raise BenchError(f"batch_sizes must be a non-empty list like [1,4,8], got {batch_sizes!r}.")
    if not isinstance(contexts, list) or not contexts:
        raise BenchError(f"context_lengths must be a non-empty list like [null,256,512], got {cfg.context_lengths!r}.")
    for b in batch_sizes:
        _int(b, "every batch size", 1)
    for c in contexts:
        if c is not None:
            _int(c, "every context length (or null)", 1)
    if len(set(batch_sizes)) != len(batch_sizes) or len(set(contexts)) != len(contexts):
        raise BenchError("batch_sizes and context_lengths must not repeat a value.")
    if not cfg.methods:
        raise BenchError("methods is empty; list at least one, e.g. methods=['lazy ratio=0.5'].")
    settings = {
        "batch_sizes": batch_sizes,
        "context_lengths": contexts,
        "new_tokens": _int(cfg.new_tokens, "new_tokens", 1),
        "repeats": _int(cfg.repeats, "repeats", 1),
        "warmup": _int(cfg.warmup, "warmup", 0),
        "cache": str(cfg.get("cache", "static")),
        "compile": _compile_modes(cfg.get("compile", False)),
    }
    from harness.settings import check_cache

    check_cache(settings["cache"])
    b = cfg.budget
    if b.enabled:
        kind = b.get("kind", "kv")
        if kind not in ("kv", "memory"):
            raise BenchError(f"budget.kind must be kv (KV cache bytes) or memory (peak device memory), got {kind!r}.")
        if b.get("new_tokens") is not None:
            _int(b.new_tokens, "budget.new_tokens (or null)", 1)
        if b.bytes is not None:
            whole = isinstance(b.bytes, float) and b.bytes.is_integer()  # 8e9 on the command line is a float
            settings["budget_bytes"] = _int(int(b.bytes) if whole else b.bytes, "budget.bytes (or null)", 1)
        else:
            _int(b.reference_batch, "budget.reference_batch", 1)
        _int(b.max_batch, "budget.max_batch", 1)
        if b.context_length is not None:
            _int(b.context_length, "budget.context_length (or null)", 1)
    return settings


def bench_key(cfg: DictConfig) -> str:
    data = {k: v for k, v in plain(cfg).items() if k not in KEY_EXCLUDE}
    return config_key(data)


def previous_result(path: Path, key: str, overwrite: bool) -> dict | None:
    """The unfinished bench to resume, if any; refuses to clobber a finished or different one."""
    if overwrite or not path.exists():
        return None
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise BenchError(f"{path} is not valid JSON; pass overwrite=true or choose another out_dir=DIR.") from None
    if previous.get("status") == "complete":
        raise BenchError(f"{path.parent} already holds a finished bench; pass overwrite=true or choose another out_dir=DIR.")
    if previous.get("bench_key") != key:
        raise BenchError(
            f"{path.parent} holds an unfinished bench with other settings; run it with its own settings to resume, "
            "or pass overwrite=true, or choose another out_dir=DIR."
        )
    return previous
