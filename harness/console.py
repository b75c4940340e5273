"""What a run says on the console: its first lines (what runs, on what, how many samples) and its
summary (scores with their intervals, fidelity, KV, timing, the headline). ``harness.run`` prints
them; nothing here computes a number that result.json does not hold."""

from __future__ import annotations

from omegaconf import DictConfig

from harness import headline, metrics


def samples_scored(limit: int | None, task) -> str:
    """The console's n: what will be scored and why (the limit, the whole set, the task's default)."""
    sizes = task.sizes()
    if sizes:
        each = [f"{name} {size if limit is None else min(limit, size)}" for name, size in sizes.items()]
        n = ", ".join(each) if len(sizes) > 1 else each[0].rsplit(" ", 1)[1]
        if limit is None:
            return f"n={n} (every row)"
        return f"n={n} (limit={limit}{' or fewer rows' if any(size < limit for size in sizes.values()) else ''})"
    if limit is not None:
        return f"n={limit} (limit)"
    if task.n is not None:  # the shapes sets' task.n; the lmms-eval benchmarks have none
        return f"n={task.n} (task.n, the task's default)"
    return "n=every sample (no limit)"


def limit_notes(limit: int | None, task) -> list[str]:
    """One line for each set a limit exceeds: it scores fewer samples than asked, said before the run."""
    if limit is None:
        return []
    return [f"note: limit={limit} exceeds the {size} row(s) of {name}: {size} will be scored"
            for name, size in (task.sizes() or {}).items() if size < limit]


def first_lines(cfg: DictConfig, loaded, method_info: dict, method, task) -> list[str]:
    """The console's first lines: model, method label and schedule, task, n and protocol, then a note
    for each set a limit exceeds (``limit_notes``)."""
    weights = "RANDOM weights" if loaded.random_weights else "trained weights"
    t = cfg.task
    qtypes = list(t.get("qtypes") or [])
    protocol = [f"split={t.get('split')}"] if t.get("split") else []
    if qtypes:
        protocol.append(f"{len(qtypes)} question types ({', '.join(qtypes)})")
    if t.get("lmms_tasks"):
        protocol.append(f"lmms-eval tasks {', '.join(t.lmms_tasks)}")
    if t.get("multiturn"):
        protocol.append(f"multiturn={t.multiturn}")
    if t.get("min_new_tokens"):
        protocol.append(f"min_new_tokens={t.min_new_tokens}")
    protocol.append(f"seed={cfg.seed}")
    dense = ("dense scored beside it on the same samples" if cfg.compare_dense and method.name != "dense"
             else "no dense in this run")
    return [
        f"model: {loaded.name} ({loaded.n_layers} layers, {loaded.n_params / 1e6:.2f} M parameters, "
        f"{str(loaded.model.dtype).removeprefix('torch.')}, {weights})",
        f"method: {method_info['label']} [{method.name}]: {method.plan(loaded.n_layers).schedule}",
        f"task: {t.name}, {samples_scored(cfg.limit, task)}; {'; '.join(protocol)}; {dense}",
        *limit_notes(cfg.limit, task),
    ]


def _ci(interval) -> str:
    return f"[{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, list):
        return "[" + ", ".join(_num(v, digits) for v in value) + "]"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_summary(result: dict) -> None:
    head = result.get("headline") or {}
    flagged = set(head.get("dense_below_floor") or [])
    tasks_flagged = set(result.get("dense_below_floor_tasks") or [])
    for name, scores in result["tasks"].items():
        dense = result.get("tasks_dense", {}).get(name, {})
        declared = metrics.of_result(result, name)
        print(f"task {name}: n={scores['n']}")
        entries = [(k, v) for k, v in scores.items() if isinstance(v, dict)] + [("all", scores)]
        for key, value in entries:
            judged = declared.judged_by(value)
            metric = judged.name if judged is not None and judged.per_sample else None
            if metric is None:  # a scorer's own aggregates (lmms-eval's POPE, captions): every number it gave
                numbers = {k: v for k, v in value.items() if isinstance(v, (int, float)) and k != "n"}
                print(f"  {key:<10} " + " ".join(f"{k}={v:.3f}" for k, v in numbers.items()))
                continue
            shown = "all (over samples)" if key == "all" else key
            line = f"  {shown:<10} {metric}: method {value[metric]:.3f} {_ci(value.get(metric + '_ci95'))}"
            d = dense.get(metric) if key == "all" else dense.get(key, {}).get(metric)
            if d is not None:
                line += f"  dense {d:.3f}"
            if value.get("delta") is not None:
                line += f"  delta {value['delta']:+.3f} {_ci(value['delta_ci95'])}"
            if key in flagged and name == head.get("task"):
                line += (f"  † dense below {headline.DENSE_FLOOR:.0%}: a type dense cannot do "
                         "(left out of acc_mean_types_capable)")
            if key == "all" and name in tasks_flagged:
                line += (f"  † dense below {headline.DENSE_FLOOR:.0%} on the whole task: one dense cannot do, "
                         "so the delta says nothing about the method")
            print(line)
    for name, scores in result["tasks"].items():
        if "agreement" in scores:  # VLMEvalKit's verdicts beside the harness's own scorer (the shapes sets)
            print(f"task {name}: VLMEvalKit's scoring and the harness's agree on {scores['agreement']:.1%} of samples "
                  f"(harness acc {scores['acc_harness']:.3f})")
    if result.get("fidelity"):
        f = result["fidelity"]
        print(f"fidelity to dense: exact {f['exact_match']:.3f}, prefix agreement {f['prefix_agreement']:.3f}, "
              f"first divergence (median token) {f['first_divergence_median']}")
    if result.get("kv_workload"):
        k = result["kv_workload"]
        line = f"KV, workload (the scored samples, every turn): method {k['method_bytes_mean']:.0f} bytes per sample"
        if k["reduction"] is not None:
            line += f", dense {k['dense_bytes_mean']:.0f}: kv_cut_workload={k['reduction']:.4f}"
        print(line)
    eff = result["efficiency"]
    if eff:
        print(f"timing batch (one synthetic batch: the first prompt x{eff.get('batch_size')}, "
              f"{eff.get('prompt_tokens')} prompt tokens, {eff.get('new_tokens')} new; {eff['device']}; "
              "medians ± IQR, dense and method interleaved):")
        for variant in ("dense", "method"):
            e = eff[variant]
            mem = e.get("peak_memory_bytes")
            print(
                f"  {variant:<6} kv_cache_bytes={e['kv_cache_bytes']} peak_memory_bytes={mem} "
                f"prefill_ms={e['prefill_ms']:.1f}±{e.get('prefill_ms_iqr', 0):.1f} "
                f"decode_tokens_per_s={e['decode_tokens_per_s']:.1f}±{e.get('decode_tokens_per_s_iqr', 0):.1f} "
                f"e2e_tokens_per_s={e.get('e2e_tokens_per_s', float('nan')):.1f}"
            )
        print(
            f"  kv_cut_timing_batch={eff['kv_reduction']:.4f} decode_speedup={eff['decode_speedup']:.3f} "
            f"e2e_speedup={eff.get('e2e_speedup', float('nan')):.3f} prefill_speedup={eff['prefill_speedup']:.3f} "
            "(method over dense, higher is better)"
        )
        if eff.get("predicted_decode_speedup"):
            print(
                f"  predicted decode speed-up from bytes per step (weights touched + KV read; {eff.get('cache', 'dynamic')} "
                f"cache): x{eff['predicted_decode_speedup']:.3f}; achieved {eff['decode_speedup_of_predicted']:.0%} of it"
            )
        if eff.get("host_sync"):
            print(f"  note: {eff['host_sync']}")
        if eff.get("noisy"):
            print(f"  warning: timing is noise ({eff['noise']}): these speed-ups are no finding; time on a quiet "
                  "machine or with more efficiency.repeats")
        elif min(eff["dense"].get("repeats", 1), eff["method"].get("repeats", 1)) < 2:
            print("  note: one timed repeat: the speed-ups carry no spread, so their noise cannot be judged "
                  "(efficiency.repeats=3 or more)")
    if head:
        print(f"headline ({head.get('task')}; result.json 'headline', W&B 'headline/*', the tables; "
              "docs/results.md#headline-numbers):")
        keys = [k for k in headline.KEYS if head.get(k) is not None and k != "timing_noise"]  # said above
        for i in range(0, len(keys), 4):
            print("  " + "  ".join(f"{k}={_num(head[k])}" for k in keys[i:i + 4]))
