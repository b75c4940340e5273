"""Choosing lazy layers from the model's own attention (docs/methods.md, "Calibration").

The dense model runs on a few batches with eager attention; every layer's attention is averaged
over heads, and for every pair of layers (i < j) we take the Jensen-Shannon divergence between
their attention distributions, per query row over the rows that are real tokens, averaged over
rows and samples (``layer_divergence``; its adjacent pairs are the paper's Fig. 2).

Two greedy, deterministic selections, both stopping at a budget (``ratio``) or when the next
layer's divergence to its anchor exceeds ``threshold``, both optionally capping how many lazy
layers one anchor serves (``max_per_anchor``):

- ``select="pairwise"``: from the dense model's pairwise matrix alone, make lazy the layer whose
  change adds the least divergence between lazy layers and their anchors;
- ``select="anchor"``: measured in the model as it is being made lazy. At every step the model
  runs with the lazy layers chosen so far, and a candidate costs the divergence between its own
  attention and that of the anchor it would use (the nearest preceding non-lazy layer), as that
  anchor attends now, times the number of layers whose attention would switch to it (the
  candidate and the lazy layers it serves). So a lazy layer is compared with its real anchor, not
  its neighbour, and the profile is re-measured as the set grows;
- ``select="blocks"`` (the paper's rule, as its summary describes it): the divergence of adjacent
  layers on the **last row** only (the last prompt token's attention), and every layer whose
  divergence to the layer before it is below a threshold epsilon joins that layer's block (is
  lazy, its anchor the block's first layer). With a budget instead of epsilon, the layers with the
  smallest adjacent last-row divergence are made lazy (ties to the lower index), which is the
  same rule at the epsilon that yields the budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from lazyattn.arch import attention_modules
from lazyattn.lazy import LazyAttention, anchors_of

SELECTIONS = ("pairwise", "anchor", "blocks")


@dataclasses.dataclass
class Calibration:
    lazy_layers: list[int]
    divergence: list[list[float]]  # n x n, symmetric, JS divergence between layers i and j (nats), dense model
    select: str = "pairwise"
    # per chosen lazy layer (in order of choice), its divergence to its anchor when it was chosen:
    # from the dense matrix (pairwise) or measured in the partially lazy model (anchor)
    chosen_js: list[float] = dataclasses.field(default_factory=list)

    @property
    def adjacent(self) -> list[float]:
        """JS divergence of each layer l >= 1 to layer l - 1 (the paper's Fig. 2)."""
        return [self.divergence[l - 1][l] for l in range(1, len(self.divergence))]

    @property
    def anchor_of(self) -> dict[int, int]:
        """The anchor of every chosen lazy layer."""
        return anchors_of(set(self.lazy_layers), len(self.divergence))

    @property
    def anchor_js(self) -> dict[int, float]:
        """The dense model's divergence between every chosen lazy layer and its anchor."""
        return {lazy: self.divergence[anchor][lazy] for lazy, anchor in self.anchor_of.items()}


@contextlib.contextmanager
def _eager(model: nn.Module):
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Row-wise JS divergence of two [..., T] distributions (float64, zeros handled)."""
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), 0.0).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@torch.no_grad()
def layer_divergence(model: nn.Module, batches: Iterable[dict], rows: str = "all") -> torch.Tensor:
    """The n x n JS divergence matrix (nats) averaged over query rows: every real token's row
    (``rows="all"``) or each prompt's last row only (``rows="last"``, the paper's measure)."""
    if rows not in ("all", "last"):
        raise ValueError(f"rows must be all or last, got {rows!r}.")
    n = len(attention_modules(model))
    total = torch.zeros(n, n, dtype=torch.float64)
    counted = 0
    with _eager(model):
        for batch in batches:
            out = model(**batch, output_attentions=True, use_cache=False)
            attn = torch.stack([a.double().mean(1) for a in out.attentions])  # [n, B, T, T]
            valid = batch["attention_mask"].bool().to(attn.device)  # rows of real tokens only
            if rows == "last":  # left-padded prompts: every sample's last position is its last real token
                valid = torch.zeros_like(valid)
                valid[:, -1] = True
            pairs = torch.zeros(n, n, dtype=torch.float64, device=attn.device)  # on the model's device
            for i in range(n):
                for j in range(i + 1, n):
                    pairs[i, j] = _js(attn[i], attn[j])[valid].sum()
            total += (pairs + pairs.T).cpu()  # one copy per batch into the CPU accumulator
            counted += int(valid.sum())
    return total / max(counted, 1)


def _budget(n: int, ratio: float | None, threshold: float | None, max_per_anchor: int | None) -> int:
    if (ratio is None) == (threshold is None):
        raise ValueError("lazy-layer selection takes exactly one of ratio (a budget) or threshold.")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}.")
    if max_per_anchor is not None and (isinstance(max_per_anchor, bool) or not isinstance(max_per_anchor, int)
                                       or max_per_anchor < 1):
        raise ValueError(f"max_per_anchor must be an integer >= 1 (lazy layers one anchor serves) or None, got {max_per_anchor!r}.")
    budget = n - 1 if ratio is None else min(int(round(ratio * n)), n - 1)
    if max_per_anchor is not None:
        most = (n * max_per_anchor) // (max_per_anchor + 1)  # anchor, c lazy, anchor, c lazy, ...
        if ratio is not None and budget > most:
            raise ValueError(
                f"{budget} lazy layers of {n} cannot be placed with at most {max_per_anchor} per anchor "
                f"(at most {most}); lower the ratio or raise max_per_anchor."
            )
        budget = min(budget, most)
    return budget


def _most_lazy(forced: set[int], n: int, cap: int) -> int:
    """The most lazy layers an ``n``-layer model can have with every layer in ``forced`` lazy and
    at most ``cap`` lazy layers per anchor (-1: none), by dynamic programming over run lengths."""
    best = {0: 0}  # length of the current run of lazy layers -> most lazy layers so far
    for layer in range(1, n):
        nxt: dict[int, int] = {}
        for run, count in best.items():
            if run + 1 <= cap:  # this layer lazy
                nxt[run + 1] = max(nxt.get(run + 1, -1), count + 1)
            if layer not in forced:  # this layer an anchor
                nxt[0] = max(nxt.get(0, -1), count)
        best = nxt
        if not best:
            return -1
    return max(best.values())


def _candidates(lazy: set[int], n: int, max_per_anchor: int | None, budget: int) -> list[tuple[int, int, int]]:
    """(candidate, its would-be anchor, how many layers switch attention) for every layer that may
    become lazy next: with no anchor serving more than ``max_per_anchor`` lazy layers, and the
    budget still reachable afterwards (so the greedy never paints itself into a corner)."""
    anchor_of = anchors_of(lazy, n)
    served = {a: sum(1 for x in anchor_of.values() if x == a) for a in range(n)}
    out = []
    for layer in range(1, n):
        if layer in lazy:
            continue
        anchor = anchors_of(lazy | {layer}, n)[layer]
        switching = 1 + served[layer]
        if max_per_anchor is not None and (
            served[anchor] + switching > max_per_anchor or _most_lazy(lazy | {layer}, n, max_per_anchor) < budget
        ):
            continue
        out.append((layer, anchor, switching))
    return out


def select_lazy_layers(
    divergence: torch.Tensor, ratio: float | None = None, threshold: float | None = None,
    max_per_anchor: int | None = None,
) -> list[int]:
    """``select="pairwise"``: greedy on the dense model's pairwise divergence matrix."""
    return _select_pairwise(divergence, ratio, threshold, max_per_anchor)[0]


def _select_pairwise(divergence, ratio, threshold, max_per_anchor):
    n = divergence.shape[0]
    budget = _budget(n, ratio, threshold, max_per_anchor)
    lazy: set[int] = set()
    chosen: list[float] = []

    def cost(lazy_set: set[int]) -> float:
        return sum(float(divergence[a, l]) for l, a in anchors_of(lazy_set, n).items())

    while len(lazy) < budget:
        options = _candidates(lazy, n, max_per_anchor, budget if ratio is not None else 0)
        if not options:
            break
        base = cost(lazy)
        _, layer, anchor = min((cost(lazy | {l}) - base, l, a) for l, a, _ in options)
        js = float(divergence[anchor, layer])
        if threshold is not None and js > threshold:
            break
        lazy.add(layer)
        chosen.append(js)
    return sorted(lazy), chosen


@torch.no_grad()
def _anchor_costs(model, batches, lazy: set[int], options, share: str, scope: str = "all") -> dict[int, float]:
    """Each candidate's JS divergence to its would-be anchor, measured with ``lazy`` installed under
    the reading (``share``, ``scope``) the layers are chosen for: the later layers see the hidden
    states that reading gives, not GLA's."""
    total = {layer: 0.0 for layer, _, _ in options}
    rows = 0
    with _eager(model), LazyAttention(layers=sorted(lazy), share=share, scope=scope).apply(model):
        for batch in batches:
            attn = model(**batch, output_attentions=True, use_cache=False).attentions
            valid = batch["attention_mask"].bool()
            for layer, anchor, _ in options:
                total[layer] += float(_js(attn[layer].double().mean(1), attn[anchor].double().mean(1))[valid].sum())
            rows += int(valid.sum())
    return {layer: value / max(rows, 1) for layer, value in total.items()}


def _select_blocks(last_row: torch.Tensor, ratio, threshold, max_per_anchor):
    """``select="blocks"``: a layer joins the block of the layer before it when their last-row
    divergence is below ``threshold`` (epsilon), or, for a budget, the ``budget`` layers with the
    smallest such divergence."""
    if max_per_anchor is not None:
        raise ValueError("calibration.select=blocks merges every layer below epsilon into its block; it takes no "
                         "max_per_anchor (use select=pairwise or anchor for a cap).")
    n = last_row.shape[0]
    budget = _budget(n, ratio, threshold, None)
    adjacent = {layer: float(last_row[layer - 1, layer]) for layer in range(1, n)}
    if threshold is not None:
        lazy = [layer for layer, js in adjacent.items() if js < threshold]
    else:
        lazy = sorted(sorted(adjacent, key=lambda layer: (adjacent[layer], layer))[:budget])
    return sorted(lazy), [adjacent[layer] for layer in sorted(lazy)]


def _select_anchor(model, batches, n, ratio, threshold, max_per_anchor, share, scope="all"):
    budget = _budget(n, ratio, threshold, max_per_anchor)
    lazy: set[int] = set()
    chosen: list[float] = []
    while len(lazy) < budget:
        options = _candidates(lazy, n, max_per_anchor, budget if ratio is not None else 0)
        if not options:
            break
        js = _anchor_costs(model, batches, lazy, options, share, scope)
        _, layer = min((js[l] * switching, l) for l, _, switching in options)
        if threshold is not None and js[layer] > threshold:
            break
        lazy.add(layer)
        chosen.append(js[layer])
    return sorted(lazy), chosen


def calibrate(
    model: nn.Module, batches: Iterable[dict], ratio: float | None = None, threshold: float | None = None,
    select: str = "pairwise", max_per_anchor: int | None = None, share: str = "qk", scope: str = "all",
) -> Calibration:
    """The dense divergence profile and the lazy layers chosen by ``select`` (module doc);
    ``share`` and ``scope`` are the reading the layers are chosen for (the model is run under it by
    ``anchor``; ``pairwise`` and ``blocks`` read the dense model only)."""
    if select not in SELECTIONS:
        raise ValueError(f"calibration select must be one of {list(SELECTIONS)}, got {select!r}.")
    batches = list(batches)
    if select == "blocks":  # the paper's measure: the last row only; the matrix recorded is that one
        div = layer_divergence(model, batches, rows="last")
        layers, chosen = _select_blocks(div, ratio, threshold, max_per_anchor)
        return Calibration(lazy_layers=layers, divergence=div.tolist(), select=select, chosen_js=chosen)
    div = layer_divergence(model, batches)
    if select == "pairwise":
        layers, chosen = _select_pairwise(div, ratio, threshold, max_per_anchor)
    else:
        layers, chosen = _select_anchor(model, batches, div.shape[0], ratio, threshold, max_per_anchor, share, scope)
    return Calibration(lazy_layers=layers, divergence=div.tolist(), select=select, chosen_js=chosen)


def _how(record: dict) -> str:
    how = {"anchor": "anchor-calibrated", "blocks": "block-calibrated"}.get(record.get("select"), "calibrated")
    if record.get("max_per_anchor"):
        how += f", <={record['max_per_anchor']}/anchor"
    return how


def _sort_how(record: dict) -> str:
    # "calibrated+anchor" sorts right after the default rule's "calibrated", before "uniform"
    select = record.get("select", "pairwise")
    how = "calibrated" if select == "pairwise" else f"calibrated+{select}"
    if record.get("max_per_anchor"):
        how += f", <={record['max_per_anchor']}/anchor"
    return how


class LazyLayersCalibrator:
    """Lazy Attention's ``layers=auto``: the lazy layers ``calibrate`` chooses for the budget ``ratio``
    (or the run's ``threshold``), by the run's ``select`` rule with at most ``max_per_anchor`` lazy
    layers per anchor. The run's calibration settings (``options``): ``threshold``, ``select``,
    ``max_per_anchor``. A calibrated point keeps its budget in its label: "Lazy r=0.5 (calibrated)"."""

    setting = "layers"
    stand_in: list = []
    composable = False
    refusal = ("calibrate a lazy run (+exp=llava_lazy) and pass its layers (result.json method.lazy_layers) "
               "as method.lazy.layers=[...]")

    @staticmethod
    def _options(settings, options) -> tuple:
        threshold, select = options.get("threshold"), str(options.get("select") or "pairwise")
        return threshold, select, options.get("max_per_anchor")

    def key(self, settings, options, n_layers: int) -> dict:
        threshold, select, cap = self._options(settings, options)
        what = {"ratio": settings.get("ratio"), "threshold": threshold}
        if select != "pairwise" or cap is not None:  # the default rule keeps its older keys
            what.update(select=select, max_per_anchor=cap)
        if select == "anchor":  # only the anchor rule runs the model under the reading; pairwise is the same for all
            what.update(share=settings.get("share", "qk"))
            if settings.get("scope", "all") != "all":  # GLA keeps its older key (its cached choices stay valid)
                what.update(scope=settings.get("scope"))
        return what

    def measure(self, model, batches, settings, options) -> dict:
        threshold, select, cap = self._options(settings, options)
        share, scope = settings.get("share", "qk"), settings.get("scope", "all")
        result = calibrate(model, batches, ratio=None if threshold is not None else settings.get("ratio"),
                           threshold=threshold, select=select, max_per_anchor=cap, share=share, scope=scope)
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

    def choose(self, record, settings, options, n_layers: int) -> tuple[list[int], dict]:
        kept = {**record, "ratio": settings.get("ratio"), "threshold": options.get("threshold")}
        return list(record["lazy_layers"]), kept

    def label(self, record, method, n_layers: int) -> str:
        reading = method.plan(n_layers).reading
        if record.get("threshold") is not None:
            return f"Lazy{reading} JS<={record['threshold']:g} ({_how(record)})"
        return f"Lazy{reading} r={record['ratio']:g} ({_how(record)})"

    def sort_key(self, record, method, n_layers: int) -> list:
        plan = method.plan(n_layers)
        if plan.reading or record.get("max_per_anchor"):
            return ["variant", plan.share, plan.scope, _sort_how(record), record.get("ratio") or 0]
        return [_sort_how(record), record.get("ratio") or 0]

    def series(self, record, plan) -> str:
        """e.g. "lazy (calibrated)", "lazy qkv (calibrated+anchor)"."""
        reading = "".join(f" {x}" for x in (plan.share, plan.scope) if x not in ("qk", "all"))
        return f"lazy{reading} ({_sort_how(record)})"
