"""The benchmark's console table, from bench.json's numbers."""

from __future__ import annotations


def _mb(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def terms_line(terms: dict) -> str:
    """A decode step's bytes by term, in MB: ``W 12.3 + K 4.5 + V 4.5 + S 0.1 = 21.4 MB``."""
    parts = [(name[0].upper(), terms.get(name) or 0) for name in ("weights", "keys", "values", "scores")]
    total = sum(n for _, n in parts)
    return " + ".join(f"{tag} {n / 2**20:.2f}" for tag, n in parts) + f" = {total / 2**20:.2f} MB"


def _x(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def _compiled_against_eager(rows: list[dict]) -> list[str]:
    """Where a point was timed eager and compiled (``compile=both``): each variant's decode tok/s
    both ways (dense's from the same rows), compiled over eager, and whether the difference is
    beyond the noise the bench reports (the two medians' IQRs added)."""
    eager = {(r["label"], r["batch_size"], r["context_length"]): r for r in rows if not r.get("compiled")}
    pairs = [(eager[k], r) for r in rows if r.get("compiled")
             for k in [(r["label"], r["batch_size"], r["context_length"])] if k in eager]
    if not pairs:
        return []
    lines = ["", "compiled (one static graph a decode step) vs eager decode, same points; x = compiled over eager, "
             "noise = the two medians' IQRs added",
             f"{'variant':<24}{'B':>4}{'prompt':>7}{'eager tok/s':>16}{'compiled tok/s':>18}{'x':>7}  verdict"]
    for e, c in pairs:
        for who, fe, fc in ((e["label"], e, c), ("  its dense", e["dense"], c["dense"])):
            a, b = fe["decode_tokens_per_s"], fc["decode_tokens_per_s"]
            noise = (fe.get("decode_tokens_per_s_iqr") or 0) + (fc.get("decode_tokens_per_s_iqr") or 0)
            verdict = ("within noise" if abs(b - a) <= noise else "compiled faster" if b > a
                       else "compiled SLOWER beyond noise")
            lines.append(f"{who:<24}{e['batch_size']:>4}{e['prompt_tokens']:>7}"
                         f"{_pm(a, fe.get('decode_tokens_per_s_iqr')):>16}{_pm(b, fc.get('decode_tokens_per_s_iqr')):>18}"
                         f"{b / a:>7.3f}  {verdict}")
            if fc.get("graph_note"):
                lines.append(f"{'':<24}{fc['graph_note']}")
    return lines


def _pm(value: float, iqr) -> str:
    return f"{value:.1f}±{iqr or 0:.1f}"


def format_table(result: dict) -> str:
    """The rows and the budget as text. Every "x" is a speed-up of the method over dense (higher
    is better), except KV (method / dense bytes); "±" is the IQR over repeats."""
    dev = result["device"]
    lines = [
        f"{result['model']['name']} ({result['model']['dtype']}) on {dev['device']} [{dev['name']}], "
        f"{(result.get('config') or {}).get('cache', 'dynamic')} KV cache: method vs dense, "
        "same process, ABBA order; x = speed-up over dense (higher is better), KV x = method/dense bytes; "
        "pred x = decode speed-up the bytes per step allow (weights touched + KV read), of pred = achieved share",
        f"{'method':<24}{'B':>4}{'prompt':>7}{'new':>5}{'prefill ms':>16}{'x':>7}{'decode tok/s':>18}{'x':>7}"
        f"{'e2e tok/s':>11}{'x':>7}{'KV MB':>10}{'KV x':>8}{'mem MB':>9}{'pred x':>8}{'of pred':>8}",
    ]
    for r in result["rows"]:
        x = r["ratios"]
        pred, frac = r.get("predicted_decode_speedup"), r.get("decode_speedup_of_predicted")
        prefill = f"{r['prefill_ms']:.1f}±{r.get('prefill_ms_iqr') or 0:.1f}"
        decode = f"{r['decode_tokens_per_s']:.1f}±{r.get('decode_tokens_per_s_iqr') or 0:.1f}"
        label = r["label"] + (" compiled" if r.get("compiled") else "")
        lines.append(
            f"{label:<24}{r['batch_size']:>4}{r['prompt_tokens']:>7}{r['new_tokens']:>5}{prefill:>16}"
            f"{x['prefill_speedup']:>7.3f}{decode:>18}{x['decode_speedup']:>7.3f}{r['e2e_tokens_per_s']:>11.1f}"
            f"{x['e2e_speedup']:>7.3f}{r['kv_cache_bytes'] / 2**20:>10.2f}{x['kv_fraction']:>8.4f}"
            f"{_mb(r.get('peak_memory_bytes')):>9}{_x(pred):>8}{_pct(frac):>8}"
        )
        if r.get("decode_read_terms") and (r.get("dense") or {}).get("decode_read_terms"):
            lines.append(f"{'':<24}pred x = dense / method bytes a step (weights, K, V, scores): "
                         f"{terms_line(r['dense']['decode_read_terms'])} / {terms_line(r['decode_read_terms'])}")
    lines += _compiled_against_eager(result["rows"])
    if any(r.get("host_sync") for r in result["rows"]):
        lines.append("note: " + next(r["host_sync"] for r in result["rows"] if r.get("host_sync")))
    c = result.get("caches")
    if c:
        lines += ["", f"preallocated (static) vs concatenating (dynamic) KV cache at batch {c['batch_size']}, prompt "
                  f"{c['prompt_tokens']} + {c['new_tokens']} new tokens (x = static over dynamic)",
                  f"{'method':<24}{'static decode':>15}{'dynamic decode':>16}{'x':>7}{'static e2e':>12}{'dynamic e2e':>13}{'x':>7}"]
        for e in c["entries"]:
            lines.append(f"{e['label']:<24}{e['static']['decode_tokens_per_s']:>15.1f}{e['dynamic']['decode_tokens_per_s']:>16.1f}"
                         f"{e['decode_speedup']:>7.3f}{e['static']['e2e_tokens_per_s']:>12.1f}"
                         f"{e['dynamic']['e2e_tokens_per_s']:>13.1f}{e['e2e_speedup']:>7.3f}")
    b = result.get("budget")
    if b and b.get("complete"):
        what = "KV" if b.get("kind", "kv") == "kv" else "device memory"
        lines += [
            "",
            f"{what} budget {b['bytes']} bytes ({b['bytes'] / 2**20:.1f} MB; {b['source']}), prompt {b['prompt_tokens']} + "
            f"{b['new_tokens']} new tokens, on {b['device']} [{b['device_name']}]",
            f"{'method':<24}{'MB/seq':>9}{'max B':>7}{'x':>7}{'KV MB':>10}{'mem MB':>9}{'decode tok/s':>14}{'x':>7}"
            f"{'e2e tok/s':>11}{'x':>7}{'pred x':>8}{'of pred':>8}",
        ]
        for e in b["entries"]:
            per = e.get("per_sample_bytes", e.get("per_sample_kv_bytes"))
            lines.append(
                f"{e['label']:<24}{per / 2**20:>9.2f}{e['max_batch']:>7}{e['batch_ratio']:>7.3f}"
                f"{e['kv_cache_bytes'] / 2**20:>10.1f}{_mb(e.get('peak_memory_bytes')):>9}"
                f"{e['decode_tokens_per_s']:>14.1f}{e.get('decode_speedup', e.get('throughput_ratio', 0)):>7.3f}"
                f"{(e.get('e2e_tokens_per_s') or 0):>11.1f}{(e.get('e2e_speedup') or 0):>7.3f}"
                f"{_x(e.get('predicted_decode_speedup')):>8}{_pct(e.get('decode_speedup_of_predicted')):>8}"
            )
    return "\n".join(lines)
