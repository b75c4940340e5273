"""The GPU check's report: its tables (throughput, fixed budget, correctness), the README of a
results folder, and the one summary table the command prints."""

from __future__ import annotations

from pathlib import Path

def _x(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def bench_table(benches: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["Method", "B", "Prompt", "New", "Decode tok/s", "Decode ×", "E2E tok/s", "E2E ×", "Prefill ×",
              "KV ×", "Mem GB", "BW util", "Predicted ×"]
    rows = []
    for result in benches:
        for r in result["rows"]:
            x, pred = r["ratios"], r.get("predicted_decode_speedup")
            mem = r.get("peak_memory_bytes")
            bw = r.get("bandwidth_utilisation")
            rows.append([
                r["label"], str(r["batch_size"]), str(r["prompt_tokens"]), str(r["new_tokens"]),
                f"{r['decode_tokens_per_s']:.0f} ± {r.get('decode_tokens_per_s_iqr') or 0:.0f}", _x(x["decode_speedup"]),
                f"{r['e2e_tokens_per_s']:.0f} ± {r.get('e2e_tokens_per_s_iqr') or 0:.0f}", _x(x["e2e_speedup"]),
                _x(x["prefill_speedup"]), f"{x['kv_fraction']:.3f}", "–" if mem is None else f"{mem / 2**30:.1f}",
                "–" if bw is None else f"{100 * bw:.0f} %",
                _x(pred),
            ])
    return header, rows


def budget_table(benches: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["Budget", "Method", "Max B", "Batch ×", "Decode tok/s", "Decode ×", "E2E tok/s", "E2E ×", "Mem GB"]
    rows = []
    for result in benches:
        b = result.get("budget") or {}
        if not b.get("complete"):
            continue
        what = f"{b.get('kind', 'kv')} {b['bytes'] / 2**30:.1f} GB, prompt {b['prompt_tokens']} + {b['new_tokens']}"
        for e in b["entries"]:
            mem = e.get("peak_memory_bytes")
            rows.append([what, e["label"], str(e["max_batch"]), _x(e["batch_ratio"]),
                         f"{e['decode_tokens_per_s']:.0f}", _x(e.get("decode_speedup")),
                         f"{e.get('e2e_tokens_per_s') or 0:.0f}", _x(e.get("e2e_speedup")),
                         "–" if mem is None else f"{mem / 2**30:.1f}"])
    return header, rows


def correctness_table(matrix: dict) -> tuple[list[str], list[list[str]]]:
    impls = [i for i in matrix["impls"] if i != "sdpa"]
    header = ["Family", "Method", "dtype", "Padded", *[f"{i} vs sdpa" for i in impls], "KV formula", "OK"]
    rows = []
    for c in matrix["cells"]:
        errs = c.get("errors", {})
        rows.append([c["family"], c["method"], c["dtype"], "yes" if c["padded"] else "no",
                     *[f"{errs[i]:.1e}" if i in errs else "error" if i in c.get("impl_errors", {})
                       else "n/a" if i in c.get("not_applicable", {}) else "–"
                       for i in impls],
                     "ok" if c.get("kv_ok") else c.get("kv", c.get("error", "–")), "ok" if c["ok"] else "FAIL"])
    return header, rows


def write_readme(out: Path, matrix: dict, benches: list[dict]) -> Path:
    from harness.report import markdown

    device = benches[0]["device"]["name"] if benches else matrix["device"]
    parts = [
        f"# GPU check on {device}",
        "",
        "<!-- rendered by `python -m harness.gpu_check`; do not edit -->",
        "Speed-ups (×) are the method over dense, higher is better; KV × is method / dense bytes; "
        "± is the IQR over repeats (ABBA order). Predicted ×: the decode speed-up the bytes per step "
        "allow (decoder weights touched plus the KV each layer read, dense over the method). BW util: bytes a decode step reads over its time, against the "
        "device's peak bandwidth.",
        "",
        "## Throughput (model=llava15_7b_random, float16, random weights)",
        "",
        markdown(*bench_table(benches)),
        "## Fixed budget",
        "",
        markdown(*budget_table(benches)),
        f"## Correctness ({matrix['passed']} / {matrix['total']} cells pass; tolerance {matrix['tolerance']})",
        "",
        markdown(*correctness_table(matrix)),
    ]
    path = out / "README.md"
    path.write_text("\n".join(parts))
    return path


def summary(matrix: dict, benches: list[dict]) -> str:
    header, rows = bench_table(benches)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = [f"correctness: {matrix['passed']} / {matrix['total']} cells pass (impls {matrix['impls']}, "
             f"dtypes {matrix['dtypes']})"]
    lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
