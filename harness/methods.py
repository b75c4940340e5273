"""Config -> lazyattn method. One builder per method name; the harness never branches on type."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from harness.registry import Registry
from lazyattn import Dense, FastV, LazyAttention, Method, SparseVLM, compose

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


def _list(value, what: str):
    if value is None:
        return None
    value = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list like [2,6,15], got {value!r}.")
    return value


@METHODS.register("fastv")
def _fastv(cfg: DictConfig) -> Method:
    return FastV(k=int(cfg.k), ratio=float(cfg.ratio), score=str(cfg.get("score", "last_token")))


@METHODS.register("sparsevlm")
def _sparsevlm(cfg: DictConfig) -> Method:
    budget = cfg.get("budget")
    return SparseVLM(
        budget=None if budget is None else int(budget),
        layers=_list(cfg.get("layers"), "method.layers"),
        keep=_list(cfg.get("keep"), "method.keep"),
        recycle=float(cfg.get("recycle", 0.3)),
        positions_mode=str(cfg.get("positions", "contiguous")),
    )


def _composed(pruner_name: str):
    def build(cfg: DictConfig) -> Method:
        if cfg.lazy.get("layers") == "auto":
            raise ValueError(f"method={cfg.name} takes explicit method.lazy.layers or method.lazy.ratio, not auto.")
        return compose(_lazy(cfg.lazy), METHODS.get(pruner_name)(cfg[pruner_name]))

    return build


METHODS.register("lazy_fastv")(_composed("fastv"))
METHODS.register("lazy_sparsevlm")(_composed("sparsevlm"))


def build_method(cfg: DictConfig) -> Method:
    return METHODS.get(cfg.name)(cfg)


def lazy_layers_of(method: Method, n_layers: int) -> list[int]:
    return method.lazy_layers(n_layers) if hasattr(method, "lazy_layers") else []
