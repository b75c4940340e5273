import os
import subprocess
import threading
from concurrent.futures import Future

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# one torch thread per worker when `make test` runs the suite on several workers (pytest-xdist: one
# worker a core), two when one process runs it
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
torch.set_num_threads(1 if WORKER else 2)


def _compose_once():
    """Hydra's ``compose`` for this test session, each distinct composition done once (about 0.3 s
    each; of the suite's 400-odd calls through ``cfg_for``, ``harness.config.compose`` and the key
    checks, over a quarter repeat an earlier one). Keyed on the config search path, the config name, the overrides and the
    ``method`` presets in Hydra's ConfigStore (tests register methods); every caller gets its own
    deep copy. Failures and ``return_hydra_config`` (which holds the run's time and folders) are not
    kept. Installed before any test module binds ``from hydra import compose``."""
    import copy

    import hydra
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    real, done = hydra.compose, {}

    def compose(config_name=None, overrides=None, return_hydra_config=False, strict=None):
        if return_hydra_config or not GlobalHydra.instance().is_initialized():
            return real(config_name, overrides, return_hydra_config, strict)
        key = (str(GlobalHydra.instance().config_loader().get_search_path()), config_name,
               tuple(overrides or ()), strict, repr(ConfigStore.instance().repo.get("method")))
        if key not in done:
            done[key] = real(config_name, list(overrides or ()), False, strict)
        return copy.deepcopy(done[key])

    compose.__doc__ = real.__doc__
    hydra.compose = compose


_compose_once()

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


# ---- real-process tests, run beside the rest ----------------------------------------------------------
# Each entry point keeps one test that starts it as a real process (8-20 s, most of it the interpreter's
# imports). Such a test is marked ``@pytest.mark.real_process(prepare=FUNCTION)``: at the session's start,
# for the tests selected, ``FUNCTION(tmp_dir)`` (in this thread: it may compose configs and write
# inputs) returns ``(subprocess.run keyword arguments, anything the test needs later)``; one thread then
# runs those commands one after another, while the in-process tests go on, so on two cores they overlap.
# The test itself takes the ``real_process`` fixture, ``(CompletedProcess, what prepare returned,
# tmp_dir)``, waiting for its command if it has not finished (``--durations`` shows that wait as the
# test's setup), and asserts what it always did. On a pytest-xdist worker (``make test``: the workers
# fill the cores already, and a worker cannot know which tests it will be handed) there is no thread:
# the test prepares and runs its command when it runs.


# The tests that take longest (``--durations``), started first on pytest-xdist's workers: the short ones
# then fill in behind them, and none of these is left running alone at the end. Only the order changes,
# and only on workers (in one process the real-process tests stay spread out, their commands overlapping).
RUN_FIRST = (
    "tests/test_adding_a_method.py::", "tests/test_lmms_benchmarks.py::test_caption_benchmarks",
    "tests/test_lmms_benchmarks.py::test_new_benchmarks", "tests/test_tiny_model.py::", "tests/test_sweeps.py::",
    "tests/test_multiturn.py::test_dense_carry", "tests/test_gpu_check.py::test_cpu_run", "tests/test_gpu_call.py::",
    "tests/test_cache.py::test_compiled_decode",
)


def pytest_collection_modifyitems(config, items):
    if WORKER:
        items.sort(key=lambda item: not (item.get_closest_marker("real_process") or item.nodeid.startswith(RUN_FIRST)))


def pytest_configure(config):
    config.addinivalue_line("markers", "real_process(prepare): a real-process test whose command runs beside the "
                                       "in-process tests (tests/conftest.py)")


_RUN = subprocess.run  # bound now: a test may patch subprocess.run for its own code while one of these runs


@pytest.fixture(scope="session", autouse=True)
def _real_processes(request, tmp_path_factory):
    jobs = {}
    request.session.stash[_REAL] = jobs
    if WORKER:  # each test runs its own command (real_process below)
        yield
        return
    for item in request.session.items:
        mark = item.get_closest_marker("real_process")
        if mark is not None:
            jobs[item.nodeid] = _prepared(item, tmp_path_factory)

    stop = threading.Event()

    def work():
        for kwargs, _, _, done in jobs.values():
            if done.done():
                continue
            if stop.is_set():  # the session ended early (-x, Ctrl-C): start no more
                break
            try:
                done.set_result(_RUN(**{"capture_output": True, "text": True, "check": False, **kwargs}))
            except Exception as err:
                done.set_exception(err)

    thread = threading.Thread(target=work, name="real-process tests", daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join()  # the command under way, if any


_REAL = pytest.StashKey[dict]()


def _prepared(item, tmp_path_factory):
    """``item``'s job: (subprocess.run keyword arguments, what the test needs later, its folder, a Future
    of the CompletedProcess, done already where prepare failed or left nothing to run)."""
    tmp, done = tmp_path_factory.mktemp(item.name[:40]), Future()
    try:
        kwargs, context = item.get_closest_marker("real_process").kwargs["prepare"](tmp)
        if kwargs is None:  # nothing to run (the test skips itself)
            done.set_result(None)
    except Exception as err:  # the test reports it
        done.set_exception(err)
        kwargs = context = None
    return kwargs, context, tmp, done


@pytest.fixture
def real_process(request, tmp_path_factory):
    jobs = request.session.stash[_REAL]
    if request.node.nodeid not in jobs:  # a worker's test: prepared and run now
        kwargs, context, tmp, done = jobs[request.node.nodeid] = _prepared(request.node, tmp_path_factory)
        if not done.done():
            done.set_result(_RUN(**{"capture_output": True, "text": True, "check": False, **kwargs}))
    kwargs, context, tmp, done = jobs[request.node.nodeid]
    return done.result(), context, tmp
