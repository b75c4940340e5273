"""Calibration: divergence profile and greedy selection of lazy layers."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lazyattn import calibrate, layer_divergence, select_lazy_layers


def small_llama(n_layers=6):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def batches():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return [{"input_ids": ids, "attention_mask": mask}]


def make_identical(model, source, copies):
    """Layers source..copies attend identically: the same q/k weights and norms, and layers
    source..copies-1 write nothing to the residual stream, so all of them see the same input."""
    layers = model.model.layers
    with torch.no_grad():
        for l in copies:
            layers[l].self_attn.q_proj.weight.copy_(layers[source].self_attn.q_proj.weight)
            layers[l].self_attn.k_proj.weight.copy_(layers[source].self_attn.k_proj.weight)
            layers[l].input_layernorm.weight.copy_(layers[source].input_layernorm.weight)
        for l in [source, *copies][:-1]:
            layers[l].self_attn.o_proj.weight.zero_()
            layers[l].mlp.down_proj.weight.zero_()


def test_identical_layers_have_zero_divergence_and_are_selected():
    model = small_llama()
    make_identical(model, 2, [3, 4])
    div = layer_divergence(model, batches())
    assert div[2, 3] < 1e-10 and div[3, 4] < 1e-10 and div[2, 4] < 1e-10
    assert div[0, 1] > 1e-3 and div[4, 5] > 1e-3  # the others really differ
    cal = calibrate(model, batches(), ratio=2 / 6)
    assert cal.lazy_layers == [3, 4]
    assert len(cal.adjacent) == 5 and cal.adjacent[2] < 1e-10
    assert calibrate(model, batches(), threshold=1e-8).lazy_layers == [3, 4]
    assert model.config._attn_implementation == "sdpa"  # eager only for the calibration pass


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.9])
def test_random_model_respects_budget(ratio):
    model = small_llama(8)
    cal = calibrate(model, batches(), ratio=ratio)
    assert len(cal.lazy_layers) == min(round(ratio * 8), 7)
    assert 0 not in cal.lazy_layers
    assert cal == calibrate(model, batches(), ratio=ratio)  # deterministic


def test_select_errors():
    d = torch.zeros(4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="exactly one"):
        select_lazy_layers(d)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        select_lazy_layers(d, ratio=1.0)


def test_anchor_selection_compares_with_the_real_anchor():
    """Layers 2, 3, 4 attend identically, layer 5 like none of them. With 3 and 4 lazy (anchor 2),
    the pairwise rule's next pick may stack more layers on anchor 2; the anchor rule measures each
    candidate against the anchor it would use in the partially lazy model and still picks 3 and 4
    first, reporting their (zero) divergence to anchor 2."""
    model = small_llama()
    make_identical(model, 2, [3, 4])
    cal = calibrate(model, batches(), ratio=2 / 6, select="anchor")
    assert cal.lazy_layers == [3, 4] and cal.select == "anchor"
    assert cal.anchor_of == {3: 2, 4: 2}
    assert all(js < 1e-10 for js in cal.chosen_js) and all(v < 1e-10 for v in cal.anchor_js.values())
    assert calibrate(model, batches(), threshold=1e-8, select="anchor").lazy_layers == [3, 4]
    assert model.config._attn_implementation == "sdpa"
    assert not any("forward" in vars(layer.self_attn) for layer in model.model.layers)  # lazy layers removed


def test_anchor_selection_measures_in_the_partially_lazy_model():
    """The first pick equals the pairwise rule's (nothing is lazy yet, so the measured divergences
    are the dense matrix's adjacent ones); from then on the costs come from the lazy model."""
    model = small_llama(8)
    div = layer_divergence(model, batches())
    first = min(range(1, 8), key=lambda l: float(div[l - 1, l]))
    cal = calibrate(model, batches(), ratio=1 / 8, select="anchor")
    assert cal.lazy_layers == [first]
    assert abs(cal.chosen_js[0] - float(div[first - 1, first])) < 1e-9
    deeper = calibrate(model, batches(), ratio=0.5, select="anchor")
    assert len(deeper.lazy_layers) == 4 and len(deeper.chosen_js) == 4
    assert deeper == calibrate(model, batches(), ratio=0.5, select="anchor")  # deterministic


@pytest.mark.parametrize("select", ["pairwise", "anchor"])
def test_cap_on_lazy_layers_per_anchor(select):
    model = small_llama(8)
    for cap in (1, 2):
        cal = calibrate(model, batches(), ratio=0.5, select=select, max_per_anchor=cap)
        served = {}
        for anchor in cal.anchor_of.values():
            served[anchor] = served.get(anchor, 0) + 1
        assert len(cal.lazy_layers) == 4 and max(served.values()) <= cap
    with pytest.raises(ValueError, match="cannot be placed with at most 1 per anchor"):
        calibrate(model, batches(), ratio=0.75, select=select, max_per_anchor=1)


def test_calibration_errors():
    model = small_llama(4)
    with pytest.raises(ValueError, match="select must be one of"):
        calibrate(model, batches(), ratio=0.5, select="adjacent")
    with pytest.raises(ValueError, match="max_per_anchor must be an integer >= 1"):
        calibrate(model, batches(), ratio=0.5, max_per_anchor=0)


def test_blocks_rule_merges_adjacent_layers_by_last_row_divergence():
    """The paper's rule: a layer joins the block of the layer before it when their last-row JS is
    below epsilon; a budget takes the smallest ones. Checked on a hand-made matrix and on a model."""
    from lazyattn.calibration import _select_blocks

    adjacent = [0.30, 0.01, 0.02, 0.50, 0.015, 0.40]  # layer l's JS to layer l - 1, l = 1..6
    div = torch.zeros(7, 7, dtype=torch.float64)
    for layer, js in enumerate(adjacent, start=1):
        div[layer - 1, layer] = div[layer, layer - 1] = js
    assert _select_blocks(div, None, 0.025, None)[0] == [2, 3, 5]  # blocks {1,2,3}, {4,5}: layers 2, 3, 5 lazy
    assert _select_blocks(div, 2 / 7, None, None)[0] == [2, 5]  # the two smallest
    with pytest.raises(ValueError, match="takes no max_per_anchor"):
        _select_blocks(div, 0.3, None, 2)


def test_last_row_divergence_uses_only_the_last_row():
    model, data = small_llama(), batches()
    last = layer_divergence(model, data, rows="last")
    every = layer_divergence(model, data)
    assert last.shape == every.shape and not torch.allclose(last, every)
    result = calibrate(model, data, ratio=0.5, select="blocks")
    adjacent = [last[l - 1, l].item() for l in range(1, last.shape[0])]
    chosen = sorted(range(1, last.shape[0]), key=lambda l: (adjacent[l - 1], l))[: len(result.lazy_layers)]
    assert result.lazy_layers == sorted(chosen) and result.select == "blocks"
