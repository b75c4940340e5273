"""Ready for the first GPU: ``python -m harness.gpu_check`` (``make gpu-check``).

On a CUDA machine, with no downloads (docs/gpu.md):

1. correctness: every model family at a tiny size (LLaVA-Llama, LLaVA-Qwen2, LLaVA-Mistral,
   LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL) x every registered method at the settings it gives for checks
   (``lazyattn.examples_of``: lazy and its qkv and visual readings, fastv, sparsevlm, vtw, PruMerge+,
   HiRED, their compositions with lazy, the dense_explicit control, and any method registered from
   code), on the families it is defined for, in float16 and bfloat16: the logits of a prefill and of teacher-forced decode steps under
   ``eager`` and ``flash_attention_2`` (when flash-attn is importable) agree with ``sdpa`` within
   ``TOLERANCE`` (max |a - b| over max |sdpa|), and the KV cache holds what the formula says;
2. throughput at real scale: ``model=llava15_7b_random`` (float16) through ``harness.bench``:
   batch x context grid, dense vs Lazy 0.5 / 0.7, FastV, SparseVLM, Lazy+FastV, decode-only and
   end-to-end, KV bytes and device memory, then the fixed device-memory budget (dense's peak at
   batch 8) at a long context; a second bench times long generations (512 new tokens at batch 8)
   with the budget at the unpadded prompt;
3. writes ``results/gpu/<device>/``: ``correctness.json``, ``bench/bench.json``,
   ``bench_long/bench.json``, ``README.md`` (tables rendered with ``harness.report.markdown``),
   and prints one summary table. Everything is saved as it finishes, so a run that is cut off
   keeps what finished and the next run continues.

Without CUDA it runs what a CPU can check (the pruned stages' masks, the timing protocol, and
the correctness matrix for sdpa vs eager in float32), writes ``cpu_checks.json`` under ``--out``
(default ``runs/gpu_check/cpu``), prints one line saying it needs a GPU, and exits 0 when the
checks pass (1 when one fails).

The parts: ``matrix`` (the correctness matrix, from the method registry), ``checks`` (what a CPU
can check of the measurement), ``benches`` (the throughput benchmark), ``readme`` (the tables and
README), ``cli`` (the command).
"""
