"""Settings chosen on the val split, resolved here and nowhere else:

- ``method.layers=auto`` (Lazy Attention): lazy layers chosen by ``lazyattn.calibrate`` for the
  budget ``method.ratio`` (or ``calibration.threshold``), by ``calibration.select``
  (``pairwise``: the dense model's divergence matrix; ``anchor``: measured against the real
  anchor as the set grows) with at most ``calibration.max_per_anchor`` lazy layers per anchor;
- ``method.k=auto`` (VTW, also ``method.vtw.k=auto`` in ``lazy_vtw``): the withdrawal layer by
  the method's ``rule`` and ``eta`` (``lazyattn.withdrawal_kl``, ``choose_withdrawal_layer``):
  ``release``, the released code's rule (first layer from 5, scaled by depth, whose mean
  ``KL(withdrawn || dense)`` is ``<= eta``; eta per model preset, ``model.vtw_eta``), or
  ``suffix``, the harness's earlier rule.

Each choice is cached in a small JSON file (``calibration.dir``, outside the source tree) keyed by
the model's config and weights, the task and the calibration settings, so repeated runs and
sweeps calibrate once, and a retrained checkpoint calibrates again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig

from harness.config import method_spec, plain
from harness.generate import prompt_inputs
from harness.results import config_key, write_json_atomic
from lazyattn import build, calibrate, choose_withdrawal_layer, withdrawal_kl
from lazyattn.arch import decoder_layers
from lazyattn.vtw import DEFAULT_ETA, RELEASE_START, search_start

AUTO = "auto"


def _auto_paths(spec: dict) -> list[tuple[str, ...]]:
    """Where a method spec asks for a calibrated setting: ("layers",), ("k",), ("vtw", "k")."""
    paths = []
    if spec.get("name") == "lazy" and spec.get("layers") == AUTO:
        paths.append(("layers",))
    if spec.get("name") == "vtw" and spec.get("k") == AUTO:
        paths.append(("k",))
    vtw = spec.get("vtw")
    if isinstance(vtw, dict) and vtw.get("k") == AUTO:
        paths.append(("vtw", "k"))
    lazy = spec.get("lazy")
    if isinstance(lazy, dict) and lazy.get("layers") == AUTO:
        raise ValueError(
            f"method.lazy.layers=auto is not supported in {spec.get('name')}: calibrate a lazy run "
            "(+exp=llava_lazy) and pass its layers (result.json method.lazy_layers) as method.lazy.layers=[...]."
        )
    return paths


def wanted(method_cfg: DictConfig) -> bool:
    """Whether the method asks for a setting chosen on the val split (``auto``)."""
    return bool(_auto_paths(method_spec(method_cfg)))


def check(method_cfg: DictConfig) -> None:
    """Build the method with stand-ins for its ``auto`` settings, so that every other setting is
    checked (one line, before the model loads), as a method without ``auto`` is."""
    spec = method_spec(method_cfg)
    for path in _auto_paths(spec):
        target = spec if len(path) == 1 else spec[path[0]]
        target[path[-1]] = [] if path[-1] == "layers" else 1
    build(spec)


def refuse(where: str) -> None:
    raise ValueError(
        f"method.layers=auto and method.k=auto need the harness's calibration (python -m harness ... task=shapes); "
        f"{where} takes explicit settings: pass the chosen ones (result.json method.lazy_layers, method.params.k)."
    )


def build_fixed(method_cfg: DictConfig, where: str):
    """The method of a config that has no ``auto`` setting (refused in one line naming ``where``: the
    entry points that cannot calibrate, the efficiency benchmark and the lmms-eval model)."""
    if wanted(method_cfg):
        refuse(where)
    return build(method_spec(method_cfg))


def weights_fingerprint(model) -> str:
    """A cheap identity of the weights: every parameter's name, shape and first values. A
    checkpoint retrained in place keeps its path and config, so those alone cannot key a cache."""
    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(param.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _cached(cfg: DictConfig, loaded, what: dict, compute) -> dict:
    """``compute()``'s record, cached under a key of the model, weights, task and ``what``."""
    key = config_key({
        "model": plain(cfg.model),
        "weights": weights_fingerprint(loaded.model),
        "task": plain(cfg.task),
        "samples": int(cfg.calibration.samples),
        **what,
    })
    path = Path(str(cfg.calibration.dir)).expanduser() / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    record = {"key": key, **compute(), "samples": int(cfg.calibration.samples), "split": "val"}
    write_json_atomic(path, record)
    return record


def _lazy_record(cfg: DictConfig, loaded, batches, spec: dict) -> dict:
    cal = cfg.calibration
    threshold, select = cal.threshold, str(cal.get("select", "pairwise"))
    cap = cal.get("max_per_anchor")
    ratio = None if threshold is not None else spec.get("ratio")
    what = {"ratio": spec.get("ratio"), "threshold": threshold}
    if select != "pairwise" or cap is not None:  # the default rule keeps its older keys
        what.update(select=select, max_per_anchor=cap)
    share, scope = spec.get("share", "qk"), spec.get("scope", "all")
    if select == "anchor":  # only the anchor rule runs the model under the reading; pairwise is the same for all
        what.update(share=share)
        if scope != "all":  # GLA keeps its older key (its cached choices stay valid); another scope is apart
            what.update(scope=scope)

    def compute():
        result = calibrate(loaded.model, batches(), ratio=ratio, threshold=threshold, select=select,
                           max_per_anchor=cap, share=share, scope=scope)
        return {
            "lazy_layers": result.lazy_layers,
            "select": result.select,
            "max_per_anchor": cap,
            "anchor_of": {str(k): v for k, v in result.anchor_of.items()},
            "anchor_js": {str(k): v for k, v in result.anchor_js.items()},
            "chosen_js": result.chosen_js,
            "adjacent_js": result.adjacent,
            "divergence": result.divergence,
            # the reading the model ran under while choosing (anchor only: the other rules read the dense model)
            **({"share": share, "scope": scope} if select == "anchor" else {}),
        }

    record = _cached(cfg, loaded, what, compute)
    return {**record, "ratio": spec.get("ratio"), "threshold": threshold}


def _vtw_record(cfg: DictConfig, loaded, batches, vtw: dict) -> dict:
    rule, eta = vtw.get("rule", "release"), vtw.get("eta", DEFAULT_ETA)
    n_layers = len(decoder_layers(loaded.model))
    start = search_start(n_layers, rule)

    def compute():
        return {"kl": withdrawal_kl(loaded.model, batches(), rule=rule)}

    # the profile depends on the rule (direction and start), not on eta; the suffix rule keeps its older key
    what = {"vtw_kl": True} if rule == "suffix" else {"vtw_kl": "withdrawn||dense", "start": start}
    record = _cached(cfg, loaded, what, compute)
    return {**record, "k": choose_withdrawal_layer(record["kl"], eta, rule), "rule": rule, "eta": eta,
            "start": start, "start_scaled": rule == "release" and start != RELEASE_START,
            "direction": "KL(withdrawn||dense)" if rule == "release" else "KL(dense||withdrawn)"}


def resolve(cfg: DictConfig, loaded, task, device) -> tuple[dict, dict]:
    """The method spec with every ``auto`` setting chosen (a lazy method keeps its ratio as the
    budget its layers were chosen for), and the calibration record for result.json."""
    spec = method_spec(cfg.method)
    n = int(cfg.calibration.samples)

    def batches():
        return [
            prompt_inputs(loaded.processor, [history], images, device, loaded.model.dtype)
            for history, images in task.calibration_prompts(n)
        ]

    record: dict = {}
    for path in _auto_paths(spec):
        if path == ("layers",):
            record = _lazy_record(cfg, loaded, batches, spec)
            spec["layers"] = list(record["lazy_layers"])
        else:
            target = spec if path == ("k",) else spec["vtw"]
            vtw = _vtw_record(cfg, loaded, batches, target)
            target["k"] = int(vtw["k"])
            record = {**record, "vtw": vtw} if path != ("k",) else vtw
    return spec, record


def _how(record: dict) -> str:
    how = {"anchor": "anchor-calibrated", "blocks": "block-calibrated"}.get(record.get("select"), "calibrated")
    if record.get("max_per_anchor"):
        how += f", <={record['max_per_anchor']}/anchor"
    return how


def label(record: dict, method, n_layers: int) -> str:
    """The table label of a run with calibrated settings: the budget or threshold they were chosen for."""
    if "lazy_layers" in record:
        reading = method.plan(n_layers).reading
        if record.get("threshold") is not None:
            return f"Lazy{reading} JS<={record['threshold']:g} ({_how(record)})"
        return f"Lazy{reading} r={record['ratio']:g} ({_how(record)})"
    vtw = record.get("vtw", record)
    chosen = f"VTW K={vtw['k']} ({vtw_how(vtw)})"
    return chosen if "vtw" not in record else f"{method.label(n_layers).split(' + ')[0]} + {chosen}"


def vtw_how(vtw: dict) -> str:
    """How a calibrated VTW k was chosen, for its label: "KL<=0.003" (the released rule),
    "KL<=0.003 from L2, scaled" (its search start scaled to a model of another depth),
    "suffix KL<=0.05" (the harness's earlier rule); older records say only "KL<=0.05"."""
    eta = vtw.get("eta", vtw.get("kl_threshold"))
    if "rule" not in vtw:
        return f"KL<={eta:g}"
    if vtw["rule"] == "suffix":
        return f"suffix KL<={eta:g}"
    return f"KL<={eta:g} from L{vtw['start']}, scaled" if vtw.get("start_scaled") else f"KL<={eta:g}"


def _sort_how(record: dict) -> str:
    # "calibrated+anchor" sorts right after the default rule's "calibrated", before "uniform"
    select = record.get("select", "pairwise")
    how = "calibrated" if select == "pairwise" else f"calibrated+{select}"
    if record.get("max_per_anchor"):
        how += f", <={record['max_per_anchor']}/anchor"
    return how


def sort_key(record: dict, method, n_layers: int) -> list:
    if "lazy_layers" in record:
        plan = method.plan(n_layers)
        if plan.reading or record.get("max_per_anchor"):
            return ["variant", plan.share, plan.scope, _sort_how(record), record.get("ratio") or 0]
        return [_sort_how(record), record.get("ratio") or 0]
    return list(method.sort_key(n_layers))  # VTW: its chosen k orders it among explicit ones


def series(record: dict, plan) -> str:
    """The figure series of a calibrated point: e.g. "lazy (calibrated)", "lazy qkv (calibrated+anchor)";
    a calibrated VTW point stays in its method's series (its k orders it among the explicit ones)."""
    if "lazy_layers" not in record:
        return plan.series
    reading = "".join(f" {x}" for x in (plan.share, plan.scope) if x not in ("qk", "all"))
    return f"lazy{reading} ({_sort_how(record)})"
