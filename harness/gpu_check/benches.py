"""The throughput benchmark on LLaVA-1.5-7B shapes (``harness.bench``): the batch x context grid,
the fixed device-memory budget, and long generations; a finished bench is kept."""

from __future__ import annotations

import json
from pathlib import Path

import torch

BENCH_METHODS = ["lazy ratio=0.5", "lazy ratio=0.7", "lazy ratio=0.35 share=qkv", "fastv ratio=0.5",
                 "sparsevlm budget=128", "vtw k=16", "lazy_fastv"]


def bench_configs(out: Path, quick: bool) -> list[tuple[str, list[str]]]:
    """(folder, harness.bench overrides) of the two benches."""
    common = ["model=llava15_7b_random", "device=cuda", "wandb.mode=disabled", "warmup=1", "repeats=5",
              "budget.kind=memory", "budget.reference_batch=8", f"methods={json.dumps(BENCH_METHODS)}"]
    if quick:
        return [("bench", [*common, "batch_sizes=[1,8]", "context_lengths=[null]", "new_tokens=128",
                           "budget.context_length=null", f"out_dir={out / 'bench'}"])]
    return [
        ("bench", [*common, "batch_sizes=[1,8,32]", "context_lengths=[null,2048]", "new_tokens=128",
                   "budget.context_length=2048", f"out_dir={out / 'bench'}"]),
        ("bench_long", [*common, "batch_sizes=[8]", "context_lengths=[null]", "new_tokens=512",
                        "budget.context_length=null", "budget.new_tokens=128", f"out_dir={out / 'bench_long'}"]),
    ]


def run_benches(out: Path, quick: bool) -> list[dict]:
    from hydra import compose, initialize_config_dir

    from harness import bench
    from harness.config import CONF_DIR

    results = []
    for folder, overrides in bench_configs(out, quick):
        path = out / folder / bench.RESULT
        if path.exists() and json.loads(path.read_text()).get("status") == "complete":
            print(f"{path}: finished earlier, kept", flush=True)
        else:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(config_name="bench", overrides=overrides)
            bench.run_bench(cfg)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        results.append(json.loads(path.read_text()))
    return results
