"""The shipped, trained tiny LLaVA: loads offline, really answers, and is the main experiment's default."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from harness import ASSETS
from harness.models.local import load_local
from harness.models import load_model
from harness.tasks import ShapesTask, shapes

CONF = Path(__file__).resolve().parent.parent / "conf"
MODEL_DIR = ASSETS / "llava_tiny"
SHIPPED = ("llava_tiny", "llava_tiny_deep")  # the default and its deeper variant, same recipe

# Floors on the first 160 test samples (20 per question type), for the shipped model; "acc" for the
# short answers and the dialogue's last turn, "f1" for describe and long (fact-F1). Each floor must beat what answering without the image reaches on
# this slice (the majority answer's share; for describe, the best F1 of one fixed description), and
# the test checks that too, so a random or image-blind model fails.
SLICE = 160
FLOORS = {
    "colour": ("acc", 0.9), "exist": ("acc", 0.9), "count": ("acc", 0.9), "position": ("acc", 0.9),
    "describe": ("f1", 0.9), "multiturn": ("acc", 0.85), "long": ("f1", 0.85), "dialogue": ("acc", 0.85),
}
# The deeper variant learned position a little less well (0.94 on the 50-per-type test split).
DEEP_FLOORS = {**FLOORS, "position": ("acc", 0.85)}


@pytest.mark.parametrize("name", SHIPPED)
def test_weights_are_small_and_offline_loadable(name):
    weights = list((ASSETS / name).glob("*.safetensors"))
    assert weights and sum(w.stat().st_size for w in weights) < 25 * 2**20
    model = LlavaForConditionalGeneration.from_pretrained(ASSETS / name, local_files_only=True)
    text = model.config.text_config
    assert text.num_hidden_layers >= 12 and text.num_key_value_heads < text.num_attention_heads  # GQA
    info = json.loads((ASSETS / name / "training.json").read_text())
    assert info["seed"] == 0 and info["steps"] > 0
    assert [s["name"] for s in info["stages"]] == ["A", "B", "C", "D", "E", "F"]
    assert len(info["divergence"]["adjacent"]) == text.num_hidden_layers - 1


def image_blind_best(samples, qtype: str) -> float:
    """What one fixed answer scores on this slice's ``qtype`` samples (the best such answer)."""
    rows = [s for s in samples if s.qtype == qtype]
    golds = [s.answers[-1] for s in rows]
    metric = "f1" if qtype in ("describe", "long") else "acc"
    return max(
        sum(shapes.score_sample(s, guess)[metric] for s in rows) / len(rows) for guess in set(golds)
    )


@torch.no_grad()
@pytest.mark.parametrize("name", SHIPPED)
def test_dense_accuracy_is_far_above_an_image_blind_model(name):
    trained = load_local(ASSETS / name, name=name)
    task = ShapesTask("shapes", "test", SLICE, list(shapes.QTYPES), 64, {"short": 8, "describe": 48, "long": 160})
    samples = task.samples(None)
    predictions = task.predictions(trained.model, trained.processor, samples, 24, torch.device("cpu"))
    scores = task.score(samples, predictions)
    failures = []
    for qtype, (metric, floor) in (DEEP_FLOORS if name == "llava_tiny_deep" else FLOORS).items():
        blind = image_blind_best(samples, qtype)
        assert blind + 0.2 < floor, f"{qtype}: the floor {floor} must beat an image-blind answer ({blind:.2f})"
        if scores[qtype][metric] < floor:
            failures.append(f"{qtype} {metric} {scores[qtype][metric]:.3f} < {floor}")
    assert not failures, failures


def test_training_data_never_overlaps_test_scenes():
    """Every training sample the shipped model saw (train split, indices 0..pool_size-1, seeded
    differently from test) shows a scene that no test or val sample shows."""
    pool_size = json.loads((MODEL_DIR / "training.json").read_text())["pool_size"]
    train = {shapes._make_sample("train", i, "colour", 1).scene for i in range(pool_size)}
    held_out = {s.scene for split in ("test", "val") for s in shapes.load_split(split, 3000, ["colour"])}
    assert len(train) > pool_size // 4 and not train & held_out


def test_main_experiment_uses_the_trained_model():
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", overrides=["+exp=llava_lazy"])
    assert cfg.model.name == "llava_tiny" and cfg.method.layers == "auto"
    loaded = load_model(cfg.model)
    assert loaded.name == "llava_tiny" and loaded.n_layers >= 12


def test_shortened_recipe_is_deterministic_and_saves_no_auxiliary_heads(tmp_path):
    """All stages (A-F) at 0.4 % of their steps and pools (one to six steps each), twice with seed 0:
    identical weights, and the same again when F is resumed from the snapshot after E (how the shipped
    models got F); the checkpoint holds exactly the LLaVA parameters (the training heads are dropped)."""
    from harness.tools import train_tiny

    stages = train_tiny.scaled(train_tiny.STAGES, 0.004)
    runs = []
    for name in ("a", "b"):
        info = train_tiny.train(tmp_path / name, seed=0, batch_size=4, threads=1, stages=stages, work=tmp_path / "w",
                                evaluate=False, profile=False)
        assert [s["name"] for s in info["stages"]] == ["A", "B", "C", "D", "E", "F"]
        assert {"attn", "readout", "match"} <= set(info["loss"][-1])  # stage F trains with the auxiliary losses
        runs.append(load_file(tmp_path / name / "model.safetensors"))
    resumed = train_tiny.train(tmp_path / "c", seed=0, batch_size=4, threads=1, stages=stages, work=tmp_path / "w2",
                               evaluate=False, profile=False, first_stage="F", resume_from=tmp_path / "w" / "stageE")
    assert resumed["resumed_at"] == "F" and [s["name"] for s in resumed["stages"]] == ["A", "B", "C", "D", "E", "F"]
    runs.append(load_file(tmp_path / "c" / "model.safetensors"))
    assert runs[0].keys() == runs[1].keys() == runs[2].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) and torch.equal(runs[0][k], runs[2][k]) for k in runs[0])
    train_tiny.build_untrained(0).model.save_pretrained(tmp_path / "untrained")
    assert set(runs[0]) == set(load_file(tmp_path / "untrained" / "model.safetensors"))
    loaded = load_local(tmp_path / "a", name="x")
    assert loaded.model.config.text_config.num_hidden_layers == train_tiny.ARCH["text"]["layers"]
