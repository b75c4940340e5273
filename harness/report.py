"""Paper tables and figures, rendered from result.json files only (they rebuild without a model).

    python -m harness.report main       --results results/tiny --out results   # accuracy table
    python -m harness.report efficiency --results results/tiny --out results   # KV / latency table
    python -m harness.report layers     --results results/tiny --out results   # layer divergence figure
    python -m harness.report pareto     --results results/tiny --out results   # accuracy vs KV reduction
    python -m harness.report all        --results results/tiny --out results

Tables are written as Markdown and LaTeX to ``out/tables``, figures as PNG to ``out/figures``.
Rows are ordered as the methods are registered (``lazyattn.METHODS``: dense, Lazy Attention,
FastV, SparseVLM, combinations), each by its own setting; every label comes from the run that
made the result. A point measured twice (same label) keeps the newest result.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from harness import figures
from lazyattn import METHODS



def collect(results_dir: str | Path) -> list[dict]:
    """Every finished result under ``results_dir`` (recursively), with its path."""
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} does not exist: run the sweeps first (make sweeps, or make tables RUN=1) or pass --results DIR."
        )
    out = []
    for path in sorted(root.rglob("result.json")):
        result = json.loads(path.read_text())
        result["_path"] = str(path)
        out.append(result)
    if not out:
        raise FileNotFoundError(f"no result.json under {root}: run the sweeps first (make sweeps).")
    return out


def label(result: dict) -> str:
    """The row label a run gave its method (``method.label`` in result.json)."""
    return result["method"]["label"]


def _sort_key(result: dict):
    """Registry order of the method (dense, lazy, fastv, sparsevlm, compositions), then the
    method's own setting order (``method.sort_key``), then the label."""
    name = result["method"]["name"]
    rank = list(METHODS).index(name) if name in METHODS else len(METHODS)
    return (rank, result["method"]["sort_key"], label(result))


def _unique(results: Sequence[dict]) -> list[dict]:
    newest: dict[tuple, dict] = {}
    for r in results:
        key = (r["model"]["name"], label(r))
        if key not in newest or r["env"].get("time", "") >= newest[key]["env"].get("time", ""):
            newest[key] = r
    return sorted(newest.values(), key=_sort_key)


def _task_columns(results: Sequence[dict], task: str) -> list[str]:
    cols: list[str] = []
    for r in results:
        for key, value in r["tasks"].get(task, {}).items():
            if isinstance(value, dict) and key not in cols:
                cols.append(key)
    return cols


def _metric(scores: dict) -> float:
    return scores["f1"] if "f1" in scores else scores["acc"]


def _dense_of(results: Sequence[dict]) -> dict | None:
    return next((r for r in results if r["method"]["name"] == "dense"), None)


def main_table(results: Sequence[dict], task: str = "shapes") -> tuple[list[str], list[list[str]]]:
    """Accuracy (%) per question type (describe: object F1), the mean, its change against dense,
    and the KV reduction measured in the same run."""
    results = _unique([r for r in results if task in r["tasks"]])
    cols = _task_columns(results, task)
    dense = _dense_of(results)
    header = ["Method", *[c + (" F1" if c == "describe" else "") for c in cols], "Avg", "Δ Avg", "KV cut"]
    rows = []
    for r in results:
        scores = r["tasks"][task]
        values = [100 * _metric(scores[c]) if c in scores else None for c in cols]
        present = [v for v in values if v is not None]
        avg = sum(present) / len(present) if present else float("nan")
        delta = ""
        if dense is not None and r is not dense:
            d_scores = dense["tasks"][task]
            d_avg = sum(100 * _metric(d_scores[c]) for c in cols if c in d_scores) / max(1, sum(c in d_scores for c in cols))
            delta = f"{avg - d_avg:+.1f}"
        eff = r.get("efficiency") or {}
        if r["method"]["name"] == "dense":
            kv = "0 %"
        else:
            kv = f"{100 * eff['kv_reduction']:.1f} %" if eff else "–"
        rows.append([label(r), *["–" if v is None else f"{v:.1f}" for v in values], f"{avg:.1f}", delta, kv])
    return header, rows


def efficiency_table(results: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """KV MB, device memory, prefill ms, decode and end-to-end tokens/s of each method, and its
    speed-ups over dense measured in the same run (method over dense, higher is better). Results
    written before end-to-end throughput and device memory were measured show "–" there."""
    header = ["Method", "KV MB", "KV cut", "Mem GB", "Prefill ms", "Decode tok/s", "E2E tok/s",
              "Decode ×", "E2E ×", "Prefill ×", "Device"]
    rows = []
    for r in _unique([r for r in results if r.get("efficiency")]):
        eff = r["efficiency"]
        m = eff["method"]
        mem = m.get("peak_memory_bytes")
        e2e, e2e_x = m.get("e2e_tokens_per_s"), eff.get("e2e_speedup")
        rows.append([
            label(r),
            f"{m['kv_cache_bytes'] / 2**20:.3f}",
            f"{100 * eff['kv_reduction']:.1f} %",
            "–" if mem is None else f"{mem / 2**30:.2f}",
            f"{m['prefill_ms']:.1f}",
            f"{m['decode_tokens_per_s']:.0f}",
            "–" if e2e is None else f"{e2e:.0f}",
            f"{eff['decode_speedup']:.2f}",
            "–" if e2e_x is None else f"{e2e_x:.2f}",
            f"{eff['prefill_speedup']:.2f}",
            f"{eff['device']} b={eff['batch_size']} L={eff['prompt_tokens']}",
        ])
    return header, rows


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def latex(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(text: str) -> str:
        return text.replace("%", r"\%").replace("_", r"\_").replace("Δ", r"$\Delta$").replace("×", r"$\times$")

    lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule", " & ".join(map(esc, header)) + r" \\", r"\midrule"]
    lines += [" & ".join(map(esc, row)) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_table(name: str, header, rows, out: Path, source: str) -> list[Path]:
    folder = out / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    md, tex = folder / f"{name}.md", folder / f"{name}.tex"
    md.write_text(f"<!-- rendered by `python -m harness.report` from {source}; do not edit -->\n" + markdown(header, rows))
    tex.write_text(f"% rendered by `python -m harness.report` from {source}\n" + latex(header, rows))
    return [md, tex]


def layers_figure(results: Sequence[dict], out: Path) -> Path:
    calibrated = [r for r in results if (r["method"].get("calibration") or {}).get("adjacent_js")]
    if not calibrated:
        raise ValueError("no calibrated result (method.layers=auto) found: run +exp=sweep_lazy or +exp=llava_lazy first.")
    r = min(calibrated, key=lambda r: r["method"]["params"].get("ratio") or 0)
    cal = r["method"]["calibration"]
    lazy = r["method"]["lazy_layers"]
    return figures.layer_divergence_png(
        cal["adjacent_js"], lazy, out / "figures" / "layer_divergence.png",
        f"{r['model']['name']}: adjacent-layer JS divergence (lazy at r={r['method']['params'].get('ratio')})",
    )


def pareto_figure(results: Sequence[dict], out: Path, task: str = "shapes") -> Path:
    points: dict[str, list[tuple[float, float, str]]] = {}
    for r in _unique([r for r in results if task in r["tasks"] and r.get("efficiency")]):
        name, order = r["method"]["name"], r["method"]["sort_key"]
        if order and isinstance(order[0], str):  # a method's own family of settings, e.g. lazy (calibrated)
            name = f"{name} ({order[0]})"
        kv = 0.0 if r["method"]["name"] == "dense" else 100 * r["efficiency"]["kv_reduction"]
        points.setdefault(name, []).append((kv, 100 * r["tasks"][task]["acc"], label(r)))
    return figures.pareto_png(points, out / "figures" / "pareto.png", f"{task}: accuracy vs KV cache reduction")


def render(what: str, results_dir: Path, out: Path) -> list[Path]:
    results = collect(results_dir)
    written: list[Path] = []
    if what in ("main", "all"):
        written += write_table("main", *main_table(results), out, str(results_dir))
    if what in ("efficiency", "all"):
        written += write_table("efficiency", *efficiency_table(results), out, str(results_dir))
    if what in ("layers", "all"):
        written.append(layers_figure(results, out))
    if what in ("pareto", "all"):
        written.append(pareto_figure(results, out))
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Render paper tables and figures from result.json files.")
    p.add_argument("what", choices=["main", "efficiency", "layers", "pareto", "all"])
    p.add_argument("--results", type=Path, default=Path("results/tiny"))
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--wandb", default=os.environ.get("WANDB_MODE", "disabled"),
                   help="log the figures and tables to W&B: offline | online | disabled (default: $WANDB_MODE or disabled)")
    p.add_argument("--wandb-project", default="lazyattn-harness")
    a = p.parse_args(argv)
    try:
        written = render(a.what, a.results, a.out)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    for path in written:
        print(path)
    if a.wandb != "disabled":
        from harness import tracking

        results = collect(a.results)
        tables = {"main": main_table(results), "efficiency": efficiency_table(results)}
        tracking.log_report(written, tables, {"mode": a.wandb, "project": a.wandb_project, "group": "report",
                                              "dir": str(a.out)})


if __name__ == "__main__":
    main()
