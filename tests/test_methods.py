"""The method registry and the contract every method keeps (lazyattn.METHODS, lazyattn.build)."""

import ast
from pathlib import Path

import pytest
from helpers import shapes_inputs
import torch

import lazyattn
from lazyattn import METHODS, Composed, Dense, FastV, LazyAttention, SparseVLM, build
from lazyattn.arch import decoder_layers

# Specs with non-default settings for the shipped methods, as a harness config would give them
# (lists as lists or tuples); a method added later is tested from its conf/method preset.
CHOSEN = {
    "dense": {"name": "dense"},
    "lazy": {"name": "lazy", "layers": None, "ratio": 0.5},
    "fastv": {"name": "fastv", "k": 2, "ratio": 0.5, "score": "last_token"},
    "sparsevlm": {"name": "sparsevlm", "budget": None, "layers": (1, 3, 6), "keep": [40, 20, 8], "recycle": 0.3,
                  "positions": "contiguous"},
    "vtw": {"name": "vtw", "k": 6},
    "lazy_fastv": {"name": "lazy_fastv", "lazy": {"layers": None, "ratio": 0.5}, "fastv": {"k": 3, "ratio": 0.5}},
    "lazy_sparsevlm": {"name": "lazy_sparsevlm", "lazy": {"name": "lazy", "layers": [1, 4, 5], "ratio": None},
                       "sparsevlm": {"name": "sparsevlm", "budget": 128}},
    "lazy_vtw": {"name": "lazy_vtw", "lazy": {"ratio": 0.5, "share": "qkv"}, "vtw": {"k": 7}},
    "lazy_prumerge_plus": {"name": "lazy_prumerge_plus", "lazy": {"ratio": 0.5}, "prumerge_plus": {"plus": False}},
    "lazy_hired": {"name": "lazy_hired", "lazy": {"layers": [1, 3]}, "hired": {"budget": 0.3, "alpha": 0.4}},
}
CONF = Path(__file__).resolve().parent.parent / "conf" / "method"


def preset(name):
    """A registered method's spec from its conf/method/NAME.yaml (docs/methods.md, adding a method)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))


SPECS = {name: CHOSEN.get(name) or preset(name) for name in METHODS}


def test_registry_order_and_specs_cover_it():
    assert list(METHODS)[:5] == ["dense", "lazy", "fastv", "sparsevlm", "vtw"]  # table order: dense, lazy, pruners
    assert list(SPECS) == list(METHODS)
    for name in METHODS:  # every registered method has its preset, named by the registry key
        assert preset(name)["name"] == name, name


@pytest.mark.parametrize("name", list(SPECS))
def test_build_every_method_from_a_dict(name):
    method = build(SPECS[name])
    assert method.name == name
    # params() are the constructor settings: building from them gives the same method again
    params = method.params()
    if isinstance(method, Composed):
        rebuilt = build({"name": name, **{role: {"name": role, **p} for role, p in params.items()}})
    else:
        rebuilt = build({"name": name, **params})
    assert rebuilt == method and rebuilt.params() == params


def test_build_builds_the_parts_of_composed_methods():
    method = build(SPECS["lazy_fastv"])
    assert method == Composed(LazyAttention(ratio=0.5), FastV(k=3, ratio=0.5))
    assert method.params() == {"lazy": {"layers": None, "ratio": 0.5, "share": "qk", "scope": "all"},
                               "fastv": {"k": 3, "ratio": 0.5, "score": "last_token"}}
    assert build(SPECS["lazy_sparsevlm"]).pruner == SparseVLM(budget=128)
    assert build({"name": "sparsevlm", "layers": (1, 3, 6), "keep": (40, 20, 8)}).params()["keep"] == [40, 20, 8]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "fastv", "K": 2}, "method fastv has no setting 'K'; its settings: k, ratio, score"),
        ({"name": "sparsevlm", "positions_mode": "original"}, "method sparsevlm has no setting 'positions_mode'"),
        ({"name": "dense", "ratio": 0.5}, "method dense has no setting 'ratio'; its settings: none"),
        ({"name": "lazy", "threshold": 0.1}, "method lazy has no setting 'threshold'"),
        ({"name": "lazy_fastv", "lazy": {"ratio": 0.5}, "fastv": {"k": 2, "bogus": 1}},
         "method fastv has no setting 'bogus'"),
        ({"name": "lazy_fastv", "lazy": {"ratio": 0.5}, "fastv": {"k": 2}, "sparsevlm": {}},
         "method lazy_fastv has no setting 'sparsevlm'; its settings: lazy, fastv"),
        ({"name": "nope"}, f"unknown method 'nope'; known: {', '.join(METHODS)}"),
        ({"ratio": 0.5}, "'name' key"),
    ],
)
def test_build_refuses_unknown_names_and_settings_in_one_line(spec, message):
    with pytest.raises(ValueError) as err:
        build(spec)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_build_keeps_each_methods_own_validation():
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        build({"name": "fastv", "k": 0})
    with pytest.raises(ValueError, match="layer 0 cannot be lazy"):
        build({"name": "lazy_fastv", "lazy": {"layers": [0]}, "fastv": {}})
    with pytest.raises(ValueError, match="its lazy part must be a LazyAttention"):
        build({"name": "lazy_fastv", "lazy": {"name": "fastv"}, "fastv": {}})


def test_labels_and_sort_keys():
    n = 12
    assert Dense().label(n) == "Dense"
    assert FastV(k=2, ratio=0.5).label(n) == "FastV K=2 R=0.5" and FastV(k=3, ratio=0.75).sort_key(n) == (3, 0.75)
    assert SparseVLM(budget=64).label(n) == "SparseVLM 64 (v1.5, layers scaled)"  # 12 layers: too shallow for 2, 6, 15
    assert SparseVLM(budget=64).label(32) == "SparseVLM 64 (v1.5)" and SparseVLM(budget=64).sort_key(n) == (-64, False)
    assert SparseVLM(keep=[10, 5], layers=[1, 2]).label(n) == "SparseVLM keep=[10, 5]"
    assert build(SPECS["lazy_fastv"]).label(n) == "Lazy r=0.5 + FastV K=3 R=0.5"
    assert build(SPECS["lazy_sparsevlm"]).label(n) == "Lazy [1, 4, 5] + SparseVLM 128 (v1.5, layers scaled)"
    for name, spec in SPECS.items():
        method = build(spec)
        assert isinstance(method, lazyattn.Method), name
        assert isinstance(method.label(n), str) and isinstance(method.sort_key(n), tuple)


def _installed(model):
    """Instance forwards and hooks on the model, its decoder, its decoder layers and attention modules,
    and (for the methods that reduce image tokens before the LLM) on the vision tower's layers and the
    wrapped ``get_image_features``."""
    from lazyattn.vision import vision_encoder_layers

    layers = decoder_layers(model)
    vision = list(vision_encoder_layers(model))
    modules = [model, model.get_decoder(), *layers, *(layer.self_attn for layer in layers)]
    forwards = [m for m in [*layers, *(layer.self_attn for layer in layers)] if "forward" in vars(m)]
    forwards += [m for m in [model.model] if "get_image_features" in vars(m)]
    hooks = [m for m in modules if m._forward_pre_hooks or m._forward_hooks]
    # transformers keeps its own output-capturing hooks on the vision layers: only ours count there
    ours = lambda m: any(getattr(h, "__module__", "").startswith("lazyattn") for h in m._forward_pre_hooks.values())
    hooks += [m for m in vision if ours(m)]
    return forwards, hooks


@pytest.fixture(scope="module")
def tiny_next():
    """A tiny random LLaVA-NeXT, for the methods defined for that family only (HiRED)."""
    from harness.models import families

    return families.build_random(*families.TINY_SHAPES["llava_next_mistral"], initializer_range=0.2)


@torch.no_grad()
def test_composed_params_do_not_change_when_applied(tiny):
    method = build(SPECS["lazy_fastv"])  # FastV prunes from layer 3, which the uniform rule made lazy
    before = method.params()
    assert method.lazy_layers(tiny.n_layers) == [1, 4, 5, 7, 9, 11]
    with method.apply(tiny.model):
        tiny.model(**shapes_inputs(tiny, n=2))
    assert method.params() == before == {"lazy": {"layers": None, "ratio": 0.5, "share": "qk", "scope": "all"},
                                         "fastv": {"k": 3, "ratio": 0.5, "score": "last_token"}}
    assert vars(method).keys() == {"lazy", "pruner"}


@pytest.mark.parametrize("name", list(SPECS))
@torch.no_grad()
def test_apply_yields_the_model_and_removes_everything(tiny, tiny_next, name):
    method = build(SPECS[name])
    loaded = tiny if "llava" in (lazyattn.method_families(method) or ["llava"]) else tiny_next
    model = loaded.model
    inputs = shapes_inputs(loaded, n=2)
    assert _installed(model) == ([], [])
    with method.apply(model) as applied:
        assert applied is model
        assert (_installed(model) == ([], [])) == (name == "dense")  # the check below sees what was installed
        model(**inputs)
    assert _installed(model) == ([], [])
    with pytest.raises(RuntimeError, match="boom"):
        with method.apply(model) as applied:
            assert applied is model
            model(**inputs)
            raise RuntimeError("boom")
    assert _installed(model) == ([], [])


LIBRARY = Path(lazyattn.__file__).parent


@pytest.mark.parametrize("path", sorted(LIBRARY.glob("*.py")), ids=lambda p: p.name)
def test_the_library_never_imports_the_harness(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        assert not any(n == "harness" or n.startswith("harness.") for n in names), f"{path.name} imports {names}"
    text = path.read_text()
    assert "import harness" not in text and "from harness" not in text, path.name


@pytest.mark.parametrize("name", list(SPECS))
def test_every_method_states_its_plan(name):
    """The harness reads a method only through its Plan: each registered method gives one, and it
    agrees with the method's own settings (lazy layers and anchors, reading, pruning layer)."""
    method = build(SPECS[name])
    plan = method.plan(12)
    assert isinstance(plan, lazyattn.Plan) and plan.schedule and plan.series
    assert dict(plan.anchors) == lazyattn.anchors_of(plan.lazy_layers, 12) and list(plan.lazy_layers) == sorted(plan.anchors)
    lazy = method.lazy if isinstance(method, Composed) else method if isinstance(method, LazyAttention) else None
    pruner = method.pruner if isinstance(method, Composed) else method if isinstance(method, lazyattn.TokenPruner) else None
    assert bool(plan.lazy_layers) == (lazy is not None)
    if lazy is not None:
        assert (plan.share, plan.scope, plan.reading) == (lazy.share, lazy.scope, lazy.reading())
    if pruner is None:
        assert plan.pruner is None and plan.pruned_from is None
    else:
        assert plan.pruner == pruner.name and plan.pruned_from == min(pruner.first_layers(12), default=None)
        assert plan.pruned_from not in plan.lazy_layers  # a lazy layer never sees fewer tokens than its anchor
    assert plan.host_sync == (pruner is not None and pruner.name == "sparsevlm")
