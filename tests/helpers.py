"""Helpers shared by test modules (imported as ``from helpers import ...``; pytest puts tests/ on the path)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def cfg_for(*overrides):
    """The harness config composed from conf/ with ``overrides``, as ``python -m harness`` would."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def shapes_inputs(loaded, n=3, offset=0, qtypes=None):
    """Left-padded first-turn prompts of shapes test samples ``offset .. offset+n-1`` for ``loaded``."""
    from harness.generate import conversation, prompt_inputs
    from harness.tasks import shapes

    samples = shapes.load_split("test", n + offset, qtypes)[offset:]
    histories = [conversation(s.questions[:1], []) for s in samples]
    return prompt_inputs(loaded.processor, histories, [s.image(64) for s in samples], "cpu")


def harness_precheck(args, monkeypatch, capsys):
    """``python -m harness ARGS`` as far as its checks before Hydra (``harness.__main__.precheck``), in
    this process: (exit status, or None where nothing refused it; stderr). A few tests run the real
    process too; this keeps the many refusal cases from each paying its start-up (about 10 s)."""
    import sys

    from harness.__main__ import precheck

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["harness", *args])
    try:
        precheck()
    except SystemExit as exit:
        return exit.code, capsys.readouterr().err
    return None, capsys.readouterr().err
