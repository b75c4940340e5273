"""The shipped, trained tiny LLaVA: loads offline, really answers, and is the main experiment's default."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import LlavaForConditionalGeneration

from harness import ASSETS
from harness.generate import evaluate
from harness.models.local import load_local
from harness.models import load_model
from harness.tasks import ShapesTask, shapes

CONF = Path(__file__).resolve().parent.parent / "conf"
MODEL_DIR = ASSETS / "llava_tiny"

# Floors for the question types the shipped model has learned (count 1.00 and position 0.78 on
# this slice). Each is checked to be above what answering without the image can reach here (the
# majority answer's share: 0.38 and 0.33), so a random or image-blind model fails. Colour and
# existence are not learned (at chance; see harness/train_tiny.py and results/tiny/README.md),
# so they get no floor.
FLOORS = {"count": 0.9, "position": 0.65}


@pytest.fixture(scope="module")
def trained():
    return load_local(MODEL_DIR, name="llava_tiny")


def test_weights_are_small_and_offline_loadable():
    weights = list(MODEL_DIR.glob("*.safetensors"))
    assert weights and sum(w.stat().st_size for w in weights) < 25 * 2**20
    model = LlavaForConditionalGeneration.from_pretrained(MODEL_DIR, local_files_only=True)
    text = model.config.text_config
    assert text.num_hidden_layers >= 12 and text.num_key_value_heads < text.num_attention_heads  # GQA
    info = json.loads((MODEL_DIR / "training.json").read_text())
    assert info["seed"] == 0 and info["steps"] > 0


@torch.no_grad()
def test_dense_accuracy_is_far_above_an_image_blind_model(trained):
    task = ShapesTask("shapes", "test", 160, list(shapes.SINGLE_TURN_TYPES), 64, {"short": 8, "describe": 48})
    samples = task.samples(None)
    predictions = evaluate(trained.model, trained.processor, task, samples, 32, torch.device("cpu"))
    scores = task.score(samples, predictions)
    for qtype, floor in FLOORS.items():
        answers = [s.answers[-1] for s in samples if s.qtype == qtype]
        majority = max(answers.count(a) for a in set(answers)) / len(answers)
        assert majority < floor, f"{qtype}: the floor {floor} must beat always answering the majority ({majority:.2f})"
        assert scores[qtype]["acc"] >= floor, f"{qtype}: {scores[qtype]['acc']:.3f} < {floor}"


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


def test_training_recipe_runs_and_writes_a_loadable_checkpoint(tmp_path, monkeypatch):
    """Both stages of the recipe, shrunk to a few steps: the projector swap, the files, the log."""
    from harness.tools import train_tiny

    monkeypatch.setattr(train_tiny, "quick_eval", lambda loaded, n=120, batch_size=24: {"n": 0, "acc": 0.0})
    stages = (
        dict(steps=2, lr=1e-3, vision_lr_mult=1.0, pool_size=4, pool_offset=0, mix=train_tiny.TRAIN_MIX),
        dict(steps=2, lr=1e-3, vision_lr_mult=1.0, pool_size=4, pool_offset=4, new_projector="linear",
             mix={"describe": 1.0, "multiturn": 1.0}),
    )
    info = train_tiny.train(tmp_path, seed=0, batch_size=2, threads=1, stages=stages)
    assert [s["number"] for s in info["stages"]] == [1, 2] and info["steps"] == 4
    loaded = load_local(tmp_path, name="x")
    assert loaded.model.config.projector_hidden_act == "linear"
    assert json.loads((tmp_path / "training.json").read_text())["loss"][-1]["stage"] == 2
