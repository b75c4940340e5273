"""Config -> lazyattn method. One builder per method name; the harness never branches on type."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from harness.registry import Registry
from lazyattn import Dense, LazyAttention, Method

METHODS = Registry("method")


@METHODS.register("dense")
def _dense(cfg: DictConfig) -> Method:
    return Dense()


@METHODS.register("lazy")
def _lazy(cfg: DictConfig) -> Method:
    layers = cfg.get("layers")
    if layers == "auto":
        raise ValueError("method.layers=auto must be resolved by calibration first (harness.calibration).")
    if layers is not None:
        layers = OmegaConf.to_object(layers) if OmegaConf.is_config(layers) else layers
        if not isinstance(layers, list):
            raise ValueError(f"method.layers must be a list of layer indices like [3,5,7], got {layers!r}.")
        return LazyAttention(layers=layers)
    ratio = cfg.get("ratio")
    if ratio is None:
        raise ValueError("method=lazy needs method.layers=[...] or method.ratio=r.")
    return LazyAttention(ratio=float(ratio))


def build_method(cfg: DictConfig) -> Method:
    return METHODS.get(cfg.name)(cfg)


def lazy_layers_of(method: Method, n_layers: int) -> list[int]:
    return method.lazy_layers(n_layers) if hasattr(method, "lazy_layers") else []
