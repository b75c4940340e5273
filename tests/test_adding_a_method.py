"""docs/methods.md "Adding a method", done as written on a copy of the repository: one file in
lazyattn/, one YAML in conf/method/, two lines (the import and the entry) in lazyattn/__init__.py.
Then the method registry's own tests pass for it, the command line runs it, and the tables label it."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MYMETHOD = '''
import contextlib
import dataclasses

from lazyattn.arch import decoder_layers
from lazyattn.base import Plan


@dataclasses.dataclass
class MyMethod:
    """Watches the first decoder layer and changes nothing, with one setting: the smallest method."""

    note: int = 1
    name = "mymethod"

    def __post_init__(self):
        if self.note < 0:
            raise ValueError(f"MyMethod note must be >= 0, got {self.note}.")

    @contextlib.contextmanager
    def apply(self, model):
        handle = decoder_layers(model)[0].register_forward_pre_hook(lambda module, args: None)
        try:
            yield model
        finally:
            handle.remove()

    def params(self):
        return {"note": self.note}

    def label(self, n_layers):
        return f"MyMethod note={self.note}"

    def sort_key(self, n_layers):
        return (self.note,)

    def plan(self, n_layers):
        return Plan(schedule=f"watches layer 0, changes nothing (note={self.note})", series="mymethod")
'''

MYMETHOD_CLI = '''
from pathlib import Path

from helpers import harness_cli

OUT = Path(__file__).resolve().parent.parent / "run"


def test_the_command_line_runs_it(monkeypatch, capfd, tmp_path):
    status, out, err = harness_cli(["method=mymethod", "method.note=3", "model=llava_tiny_random", "limit=2",
                                    "batch_size=2", "efficiency.enabled=false", f"out_dir={OUT}"],
                                   monkeypatch, capfd, cwd=tmp_path)
    assert status == 0, err[-2000:]
    assert "method: MyMethod note=3 [mymethod]: watches layer 0, changes nothing (note=3)" in out


def test_it_reaches_the_gpu_matrix():
    from harness.gpu_check import matrix

    assert all(matrix.entries(family)["mymethod"] == {"name": "mymethod"} for family in matrix.FAMILIES)


def test_a_bad_setting_is_one_line(monkeypatch, capfd, tmp_path):
    status, _, err = harness_cli(["method=mymethod", "method.nothere=1"], monkeypatch, capfd, cwd=tmp_path)
    assert status == 2 and "method mymethod has no setting 'nothere'" in err, err
'''


def test_adding_a_method_as_the_docs_say(tmp_path):
    doc = (ROOT / "docs" / "methods.md").read_text()
    section = doc[doc.index("## Adding a method"):doc.index("## Numbers to compare against")]
    assert "Three places, nothing else" in section and "two lines" in section.lower()

    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "lazyattn", repo / "lazyattn", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "harness", repo / "harness", ignore=shutil.ignore_patterns("__pycache__", "assets", "data"))
    (repo / "harness" / "assets").symlink_to(ROOT / "harness" / "assets")
    shutil.copytree(ROOT / "conf", repo / "conf")
    shutil.copytree(ROOT / "tests", repo / "tests", ignore=shutil.ignore_patterns("__pycache__"))

    # 1. one file in lazyattn/
    (repo / "lazyattn" / "mymethod.py").write_text(MYMETHOD)
    # 2. one YAML in conf/method/: name plus one key per field with its default
    (repo / "conf" / "method" / "mymethod.yaml").write_text("name: mymethod\nnote: 1\n")
    # 3. two lines in lazyattn/__init__.py: the import and the registry entry
    init = (repo / "lazyattn" / "__init__.py").read_text()
    init = init.replace("from lazyattn.vtw import", "from lazyattn.mymethod import MyMethod\nfrom lazyattn.vtw import", 1)
    init, n = re.subn(r'(METHODS: dict\[str, Callable\[\.\.\., Method\]\] = \{\n(?:    .*\n)*?)\}',
                      r'\1    "mymethod": MyMethod,\n}', init, count=1)
    assert n == 1
    (repo / "lazyattn" / "__init__.py").write_text(init)

    # the registry's own tests, and the command line (in the copy's process, through its entry point's code:
    # one interpreter start instead of three), in one pytest run on the copy
    (repo / "tests" / "test_mymethod_cli.py").write_text(MYMETHOD_CLI)
    env = {**os.environ, "PYTHONPATH": str(repo), "WANDB_MODE": "disabled"}
    tests = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "tests/test_methods.py",
                            "tests/test_mymethod_cli.py", "-k", "registry or build or apply_yields or labels or cli or gpu"],
                           cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert tests.returncode == 0, tests.stdout[-3000:]
    passed = {line.split(" PASSED")[0] for line in tests.stdout.splitlines() if " PASSED" in line}
    for name in ("test_build_every_method_from_a_dict[mymethod]",
                 "test_apply_yields_the_model_and_removes_everything[mymethod]",
                 "test_mymethod_cli.py::test_the_command_line_runs_it", "test_mymethod_cli.py::test_a_bad_setting_is_one_line",
                 "test_mymethod_cli.py::test_it_reaches_the_gpu_matrix"):
        assert any(line.endswith(name) for line in passed), (name, tests.stdout[-3000:])
    result = json.loads((repo / "run" / "result.json").read_text())
    assert result["method"]["name"] == "mymethod" and result["method"]["params"] == {"note": 3}
    assert result["headline"]["delta_score"] == 0.0  # it changes nothing: equal to dense on every sample
