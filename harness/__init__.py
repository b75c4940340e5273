"""The benchmarking harness: Hydra configs in, result.json (and a W&B run) out."""
