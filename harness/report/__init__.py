"""Paper tables and figures, rendered from result.json files only (they rebuild without a model).

    python -m harness.report main       --results results/tiny --out results   # accuracy table
    python -m harness.report efficiency --results results/tiny --out results   # KV / latency table
    python -m harness.report layers     --results results/tiny --out results   # layer divergence figure
    python -m harness.report pareto     --results results/tiny --out results   # accuracy vs KV reduction
    python -m harness.report tasks      --results DIR                              # any task's results
    python -m harness.report paper      --results results/paper --out results  # the paper's table (task=paper)
    python -m harness.report all        --results results/tiny --out results

Tables are written as Markdown and LaTeX to ``out/tables``, figures as PNG to ``out/figures``.
Rows are ordered as the methods are registered (``lazyattn.METHODS``: dense, Lazy Attention,
FastV, SparseVLM, combinations), each by its own setting; every label comes from the run that
made the result. A point measured twice (same label) keeps the newest result.

The package: ``index`` (finding and pairing results; numbers), ``tables`` (the tables as header and
rows), ``render`` (Markdown and LaTeX files), ``plots`` (figures, each from numbers it computes
first) and ``cli`` (``python -m harness.report``). Its public names are re-exported here.
"""

from __future__ import annotations

from harness.report.index import (  # noqa: F401
    NothingToRender,
    collect,
    label,
    is_dense,
    protocol,
    multiturn_mode,
    newest_per_label,
    rows_of,
    dense_rows,
    dense_scores,
    headline_of,
    score_groups,
    metrics_of,
    delta_cell,
    against_dense_of,
    main_points,
    with_in_run_dense,
    unpaired,
    calibrated_results,
    anchor_js,
    versus,
)
from harness.report.tables import (  # noqa: F401
    FLAG,
    FLAG_NOTE,
    main_table,
    table_notes,
    protocol_table,
    SPEEDUPS,
    DRIFT,
    ratio_spread,
    speedup_cell,
    timing_drift,
    efficiency_table,
    calibration_table,
    longform_points,
    benchmark_table,
    paper_table,
)
from harness.report.render import (  # noqa: F401
    markdown,
    latex,
    write_table,
)
from harness.report.plots import (  # noqa: F401
    layers_figure,
    pareto_figure,
    pareto_points,
    fidelity_figure,
    longform_figure,
)
from harness.report.cli import (  # noqa: F401
    TABLES,
    WHAT,
    render,
    main,
    parser,
)
