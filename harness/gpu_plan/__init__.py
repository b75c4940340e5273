"""The device call's phases (docs/gpu.md): ``python -m harness.gpu_plan PHASE --out DIR [--tier N]``.

``tools/gpu_call.py`` runs each phase in its own process with its own timeout, in the order of
``tools/gpu_call.py``'s ``STEPS`` (by value), so a CUDA device-side assert or a hang in one phase
loses nothing of the others. Each phase writes ``DIR/<phase>.json`` atomically after every point,
so a phase that is killed keeps its finished points, and reads it back first: a folder of partial
results carried back in continues where it stopped (points measured on another device are redone).

Phases (``--profile gpu``, the default on CUDA; the points of ``--tier N`` only, tier 1 first):

- ``env``: the machine, the packages (the carried transformers must be the one imported), a
  device-to-device copy and a bf16 matmul against the card's peak, so a broken machine shows first;
- ``throughput``: ``model=llava15_7b_random`` (float16, sdpa): dense, Lazy r=0.5, r=0.7 and the
  ``share=qkv`` reading at 0.35, and the backend control (``dense_explicit``: dense with explicit
  decode attention, as anchors form theirs); at the first point dense, r=0.5 and r=0.7 once more
  with compiled static-graph decode steps (CUDA graphs); all variants of a point timed in one ABBA set
  (``harness.measure.interleaved``): decode-only and end-to-end tokens/s, KV bytes, peak memory;
  batch 1, 8, 32 x the 584-token prompt and 2048 tokens, 128 new tokens, point-major;
- ``correctness``: the mask and timing-protocol checks, calibration and VTW's ``k=auto`` on the
  device, then every family x method in float16 and bfloat16, eager and sdpa, and PyTorch's flash
  kernel forced on the unpadded cells (``harness.gpu_check.matrix``: every registered method at the
  settings it gives for checks, ``lazyattn.examples_of``);
- ``pruning``: FastV, SparseVLM, VTW and Lazy+FastV against dense at batch 8, and every other registered
  token pruner defined for LLaVA-1.5 (PruMerge+, a method registered from code) at the settings it
  gives for checks (``pruning_variants``; HiRED, LLaVA-NeXT only, is in the correctness matrix);
- ``budget``: the fixed device-memory budget (dense's peak at batch 8) at 2048 tokens: each
  method's largest batch and its throughput there (``harness.bench.budget_plan`` / ``run_budget``).

Without CUDA (``--profile cpu``, ``make gpu-dryrun``) every phase runs the same code on the tiny
random LLaVA in seconds and says the GPU readings were skipped (``status: skipped``); a crash
is ``failed`` either way. A phase stops before a point it cannot finish by ``--stop-at`` (its
estimate, scaled by what this call has measured), leaving it ``not_run`` for the next call.

The parts: ``plan`` (the phases, their points and settings, the estimates, the phase file
``Phase``), ``timing`` (one timed point, ``time_point``, and its variants), ``phases`` (each phase's
runner, ``RUNNERS``) and ``cli`` (the command). Every module imports only the standard library at
its top (the harness, torch and Hydra inside the functions), as ``tools/gpu_call.py`` needs.
"""

from harness.gpu_plan.plan import (  # noqa: F401
    BUDGET_CONTEXT,
    BUDGET_GROUPS,
    BUDGET_REFERENCE_BATCH,
    COMPILED_VARIANTS,
    CONTROL_VARIANTS,
    CORRECTNESS_DTYPES,
    CPU,
    LAZY_VARIANTS,
    LOAD_S,
    MODEL_7B,
    NEW_TOKENS,
    PEAK_BF16,
    PHASES,
    PROMPT_7B,
    PRUNING_POINTS,
    PRUNING_VARIANTS,
    REPEATS,
    THROUGHPUT_POINTS,
    TIMED_FAMILY,
    TIMED_LAYERS,
    WARMUP,
    Phase,
    estimate_budget_s,
    estimate_point_s,
    estimate_run_s,
    now,
    point_key,
    slug,
    write_json,
)
from harness.gpu_plan.timing import (  # noqa: F401
    FIGURES,
    bench_variants,
    device_name,
    inputs_device,
    load_profile_model,
    pruning_variants,
    time_point,
)
from harness.gpu_plan.phases import (  # noqa: F401
    RUNNERS,
    phase_budget,
    phase_correctness,
    phase_env,
    phase_pruning,
    phase_throughput,
)
from harness.gpu_plan.cli import main  # noqa: F401
