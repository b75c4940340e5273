"""Long answers and long dialogues: where the paper says token pruning breaks and Lazy Attention does not.

The paper's case against token pruning is that it breaks the KV cache's integrity, so a pruned
model loses more as the answer grows and as a conversation goes on. This module measures that on
the carried-cache points of the main table (``report.main_points``), sample by sample against dense
on the same samples:

- ``dialogue``: the accuracy of turn t (every turn is a short question; turn t counts on the samples
  that have at least t turns), for t = 1 .. 6, and its paired change against dense;
- ``long``: the fact-F1 of the long description by the scene's object count (the gold answer is 38,
  71, 104 or 137 words for 1-4 objects), and its paired change against dense;
- the workload KV cut on each of the two question types alone (the generated tokens are most of
  the cache there, and pruning never touches them).

``numbers`` returns the numbers, ``table`` renders them, ``figure`` draws them:

    python -m harness.report longform --results results/tiny --out results
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from harness import compare
from harness.tasks import shapes

MAX_TURNS = 6
OBJECTS = tuple(range(1, shapes.MAX_OBJECTS + 1))


def turn_scores(row: dict) -> list[float]:
    """1/0 per turn of a dialogue row: its answer equals the gold one (every turn is a short question)."""
    return [shapes.score_turn("count", pred, gold)["acc"] for pred, gold in zip(row["turns"], row["answers"])]


def objects_of(row: dict) -> int:
    """The object count of a long row's scene: the number its gold description states."""
    return next(int(v) for _, kind, v in shapes.long_facts(row["answers"][-1]) if kind == "count")


def _summary(method: Sequence[float], dense: Sequence[float]) -> dict:
    return {"n": len(method), "score": sum(method) / len(method) if method else None,
            "ci95": compare.interval(list(method)) if method else None,
            "dense": sum(dense) / len(dense) if dense else None, **compare.paired_delta(method, dense)}


def numbers(result_rows: Sequence[dict], dense_rows: Sequence[dict]) -> dict:
    """The long-answer and dialogue numbers of one point against dense on the same samples."""
    pairs = compare.paired(result_rows, dense_rows)
    out: dict = {"turns": {}, "objects": {}, "kv_cut": {}}
    for qtype in ("dialogue", "long"):
        sub = [(m, d) for m, d in pairs if m.get("qtype") == qtype]
        kv = compare.kv_workload([m for m, _ in sub], [d for _, d in sub]) if sub else None
        out["kv_cut"][qtype] = (kv or {}).get("reduction")
        metric = "acc" if qtype == "dialogue" else "f1"
        out[qtype] = _summary([m[metric] for m, _ in sub], [d[metric] for _, d in sub])
    dialogues = [(turn_scores(m), turn_scores(d)) for m, d in pairs if m.get("qtype") == "dialogue"]
    for t in range(MAX_TURNS):
        at = [(m[t], d[t]) for m, d in dialogues if len(m) > t and len(d) > t]
        if at:
            out["turns"][t + 1] = _summary([m for m, _ in at], [d for _, d in at])
    longs = [(objects_of(d), m["f1"], d["f1"]) for m, d in pairs if m.get("qtype") == "long"]
    for k in OBJECTS:
        at = [(m, d) for n, m, d in longs if n == k]
        if at:
            out["objects"][k] = _summary([m for m, _ in at], [d for _, d in at])
    out["growth"] = {"turns": turn_growth(dialogues), "objects": length_growth(longs)}
    return out


def turn_growth(dialogues: Sequence[tuple[list[float], list[float]]], early: int = 2, late: int = 4) -> dict:
    """Whether the loss against dense grows along a dialogue: per sample, the mean change (method minus
    dense) over turns ``late``.. minus that over turns 1..``early``, averaged, with a bootstrap 95 %
    interval over samples (paired: both ends come from the same conversations). Negative: the
    method loses more in later turns."""
    diffs = []
    for m, d in dialogues:
        n = min(len(m), len(d))
        if n < late:
            continue
        first = sum(m[t] - d[t] for t in range(early)) / early
        last = sum(m[t] - d[t] for t in range(late - 1, n)) / (n - late + 1)
        diffs.append(last - first)
    return _mean_ci(diffs)


def length_growth(longs: Sequence[tuple[int, float, float]], short: tuple[int, ...] = (1, 2),
                  long: tuple[int, ...] = (3, 4), seed: int = 0) -> dict:
    """Whether the loss against dense grows with the answer's length: the mean change in fact-F1
    (method minus dense) on the scenes of ``long`` object counts minus that on ``short`` ones, with a
    bootstrap 95 % interval (the two groups resampled independently: they are different samples).
    Negative: the method loses more on longer answers."""
    import numpy as np

    a = np.asarray([m - d for n, m, d in longs if n in long], dtype=float)
    b = np.asarray([m - d for n, m, d in longs if n in short], dtype=float)
    if not len(a) or not len(b):
        return {"delta": None, "delta_ci95": None, "n": 0}
    rng = np.random.default_rng(seed)
    draws = (a[rng.integers(0, len(a), (compare.BOOTSTRAP_RESAMPLES, len(a)))].mean(1)
             - b[rng.integers(0, len(b), (compare.BOOTSTRAP_RESAMPLES, len(b)))].mean(1))
    return {"delta": float(a.mean() - b.mean()), "delta_ci95": [float(np.percentile(draws, 2.5)),
                                                                 float(np.percentile(draws, 97.5))],
            "n": int(len(a) + len(b))}


def _mean_ci(values: Sequence[float]) -> dict:
    if not values:
        return {"delta": None, "delta_ci95": None, "n": 0}
    return {"delta": sum(values) / len(values), "delta_ci95": compare.bootstrap(values), "n": len(values)}


def _pm(d: dict | None) -> str:
    if not d or d.get("delta") is None:
        return "–"
    lo, hi = d["delta_ci95"]
    star = "*" if lo > 0 or hi < 0 else ""
    return f"{100 * d['delta']:+.0f} ± {100 * (hi - lo) / 2:.0f}{star}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def table(points: Sequence[tuple[str, str, dict]]) -> tuple[list[str], list[list[str]]]:
    """One row per (label, model, numbers): dense's score, then the method's paired change against dense
    (``Δ ± half-width``, * when the 95 % interval excludes 0) on dialogue by turn and on long by object
    count, with the workload KV cut on each type, and whether the change grows (``turn_growth``,
    ``length_growth``: negative when the method loses more later or on longer answers)."""
    header = ["Method", "Model", "KV cut dialogue", "dialogue (last turn)",
              *[f"turn {t}" for t in range(1, MAX_TURNS + 1)], "growth: turns 4+ vs 1-2", "KV cut long", "long F1",
              *[f"long F1, {k} obj" for k in OBJECTS], "growth: 3-4 vs 1-2 obj"]
    rows = []
    for label, model, num in points:
        dense = label.startswith("Dense")
        cell = (lambda d: _pct(d.get("score")) if d else "–") if dense else _pm
        rows.append([label, model, _pct(num["kv_cut"].get("dialogue")), cell(num.get("dialogue")),
                     *[cell(num["turns"].get(t)) for t in range(1, MAX_TURNS + 1)],
                     "–" if dense else _pm(num["growth"]["turns"]),
                     _pct(num["kv_cut"].get("long")), cell(num.get("long")),
                     *[cell(num["objects"].get(k)) for k in OBJECTS],
                     "–" if dense else _pm(num["growth"]["objects"])])
    return header, rows


def figure(points: Sequence[tuple[str, str, dict]], path: Path, title: str) -> Path:
    """Two panels, one line per point: dialogue accuracy by turn index, long fact-F1 by object count
    (the answer's length), each with its 95 % interval as a band."""
    from harness.figures import _save, plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for label, _, num in points:
        for ax, key, xs in ((axes[0], "turns", range(1, MAX_TURNS + 1)), (axes[1], "objects", OBJECTS)):
            got = [(x, num[key][x]) for x in xs if x in num[key] and num[key][x]["score"] is not None]
            if not got:
                continue
            line, = ax.plot([x for x, _ in got], [100 * s["score"] for _, s in got], marker="o", label=label,
                            linewidth=1.2)
            ax.fill_between([x for x, _ in got], [100 * s["ci95"][0] for _, s in got],
                            [100 * s["ci95"][1] for _, s in got], color=line.get_color(), alpha=0.08)
    axes[0].set_xlabel("dialogue turn index (carried cache)")
    axes[0].set_ylabel("accuracy of that turn (%)")
    axes[1].set_xlabel("objects in the scene (gold answer: 38 / 71 / 104 / 137 words)")
    axes[1].set_ylabel("long description fact-F1 (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 102)
    axes[1].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)
