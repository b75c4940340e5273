"""``python -m harness.reproduce POINT_DIR [limit=N] [--out DIR]``: re-run a committed point.

A point's folder holds ``result.json`` (whose ``config`` is the run's whole resolved config) and
``samples.jsonl`` (every sample's prediction). This composes today's config with the point's own
preset choices (``model=``, ``method=``, ``task=``), puts every saved value over it, and fills the
keys added since from today's defaults, naming each (and naming saved keys that no longer exist).
Then it runs the point into a fresh folder (``--out``, default a temporary one) with W&B and the
timing off, and compares every prediction, turn by turn, with the committed ``samples.jsonl``:
samples are matched by variant and id, so ``limit=N`` re-runs the first ``N`` samples only (a
sample's answer does not depend on the batch it is in). Exit status 0 when every compared
prediction is equal, 1 when one differs (each listed), 2 for a folder it cannot read.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf, open_dict

from harness.config import CONF_DIR, compose
from harness.settings import RunError

# Settings of the re-run itself, never taken from the saved config.
RUN_ONLY = {"out_dir", "overwrite", "skip_finished", "sweep_root", "runs_root", "wandb"}


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def saved_config(point: Path) -> dict:
    path = point / "result.json"
    if not path.is_file():
        raise RunError(f"{point} has no result.json: pass a finished point's folder (one holding result.json "
                       "and samples.jsonl).")
    try:
        config = json.loads(path.read_text()).get("config")
    except json.JSONDecodeError as err:
        raise RunError(f"{path} is not valid JSON ({err}).") from err
    if not isinstance(config, dict) or not isinstance(config.get("method"), dict):
        raise RunError(f"{path} records no config: it cannot be re-run from what it saved.")
    return config


def _preset(group: str, name: Any) -> list[str]:
    return [f"{group}={name}"] if name and (CONF_DIR / group / f"{name}.yaml").is_file() else []


def rebuild(saved: dict, overrides: list[str] = ()) -> tuple[Any, list[str], list[str]]:
    """Today's config with the saved values over it: (config, keys filled from today's defaults,
    saved keys that no longer exist)."""
    groups = [*_preset("model", saved.get("model", {}).get("name")),
              *_preset("method", saved["method"].get("name")),
              *_preset("task", saved.get("task", {}).get("name"))]
    cfg = compose(groups)
    today = _leaves(OmegaConf.to_container(cfg, resolve=False))
    old = {k: v for k, v in _leaves(saved).items() if k.split(".")[0] not in RUN_ONLY}
    dropped = sorted(k for k in old if k not in today)
    added = sorted(k for k in today if k not in old and k.split(".")[0] not in RUN_ONLY)
    with open_dict(cfg):
        for key, value in old.items():
            if key in today:
                OmegaConf.update(cfg, key, value, merge=False)
    for item in overrides:  # key=value given on the command line (limit=N), parsed as YAML
        key, _, text = item.partition("=")
        if key not in today:
            raise RunError(f"unknown setting {key!r} (in {item!r}); e.g. limit=16.")
        OmegaConf.update(cfg, key, yaml.safe_load(text) if text else None, merge=False)
    return cfg, added, dropped


def _rows(path: Path) -> dict[tuple, dict]:
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[(row.get("variant", "method"), row["id"])] = row
    return rows


def compare_samples(committed: Path, fresh: Path) -> tuple[int, list[str]]:
    """(samples compared, one line per sample whose prediction or turns differ)."""
    old, new = _rows(committed), _rows(fresh)
    keys = sorted(set(old) & set(new), key=str)
    diffs = []
    for key in keys:
        a, b = old[key], new[key]
        if a.get("prediction") != b.get("prediction") or (a.get("turns") and a.get("turns") != b.get("turns")):
            diffs.append(f"{key[0]} {key[1]}: committed {a.get('turns') or a.get('prediction')!r}, "
                         f"now {b.get('turns') or b.get('prediction')!r}")
    return len(keys), diffs


def reproduce(point: Path, overrides: list[str], out: Path | None = None, timing: bool = False) -> int:
    from harness.run import run

    saved = saved_config(point)
    cfg, added, dropped = rebuild(saved, overrides)
    out = out or Path(tempfile.mkdtemp(prefix="reproduce-"))
    with open_dict(cfg):
        cfg.out_dir, cfg.overwrite, cfg.skip_finished = str(out), True, False
        cfg.wandb.mode = "disabled"
        if not timing:
            cfg.efficiency.enabled = False
    if added:
        print(f"filled from today's defaults (added since this point ran): {', '.join(added)}")
    if dropped:
        print(f"saved keys that no longer exist (ignored): {', '.join(dropped)}")
    run(cfg)
    n, diffs = compare_samples(point / "samples.jsonl", out / "samples.jsonl")
    if n == 0:
        raise RunError(f"no sample of {point} was re-run (limit too small, or a different task?).")
    for line in diffs:
        print(f"differs: {line}")
    print(f"{point}: {n} predictions compared, {len(diffs)} differ ({out})")
    return 1 if diffs else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("point", type=Path, help="a committed point's folder (result.json, samples.jsonl)")
    parser.add_argument("overrides", nargs="*", help="key=value settings over the saved ones, e.g. limit=16")
    parser.add_argument("--out", type=Path, default=None, help="where the re-run writes (default: a temporary folder)")
    parser.add_argument("--timing", action="store_true", help="also run the efficiency measurement")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        print(f"error: settings must be key=value, got {bad}.", file=sys.stderr)
        return 2
    try:
        return reproduce(args.point, args.overrides, args.out, args.timing)
    except (RunError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
