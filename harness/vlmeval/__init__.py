"""VLMEvalKit (OpenCompass's evaluation kit, PyPI ``ms-vlmeval``) as a second evaluation backend.

    python -m harness model=llava_tiny method=lazy task=vlmeval 'task.datasets=[shapes_yorn,shapes_mcq]'

VLMEvalKit lives in an environment of its own, ``.venv-vlmeval`` (``make vlmeval-install``,
tools/vlmeval_env.py): it imports torchvision, and no torchvision wheel here loads with the
project's CPU torch. A ``task=vlmeval`` command started from any other Python re-executes itself
there (``reexec``), so the whole run, model and VLMEvalKit, is one process.

- ``harness.vlmeval.model``: ``LazyAttnVLM``, a VLMEvalKit model (``vlmeval.vlm.base.BaseModel``)
  built on the harness's model loading and any ``lazyattn`` method; usable from VLMEvalKit's own
  ``infer_data_job``.
- ``harness.vlmeval.data``: local TSVs only (``$LMUData`` / ``task.data_dir``), checked before the
  model loads; VLMEvalKit's downloads are turned into one-line errors.
- ``harness.vlmeval.backend``: the ``task=vlmeval`` route (VLMEvalKit's prompts, inference job and
  scoring, in process; the harness's result.json beside VLMEvalKit's files).
- ``harness.vlmeval.export_shapes``: the shapes benchmark as VLMEvalKit TSVs.

``import vlmeval`` turns off SSL certificate verification for the whole process and configures
the root logger; ``import_vlmeval`` undoes both, and nothing outside this package imports it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import ssl
import sys
from pathlib import Path

VENV = Path(__file__).resolve().parents[2] / ".venv-vlmeval"
INSTALL = "make vlmeval-install"


def available() -> bool:
    """VLMEvalKit's package is importable (a folder named vlmeval on the path, a namespace package, is not it)."""
    spec = importlib.util.find_spec("vlmeval")
    return spec is not None and spec.origin is not None


def require() -> None:
    """A ValueError of one line when VLMEvalKit cannot be imported in this Python."""
    if not available():
        raise ValueError(
            f"task=vlmeval needs VLMEvalKit, which this Python ({sys.executable}) does not have; run `{INSTALL}` "
            f"and start the command with {VENV}/bin/python (python -m harness does so itself when it exists)."
        )


def import_vlmeval():
    """``import vlmeval`` with the process's SSL default context and root logging as they were."""
    context = ssl._create_default_https_context
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    logging.disable(logging.ERROR)  # its complaint about a missing .env file of API keys
    try:
        import vlmeval
    finally:
        logging.disable(logging.NOTSET)
        ssl._create_default_https_context = context
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    return vlmeval


def wants_vlmeval(argv: list[str]) -> bool:
    """Whether a ``python -m harness`` command line picks the VLMEvalKit task."""
    return any(a.split("=", 1)[0].lstrip("+~") in ("task", "task.backend") and a.split("=", 1)[-1] == "vlmeval"
               for a in argv)


def reexec(argv: list[str]) -> None:
    """Run ``python -m harness ARGV`` in VLMEvalKit's environment when this Python lacks VLMEvalKit
    and the command asks for it; returns only when nothing is to be done."""
    if not wants_vlmeval(argv) or available():
        return
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"error: task=vlmeval needs VLMEvalKit's environment {VENV}; run `{INSTALL}` first.", file=sys.stderr)
        raise SystemExit(2)
    print(f"task=vlmeval: running in VLMEvalKit's environment ({python})", file=sys.stderr, flush=True)
    os.execv(str(python), [str(python), "-m", "harness", *argv])
