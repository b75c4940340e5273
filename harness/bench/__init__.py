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

The package: ``constants``, ``variants`` (settings and method entries), ``prompts``, ``budget`` (timing
rows and the memory-budget search), ``tables`` (the console table) and ``cli`` (``run_bench``, ``python -m
harness.bench``). Their public names are re-exported here.
"""

from __future__ import annotations

from harness import measure  # noqa: F401  (bench.measure: what the benchmark times with)
from harness.bench.budget import budget_plan, compare_caches, free_memory, run_budget, timing_row  # noqa: F401
from harness.bench.cli import main, run_bench  # noqa: F401
from harness.bench.constants import FILLER, KEY_EXCLUDE, QUESTION, RESULT, TIMINGS  # noqa: F401
from harness.bench.prompts import Prompts  # noqa: F401
from harness.bench.tables import format_table, terms_line  # noqa: F401
from harness.bench.variants import (  # noqa: F401
    BenchError, Variant, bench_key, check_settings, make_variant, parse_entry, previous_result,
)
