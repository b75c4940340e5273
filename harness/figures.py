"""Figures rendered from result data (never from a live model), so they rebuild anywhere."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on these machines
import matplotlib.pyplot as plt  # noqa: E402


def layer_divergence_png(adjacent_js: Sequence[float], lazy_layers: Sequence[int], path: Path, title: str,
                         anchor_js: dict[int, float] | None = None) -> Path:
    """JS divergence of each layer's attention to the previous layer's (cf. the paper's Fig. 2);
    the layers made lazy are marked, and (``anchor_js``) each lazy layer's divergence to its anchor."""
    layers = list(range(1, len(adjacent_js) + 1))
    lazy = set(lazy_layers)
    colours = ["tab:orange" if l in lazy else "tab:blue" for l in layers]
    fig, ax = plt.subplots(figsize=(6, 3), dpi=120)
    ax.bar(layers, adjacent_js, color=colours)
    if anchor_js:
        ax.scatter(list(anchor_js), list(anchor_js.values()), color="black", marker="_", s=160, zorder=3,
                   label="JS(attn[anchor], attn[l])")
        ax.legend(fontsize=7)
    ax.set_xlabel("layer l (orange: lazy)")
    ax.set_ylabel("JS(attn[l-1], attn[l]) / nats")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(layers)
    return _save(fig, path)


def pareto_png(points: dict[str, list[tuple[float, float, str]]], path: Path, title: str,
               xlabel: str = "KV cache reduction (%)", ylabel: str = "accuracy (%)") -> Path:
    """Accuracy against KV cache reduction, one marker series per method (each point a setting);
    the axis labels name the headline keys plotted (harness.headline)."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    markers = "os^Dvx*P"
    for i, (name, pts) in enumerate(sorted(points.items())):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], label=name,
                linestyle="-" if len(pts) > 1 else "none")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def agreement_png(curves: dict[str, list[float | None]], path: Path, title: str) -> Path:
    """One line per method: fraction of samples agreeing with dense on the first t tokens, against t."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, curve in curves.items():
        xs = [t + 1 for t, v in enumerate(curve) if v is not None]
        ax.plot(xs, [100 * v for v in curve if v is not None], label=name, linewidth=1.2)
    ax.set_xlabel("generated tokens t")
    ax.set_ylabel("% of samples equal to dense on the first t")
    ax.set_ylim(0, 102)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
