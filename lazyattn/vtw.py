"""VTW, visual tokens withdrawal (AAAI 2025): from layer ``k`` on, every image token is withdrawn.

Layers ``0 .. k-1`` see every token; layers ``k ..`` carry and cache the text tokens only (the
generated tokens included), at their original positions. This is FastV at ratio 1, with no
ranking to do, so it runs on the pruning engine (``lazyattn.engine``): one stage whose kept
tokens are the non-image ones. It needs no attention matrix and keeps every layer on the
model's attention backend (flash attention included) and the standard KV cache.

VTW chooses ``k`` on a few samples from the KL divergence between the withdrawn and the dense
model's next-token distributions (``withdrawal_kl``, ``choose_withdrawal_layer``; the harness's
``method.k=auto``). ``rule="release"`` (the default) is the released code's rule:
``KL(withdrawn || dense)``, searched from layer 5 (scaled by depth for models that are not 32 or
40 layers deep, ``search_start``), ``k`` = the first layer whose mean KL is ``<= eta``.
``rule="suffix"`` is the harness's earlier rule of its own: ``KL(dense || withdrawn)`` from layer 1,
``k`` = the earliest layer from which every later one is within ``eta``. ``k = n_layers``
withdraws nothing: the dense model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lazyattn.arch import decoder_layers
from lazyattn.engine import Stage, TokenPruner


RULES = ("release", "suffix")
RELEASE_START = 5  # the released search starts withdrawing at layer 5 (lzhxmu/VTW, for its 32- and 40-layer models)
RELEASE_DEPTHS = (32, 40)  # LLaVA-1.5-7B / LLaVA-NeXT-7B and LLaVA-1.5-13B: the depths the release ran
DEFAULT_ETA = 0.003  # the release's eta for any model it has no entry for (and for LLaVA-1.5-7B)


def search_start(n_layers: int, rule: str = "release") -> int:
    """The first withdrawal layer the search tries: the release's 5 on 32- and 40-layer models,
    ``max(1, round(5 * n_layers / 32))`` on other depths (the released search has no rule for them;
    scaling keeps the same fraction of the model seeing the image); 1 for ``rule="suffix"``."""
    if rule == "suffix":
        return 1
    if n_layers in RELEASE_DEPTHS:
        return RELEASE_START
    return max(1, min(n_layers - 1, round(RELEASE_START * n_layers / 32)))


def _check_rule(rule: Any, eta: Any) -> None:
    if rule not in RULES:
        raise ValueError(f"VTW rule must be 'release' (KL(withdrawn||dense), first layer <= eta from layer 5) or "
                         f"'suffix' (the harness's earlier KL(dense||withdrawn) suffix rule from layer 1), got {rule!r}.")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
        raise ValueError(f"VTW eta (the KL threshold, nats) must be a number >= 0, got {eta!r}; e.g. method.eta=0.003.")


@dataclasses.dataclass
class VTW(TokenPruner):
    """Withdraw every image token from layer ``k`` on (``k = n_layers``: nothing withdrawn).

    ``rule`` and ``eta`` say how the harness chooses ``k`` when asked for ``k=auto`` (recorded with
    the run; an explicit ``k`` does not use them)."""

    k: int = 16
    rule: str = "release"
    eta: float = DEFAULT_ETA
    name = "vtw"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(
                f"VTW k must be an integer >= 1 (layers 0..k-1 see the image tokens), got {self.k!r}; "
                "the harness also takes method.k=auto (chosen on the val split by KL to dense)."
            )
        _check_rule(self.rule, self.eta)

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "rule": self.rule, "eta": self.eta}

    def label(self, n_layers: int) -> str:
        return f"VTW K={self.k}"

    def sort_key(self, n_layers: int) -> tuple:
        return (-self.k,)  # later withdrawal, closer to dense: first

    def schedule(self, n_layers: int) -> str:
        return f"VTW: image tokens withdrawn from layer {self.k} on"

    def stage_layers(self, n_layers: int) -> list[tuple[int, int]]:
        if self.k > n_layers:
            raise ValueError(
                f"VTW k={self.k} is out of range: this model has {n_layers} decoder layers "
                f"(1 <= k <= {n_layers}; k = {n_layers} withdraws nothing)."
            )
        return [] if self.k == n_layers else [(self.k - 1, self.k)]

    def score_tokens(self, engine, state, stage_idx, module, query, key, stage: Stage) -> torch.Tensor:
        return torch.zeros(stage.real.shape, device=query.device)  # nothing is ranked

    def select(self, engine, state, stage_idx, scores, prev: Stage, hidden):
        kept = ~prev.image
        return kept.nonzero()[:, 1].view(kept.shape[0], -1), None


def _next_token_log_probs(model: nn.Module, batch: dict) -> torch.Tensor:
    """Log-probabilities of the token after each prompt (B, vocab), float64."""
    logits = model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1]
    return torch.log_softmax(logits.double(), dim=-1)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = sum_v p (log p - log q)`` per row (B,), from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


@torch.no_grad()
def withdrawal_kl(model: nn.Module, batches: Iterable[dict], rule: str = "release") -> list[float | None]:
    """The mean over the prompts of the KL divergence between the next-token distributions of the
    dense model and of VTW(k), for every ``k = 1 .. n_layers`` (entry ``k - 1``; the last is 0:
    nothing withdrawn). ``rule="release"``: ``KL(withdrawn || dense)`` (the released code's
    ``KLDivLoss(log_softmax(dense), softmax(withdrawn))``), for ``k >= search_start(n_layers)`` only
    (``None`` below it: not searched); ``rule="suffix"``: ``KL(dense || withdrawn)`` for every ``k``."""
    _check_rule(rule, 0)
    n_layers = len(decoder_layers(model))
    start = search_start(n_layers, rule)
    total = torch.zeros(n_layers, dtype=torch.float64)
    count = 0
    for batch in batches:
        dense = _next_token_log_probs(model, batch)
        for k in range(start, n_layers):
            with VTW(k=k).apply(model):
                withdrawn = _next_token_log_probs(model, batch)
            kl = kl_divergence(withdrawn, dense) if rule == "release" else kl_divergence(dense, withdrawn)
            total[k - 1] += kl.sum().item()  # a CUDA scalar into a CPU sum
        count += dense.shape[0]
    mean = (total / max(count, 1)).tolist()
    return [None if k < start else mean[k - 1] for k in range(1, n_layers + 1)]


def choose_withdrawal_layer(kl: list[float | None], eta: float, rule: str = "release") -> int:
    """``k`` from ``withdrawal_kl``'s profile (entry ``k - 1`` for ``k = 1 .. n_layers``).

    ``release``: the first searched ``k`` (entries that are not None) whose mean KL is ``<= eta``;
    when none is, ``n_layers`` (nothing withdrawn; the released code stops with an error there).
    ``suffix``: the earliest ``k`` from which every later layer is within ``eta`` too (so
    withdrawing later never costs more than the chosen ``k``)."""
    _check_rule(rule, eta)
    if rule == "release":
        return next((k for k, v in enumerate(kl, start=1) if v is not None and v <= eta), len(kl))
    k = len(kl)
    while k > 1 and kl[k - 2] is not None and kl[k - 2] <= eta:
        k -= 1
    return k


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


class WithdrawalCalibrator:
    """VTW's ``k=auto`` (also inside ``lazy_vtw``): the withdrawal layer by the method's own ``rule``
    and ``eta`` from ``withdrawal_kl``'s profile (``choose_withdrawal_layer``). It reads no run-level
    calibration setting. A calibrated point keeps its method's series and sorts by its chosen k."""

    setting = "k"
    stand_in = 1
    composable = True
    refusal = ""

    def key(self, settings, options, n_layers: int) -> dict:
        rule = settings.get("rule", "release")
        # the profile depends on the rule (direction and start), not on eta; the suffix rule keeps its older key
        return {"vtw_kl": True} if rule == "suffix" else {"vtw_kl": "withdrawn||dense",
                                                           "start": search_start(n_layers, rule)}

    def measure(self, model, batches, settings, options) -> dict:
        return {"kl": withdrawal_kl(model, batches, rule=settings.get("rule", "release"))}

    def choose(self, record, settings, options, n_layers: int) -> tuple[int, dict]:
        rule, eta = settings.get("rule", "release"), settings.get("eta", DEFAULT_ETA)
        start = search_start(n_layers, rule)
        k = choose_withdrawal_layer(record["kl"], eta, rule)
        kept = {**record, "k": k, "rule": rule, "eta": eta, "start": start,
                "start_scaled": rule == "release" and start != RELEASE_START,
                "direction": "KL(withdrawn||dense)" if rule == "release" else "KL(dense||withdrawn)"}
        return int(k), kept

    def label(self, record, method, n_layers: int) -> str:
        return f"VTW K={record['k']} ({vtw_how(record)})"

    def sort_key(self, record, method, n_layers: int) -> list:
        return list(method.sort_key(n_layers))  # its chosen k orders it among explicit ones

    def series(self, record, plan) -> str:
        return plan.series
