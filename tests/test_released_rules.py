"""The baselines' released rules (issue 31), each against a reference written here from the rule's
statement (docs/methods.md, per baseline), not from the code under test: VTW's choice of k,
PruMerge's neighbour count, SparseVLM's rank rule, HiRED's raster regions; and the per-model
constants the presets choose."""

import math

import pytest
import torch
from helpers import cfg_for, shapes_inputs
from test_readings import _positions, reference_logits

import lazyattn
from harness.method import method_settings
from lazyattn import VTW, choose_withdrawal_layer, withdrawal_kl
from lazyattn.vtw import search_start

# --------------------------------------------------------------------------- VTW


def _log_softmax_by_hand(logits):
    logits = logits.double()
    top = logits.max(dim=-1, keepdim=True).values
    return logits - top - torch.log(torch.exp(logits - top).sum(dim=-1, keepdim=True))


@torch.no_grad()
def test_vtw_release_kl_profile_equals_the_hand_written_rule(tiny):
    """KL(withdrawn || dense) = sum_v p_w (log p_w - log p_d) of the next token after each prompt,
    the withdrawn model written by hand (test_readings.reference_logits with the image columns
    gone from layer k on), averaged over one-sample batches, for k from the scaled start on."""
    n = tiny.n_layers
    start = search_start(n)
    assert (n, start) == (12, 2)  # round(5 * 12 / 32): the release's layer 5 of 32, scaled
    batches = [shapes_inputs(tiny, n=1, offset=i) for i in range(3)]
    expected = [None] * (start - 1) + [0.0] * (n - start + 1)
    for batch in batches:
        ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
        positions = _positions(mask)
        dense = _log_softmax_by_hand(reference_logits(tiny.model, ids, mask, pixels, positions)[0, -1])
        text = ids != tiny.model.config.image_token_id
        for k in range(start, n):
            withdrawn = _log_softmax_by_hand(
                reference_logits(tiny.model, ids, mask, pixels, positions, keep_from=(k, text))[0, -1])
            p = withdrawn.exp()
            expected[k - 1] += float((p * (withdrawn - dense)).sum()) / len(batches)
    got = withdrawal_kl(tiny.model, batches, rule="release")
    assert got[: start - 1] == [None] * (start - 1) and got[-1] == 0.0
    assert got[start - 1 :] == pytest.approx(expected[start - 1 :], rel=1e-4, abs=1e-7)
    assert min(got[start - 1 : -1]) > 0
    # the direction matters: the suffix rule's KL(dense || withdrawn) is another profile
    suffix = withdrawal_kl(tiny.model, batches[:1], rule="suffix")
    assert suffix[0] is not None and suffix[start - 1] != pytest.approx(got[start - 1], rel=1e-3)


def test_vtw_release_choice_is_the_first_layer_within_eta():
    kl = [None, None, None, None, 0.01, 0.002, 0.004, 0.001, 0.0]  # k = 1 .. 9, searched from 5
    assert choose_withdrawal_layer(kl, 0.003) == 6  # first <= eta, though k=7 is above it again
    assert choose_withdrawal_layer(kl, 0.002) == 6  # <= is non-strict
    assert choose_withdrawal_layer(kl, 0.0015) == 8
    assert choose_withdrawal_layer(kl, 1.0) == 5  # never before the search's start
    assert choose_withdrawal_layer(kl[:-1] + [0.5], 0.0001) == 9  # none within eta: nothing withdrawn
    # the harness's earlier rule, by name: the suffix from which every later layer is within eta
    assert choose_withdrawal_layer(kl, 0.003, rule="suffix") == 8
    assert choose_withdrawal_layer(kl, 0.005, rule="suffix") == 6


def test_vtw_search_start_by_depth():
    assert [search_start(n) for n in (32, 40, 12, 24, 28, 80)] == [5, 5, 2, 4, 4, 12]
    assert search_start(32, "suffix") == 1


@pytest.mark.parametrize("model, eta", [("llava15_7b", 0.003), ("llava15_13b", 0.0005),
                                        ("llava_next_vicuna_7b", 0.0001), ("llava_next_vicuna_13b", 0.003),
                                        ("llava_tiny", 0.003)])
def test_vtw_eta_is_chosen_per_model_preset(model, eta):
    cfg = cfg_for(f"model={model}", "method=vtw")
    assert cfg.method.eta == eta and cfg.method.rule == "release" and cfg.method.k == "auto"
    composed = cfg_for(f"model={model}", "method=lazy_vtw")
    assert composed.method.vtw.eta == eta and composed.method.vtw.rule == "release"
    assert cfg_for(f"model={model}", "method=vtw", "method.eta=0.05").method.eta == 0.05  # explicit wins


@pytest.mark.parametrize("make, message", [
    (lambda: VTW(k=3, rule="last"), "VTW rule must be 'release'"),
    (lambda: VTW(k=3, eta=-1.0), "VTW eta (the KL threshold, nats) must be a number >= 0"),
])
def test_bad_vtw_rule_settings_are_refused_in_one_line(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        make()
    assert "\n" not in str(err.value)


def test_vtw_params_record_the_rule():
    method = lazyattn.build(method_settings(cfg_for("method=vtw", "method.k=4").method))
    assert method.params() == {"k": 4, "rule": "release", "eta": 0.003}
    assert math.isfinite(method.eta)


# --------------------------------------------------------------------------- PruMerge / PruMerge+


def test_prumerge_neighbour_count_keeps_the_released_fraction():
    from lazyattn.prumerge import neighbour_count

    # by hand: 32 of 576 is 1/18 of the tokens; round(N / 18), at least 1, at most N - 1
    assert [neighbour_count(32, n) for n in (576, 2880, 64, 16, 2)] == [32, 160, 4, 1, 1]
    assert [neighbour_count(32, n, "capped") for n in (576, 64, 16)] == [32, 32, 15]
    assert neighbour_count(0, 64) == 0 and neighbour_count(8, 576) == 8
    labels = [lazyattn.PruMerge(neighbours_rule=r).label(12) for r in ("scaled", "capped")]
    assert labels == ["PruMerge+", "PruMerge+ k capped"]


# --------------------------------------------------------------------------- HiRED


def test_hired_regions_default_is_the_released_raster_reshape_and_labels_name_it():
    from lazyattn.hired import region_counts

    assert lazyattn.HiRED().regions == "raster" and cfg_for("method=hired").method.regions == "raster"
    assert [lazyattn.HiRED(regions=r).label(12) for r in ("raster", "spatial")] == ["HiRED B=0.2 raster",
                                                                                  "HiRED B=0.2 spatial"]
    # a 4x4 token grid, 2x2 sub-images; selected: the whole top-left quadrant (rows 0-1, cols 0-1)
    selected = torch.zeros(16, dtype=torch.bool)
    selected[[0, 1, 4, 5]] = True
    # raster: runs of 4 consecutive indices = one full grid row each: rows 0 and 1 go to sub-images 0, 1
    assert region_counts(selected, (2, 2), "raster").tolist() == [2, 2, 0, 0]
    assert region_counts(selected, (2, 2), "spatial").tolist() == [4, 0, 0, 0]


# --------------------------------------------------------------------------- SparseVLM


def test_sparsevlm_rank_keep_count_by_hand():
    from lazyattn.sparsevlm import rank_keep_count

    # the rule: keep min(int(rank * scale + bias), V - 1); full rank V keeps everything
    assert rank_keep_count(2, 10, 2.0, 1.0) == 5
    assert rank_keep_count(3, 576, 13.5, 0.0) == 40  # int(40.5) truncates
    assert rank_keep_count(40, 576, 13.5, 0.0) == 540
    assert rank_keep_count(50, 576, 13.5, 0.0) == 575  # capped at V - 1: at least one token goes
    assert rank_keep_count(1, 576, 0.8, 0.0) == 0
    assert rank_keep_count(10, 10, 0.8, 0.0) == 10


@pytest.mark.parametrize("n_layers, v15, rank", [(32, [2, 6, 15], [2, 6, 15, 19]), (40, [2, 6, 15], [2, 6, 15, 19]),
                                                 (24, [2, 6, 15], [2, 6, 15, 19]), (12, [1, 2, 6], [1, 2, 6, 7])])
def test_sparsevlm_scoring_layers_are_the_released_ones_unless_too_shallow(n_layers, v15, rank):
    method, ranked = lazyattn.SparseVLM(), lazyattn.SparseVLM(schedule="rank")
    assert method.scoring_layers(n_layers) == v15 and ranked.scoring_layers(n_layers) == rank
    scaled = ", layers scaled" if n_layers == 12 else ""
    assert method.label(n_layers) == f"SparseVLM 192 (v1.5{scaled})"
    assert ranked.label(n_layers) == f"SparseVLM 192 (rank{scaled})"
    assert lazyattn.SparseVLM(schedule="rank", scale=2, bias=1).label(32) == "SparseVLM rank x2+1"


@pytest.mark.parametrize("spec, message", [
    ({"schedule": "topk"}, "SparseVLM schedule must be 'v1.5'"),
    ({"schedule": "rank", "keep": [3, 2, 1]}, "keep=.* is for schedule=v1.5"),
    ({"scale": 2.0}, "scale and bias belong to schedule=rank"),
    ({"schedule": "rank", "budget": 100}, "takes budget"),
])
def test_bad_sparsevlm_schedules_are_refused(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        lazyattn.SparseVLM(**spec)
    assert "\n" not in str(err.value)


def _embeddings(model, inputs):
    captured = {}
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda m, a, kw: captured.update(x=kw["inputs_embeds"]), with_kwargs=True)
    try:
        out = model(**inputs, output_attentions=True)
    finally:
        handle.remove()
    return captured["x"][0].double(), out.attentions


@torch.no_grad()
def test_sparsevlm_rank_rule_keeps_what_the_rater_attention_rank_says(tiny_eager):
    """At the first scoring layer (the model is still dense there), by hand: raters from the input
    embeddings, the head-averaged attention of their rows over the image columns from the dense
    model's own attention weights, numpy's matrix rank, keep min(int(rank * 2 + 1), V - 1) and the
    tokens of highest rater-mean attention."""
    import numpy as np

    from lazyattn.engine import PruneEngine

    model = tiny_eager.model
    method = lazyattn.SparseVLM(schedule="rank", scale=2.0, bias=1.0, recycle=0.0)
    first = method.scoring_layers(tiny_eager.n_layers)[0]
    for offset in range(3):
        inputs = shapes_inputs(tiny_eager, n=1, offset=offset)
        ids = inputs["input_ids"][0]
        image = (ids == model.config.image_token_id).nonzero()[:, 0]
        embeds, attentions = _embeddings(model, inputs)
        text = torch.arange(int(image.max()) + 1, len(ids))
        relevance = torch.softmax(embeds[image] @ embeds[text].T, dim=-1).mean(dim=0)
        raters = text[relevance > relevance.mean()]
        attn = attentions[first][0].double().mean(dim=0)  # (T, T), head-averaged
        rater_rows = attn[raters][:, image]
        rank = int(np.linalg.matrix_rank(rater_rows.float().numpy()))
        n_visual = len(image)
        keep = n_visual if rank == n_visual else min(int(rank * 2.0 + 1.0), n_visual - 1)
        expected = sorted(image[rater_rows.mean(dim=0).argsort(descending=True)[:keep]].tolist())
        engine = PruneEngine(model, method)
        with engine.install():
            model(**inputs)
            stage = engine.stages[0]
        assert 0 < keep < n_visual
        assert sorted(stage.source[0][stage.image[0]].tolist()) == expected


@torch.no_grad()
def test_sparsevlm_rank_rule_batched_equals_each_sample_alone(tiny):
    """Per-sample counts: a padded batch (shorter samples padded inside the stage) gives each
    sample's own logits."""
    model = tiny.model
    method = lazyattn.SparseVLM(schedule="rank", scale=1.0, bias=1.0)
    inputs = shapes_inputs(tiny, n=3)
    from lazyattn.engine import PruneEngine

    engine = PruneEngine(model, method)
    with engine.install():
        batched = model(**inputs).logits
        lengths = engine.stages[-1].real.sum(dim=1).tolist()
    for b in range(3):
        real = inputs["attention_mask"][b].bool()
        one = {"input_ids": inputs["input_ids"][b : b + 1, real], "attention_mask": inputs["attention_mask"][b : b + 1, real],
               "pixel_values": inputs["pixel_values"][b : b + 1]}
        with engine.install():
            single = model(**one).logits
        assert torch.allclose(batched[b, -1], single[0, -1], atol=1e-4, rtol=1e-4)
    assert len(set(lengths)) > 1  # the samples keep different counts here, so the stage is padded


@torch.no_grad()
def test_sparsevlm_rank_rule_cached_generation_batched_equals_alone(tiny):
    """Decoding on the padded stages' cache: a batch generates what each sample generates alone."""
    model = tiny.model
    method = lazyattn.SparseVLM(schedule="rank", scale=1.0, bias=1.0)
    inputs = shapes_inputs(tiny, n=3)
    image_id = model.config.image_token_id
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, suppress_tokens=[image_id])
    with method.apply(model):
        batched = model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1]:]
        for b in range(3):
            real = inputs["attention_mask"][b].bool()
            one = model.generate(input_ids=inputs["input_ids"][b : b + 1, real],
                                 attention_mask=inputs["attention_mask"][b : b + 1, real],
                                 pixel_values=inputs["pixel_values"][b : b + 1], **kwargs)
            assert batched[b].tolist() == one[0, int(real.sum()):].tolist()
