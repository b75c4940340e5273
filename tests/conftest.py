import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)

from harness.models import load_model  # noqa: E402
from harness.vlmeval import available as vlmeval_available  # noqa: E402
from helpers import cfg_for  # noqa: E402

# tests/vlmevalkit runs in VLMEvalKit's environment (`make test` runs it with .venv-vlmeval/bin/python);
# a Python without VLMEvalKit leaves it out (tests/test_vlmeval_cli.py drives that environment from here)
collect_ignore = [] if vlmeval_available() else ["vlmevalkit"]


def tiny_random(*overrides):
    """``model=llava_tiny_random`` with ``overrides`` (e.g. ``model.attn_implementation=eager``)."""
    return load_model(cfg_for("model=llava_tiny_random", *overrides).model)


@pytest.fixture(scope="session")
def tiny():
    """The tiny random LLaVA with a wider init, so attention is far from uniform and a wrong
    layer shows up in the logits."""
    return tiny_random("model.initializer_range=0.2")


@pytest.fixture(scope="session")
def tiny_eager():
    return tiny_random("model.initializer_range=0.2", "model.attn_implementation=eager")


@pytest.fixture
def offline_hf(monkeypatch, tmp_path):
    """No hub, no W&B, and a private datasets cache: what the lmms-eval tests run under."""
    from helpers import OFFLINE

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
