"""Inference-efficiency methods for multimodal LLMs, applied to Hugging Face models in place.

A method is a small dataclass whose fields are its hyper-parameters; ``with method.apply(model):``
installs it and restores the model exactly on exit, so one loaded model serves every method.
This package imports neither Hydra nor W&B: the harness depends on it, never the reverse.
"""

from lazyattn.base import Dense, Method
from lazyattn.calibrate import Calibration, calibrate, layer_divergence, select_lazy_layers
from lazyattn.cache import ValueOnlyLayer, kv_cache_bytes
from lazyattn.compose import compose
from lazyattn.lazy import LazyAttention, QCache, uniform_lazy_layers
from lazyattn.prune import FastV, SparseVLM

__all__ = [
    "Calibration",
    "Dense",
    "FastV",
    "LazyAttention",
    "Method",
    "QCache",
    "SparseVLM",
    "ValueOnlyLayer",
    "calibrate",
    "compose",
    "kv_cache_bytes",
    "layer_divergence",
    "select_lazy_layers",
    "uniform_lazy_layers",
]
