"""The efficiency benchmark: ``python -m harness.bench model=NAME device=cpu|cuda ...``.

For one model, dense and each configured method: prefill latency, decode and end-to-end
tokens/s (batch x new tokens over prefill + decode), peak KV bytes and peak device memory (CUDA
only) across batch sizes and prompt lengths. Each point times dense and the method in ABBA
order in this process (``harness.measure.time_against_dense``), so a row's speed-ups come from one run.
Every speed-up is method over dense, higher is better.

Then throughput under a fixed memory budget (the paper's claim: more sequences in the same
memory). ``budget.kind`` says what is budgeted: ``kv`` the KV cache bytes (the paper's measure;
any device), ``memory`` the peak allocated device memory (weights, activations and cache; CUDA
only). The budget is dense's figure at ``budget.reference_batch`` (or ``budget.bytes``). A
method's figure is linear in the batch (through zero for KV; with a fixed part, the weights,
for device memory, so that one is measured at batch 1 and 2), so its largest batch is predicted,
then verified by running that batch (stepping down while the measured peak exceeds the budget);
every method is then timed at its own largest batch, in ABBA order with dense at dense's.

``out_dir/bench.json`` is rewritten atomically after every point, so an interrupted bench keeps
what finished; running the same command with the same ``out_dir`` resumes it.

The package: ``variants`` (settings and method entries), ``prompts``, ``budget`` (timing rows and the
memory-budget search), ``tables`` (the console table) and ``cli`` (``run_bench``, ``python -m
harness.bench``). Its names are re-exported here.
"""

from __future__ import annotations

from harness.bench.variants import (  # noqa: F401
    KEY_EXCLUDE,
    BenchError,
    Variant,
    _dotlist,
    parse_entry,
    make_variant,
    _int,
    check_settings,
    bench_key,
    previous_result,
    RESULT,
)
from harness.bench.prompts import (  # noqa: F401
    QUESTION,
    FILLER,
    Prompts,
)
from harness.bench.budget import (  # noqa: F401
    TIMINGS,
    _figures,
    _row,
    _free,
    _peak,
    _peak_kv,
    budget_plan,
    run_budget,
    compare_caches,
)
from harness.bench.tables import (  # noqa: F401
    _mb,
    _x,
    _pct,
    format_table,
)
from harness.bench.cli import (  # noqa: F401
    run_bench,
    main,
)
from harness import measure  # noqa: F401,E402  (bench.measure: what the benchmark times with)
