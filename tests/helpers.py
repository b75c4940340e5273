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


def harness_cli(args, monkeypatch, capfd, cwd=None, env=None):
    """``python -m harness ARGS`` in this process (its pre-Hydra checks, then Hydra's main, multirun
    included): (exit status, stdout, stderr). The process start-up (about 8 s of imports) is paid once
    per test session; the entry point itself keeps one real-process test (test_harness.py). ``env``
    sets environment variables for the call (WANDB_MODE defaults to disabled). Without ``capfd`` (a
    fixture of wider scope than a test) the output is captured at the ``sys.stdout``/``sys.stderr`` level."""
    import contextlib
    import io
    import sys

    from hydra.core.global_hydra import GlobalHydra

    from harness.__main__ import main, precheck

    if cwd is not None:
        monkeypatch.chdir(cwd)
    for key, value in {"WANDB_MODE": "disabled", **(env or {})}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["harness", *[str(a) for a in args]])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        if capfd is None:
            stack.enter_context(contextlib.redirect_stdout(out))
            stack.enter_context(contextlib.redirect_stderr(err))
        else:
            capfd.readouterr()
        status = 0
        try:
            precheck()
            main()
        except SystemExit as exit:
            status = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        finally:
            GlobalHydra.instance().clear()  # Hydra's main leaves itself initialised; compose() needs it clear
    if capfd is not None:
        return (status, *capfd.readouterr())
    return status, out.getvalue(), err.getvalue()
