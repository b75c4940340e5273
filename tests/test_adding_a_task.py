"""A task added from this file alone (``harness.tasks.register``: no file in harness/, no YAML in
conf/task/), as docs/tasks.md "Adding a task" says: the command line takes it (``task=colourhit``),
and it runs through ``run`` (dense beside the
method, the headline, efficiency), W&B (offline) and the report, which learn what it scores only
from the metrics it declares (``harness.metrics``). Nothing in the harness names it."""

import dataclasses
import json
from pathlib import Path

import pytest

from harness import compare, metrics, report, tasks
from harness.config import compose
from harness.generate import Conversation, answer
from harness.metrics import Metric, Metrics
from harness.run import run
from harness.tasks import BaseTask, Evaluation, shapes
from helpers import harness_cli, harness_precheck


@dataclasses.dataclass
class ColourHit(BaseTask):
    """The shapes test split's colour questions, each scored by ``hit``: whether the answer names the
    right colour anywhere (a looser scorer than shapes' exact match), grouped by the asked shape."""

    name: str
    n: int = 6
    budget: int = 4

    metrics = Metrics((Metric("hit", title="Hit"),), group="shape")

    def check(self):
        if self.budget < 1:
            raise ValueError(f"task.budget must be >= 1, got {self.budget}.")

    def evaluate(self, loaded, method, *, limit, batch_size, device, work_dir, finished, on_row, cache="static"):
        samples = shapes.load_split("test", self.n if limit is None else limit, ["colour"])
        asked = [Conversation.of_questions(s.id, s.questions, [self.budget], [s.image(64)]) for s in samples]
        rows = []
        with method.apply(loaded.model):
            for s, a in zip(samples, answer(loaded.model, loaded.processor, asked, batch_size, device, cache=cache)):
                shape = s.questions[0].split()[-2]  # "what colour is the <shape> ?"
                row = {"id": s.id, "prediction": a.prediction, "target": s.answers[0], "shape": shape,
                       "hit": float(s.answers[0] in a.prediction.split()), "turns": a.turns, "kv_bytes": a.kv_bytes}
                on_row(row)
                rows.append(row)
        hits = [r["hit"] for r in rows]
        scores = {"n": len(rows), "hit": sum(hits) / len(hits), "hit_ci95": compare.ci95(self.metrics.metrics[0], hits)}
        for shape in dict.fromkeys(r["shape"] for r in rows):
            sub = [r["hit"] for r in rows if r["shape"] == shape]
            scores[shape] = {"n": len(sub), "hit": sum(sub) / len(sub)}
        first = asked[0]
        return Evaluation({self.name: scores}, rows, (first.history, first.images))


@pytest.fixture(scope="module", autouse=True)
def registered():
    if "colourhit" not in tasks.TASKS.names():
        tasks.register("colourhit", lambda cfg: ColourHit(name=str(cfg.name), n=int(cfg.n), budget=int(cfg.budget)),
                       {"n": 6, "budget": 4})
    yield
    tasks.TASKS._items.pop("colourhit", None)


def test_a_registered_task_runs_through_run_wandb_and_the_report(tmp_path):
    assert compose(["task=colourhit"]).task == {"n": 6, "budget": 4, "name": "colourhit"}  # its preset
    root = tmp_path / "results"
    path = run(compose(["task=colourhit", "task.budget=3", "model=llava_tiny", "method=lazy", "method.layers=null",
                        "method.ratio=0.5", "limit=4", "batch_size=4", "efficiency.new_tokens=2",
                        "efficiency.repeats=1", "efficiency.warmup=0", "efficiency.batch_size=1",
                        "wandb.mode=offline", f"out_dir={root / 'lazy'}"]))
    result = json.loads(path.read_text())

    # run: its declaration recorded, the headline and the comparison with dense computed from it
    assert result["metrics"] == {"colourhit": ColourHit.metrics.to_json()}
    scores, dense = result["tasks"]["colourhit"], result["tasks_dense"]["colourhit"]
    rows = [json.loads(line) for line in (root / "lazy" / "samples.jsonl").read_text().splitlines()]
    method_rows = [r for r in rows if r["variant"] == "method"]
    assert len(method_rows) == 4 and scores["n"] == 4 and all(r["hit"] in (0.0, 1.0) for r in method_rows)
    head = result["headline"]
    assert head["task"] == "colourhit" and head["acc_samples"] == scores["hit"]
    assert head["acc_mean_types"] == pytest.approx(
        sum(v["hit"] for v in scores.values() if isinstance(v, dict) and "n" in v) / len({r["shape"] for r in method_rows}))
    paired = {r["id"]: r["hit"] for r in rows if r["variant"] == "dense"}
    assert head["delta_score"] == pytest.approx(sum(r["hit"] - paired[r["id"]] for r in method_rows) / 4)
    assert scores["delta"] == pytest.approx(head["delta_score"])  # the overall delta, of the declared metric
    assert 0 < head["kv_cut_workload"] < 1 and head["kv_cut_timing_batch"] > 0  # half the layers lazy
    assert result["dense_below_floor_tasks"] == ([] if dense["hit"] >= 0.1 else ["colourhit"])
    assert set(result["fidelity"]) >= {"exact_match", *{r["shape"] for r in method_rows}}  # per declared group

    # W&B (offline): the scores table holds the declared metric, overall and per group
    run_dir, = (root / "lazy" / "wandb").glob("offline-run-*")
    table, = (run_dir / "files" / "media" / "table").glob("scores_*.table.json")
    logged = json.loads(table.read_text())
    assert {row[logged["columns"].index("metric")] for row in logged["data"]} == {"hit"}
    assert [row[1:4] for row in logged["data"] if row[1] == "all"] == [["all", "hit", scores["hit"]]]

    # the report: the tasks table shows it by its declared metric; the shapes tables refuse it in one line
    results = report.collect(root)
    header, table_rows = report.benchmark_table(results)
    assert header[:3] == ["Method", "Model", "colourhit Hit"]
    by_label = {row[0]: row for row in table_rows}
    assert set(by_label) == {result["method"]["label"], "Dense (in-run)"}
    assert by_label[result["method"]["label"]][2] == f"{100 * scores['hit']:.1f}"
    assert by_label["Dense (in-run)"][2] == f"{100 * dense['hit']:.1f}"
    assert by_label[result["method"]["label"]][3] == f"{100 * head['kv_cut_timing_batch']:.1f} %"
    written = report.render("tasks", root, tmp_path / "out")
    assert [p.name for p in written] == ["tasks.md", "tasks.tex"] and "colourhit Hit" in written[0].read_text()
    with pytest.raises(report.NothingToRender, match="the main table has nothing to show .* colourhit"):
        report.render("main", root, tmp_path / "out")
    names = {p.name for p in report.render("all", root, tmp_path / "all")}  # what can be filled; the rest named
    assert {"tasks.md", "efficiency.md"} <= names and not names & {"main.md", "protocol.md", "paper.md"}
    assert not (tmp_path / "out" / "tables" / "main.md").exists()


def test_the_command_line_takes_it(tmp_path, monkeypatch, capfd):
    """``python -m harness task=colourhit`` in this process: its checks before Hydra accept the task and
    its settings like a shipped one's, and refuse a typo in one line naming it among the presets;
    Hydra's main composes and builds it (its own check refuses budget 0, exit 2, before any model loads)."""
    line = ["model=llava_tiny_random", f"out_dir={tmp_path / 'r'}"]
    assert harness_precheck(["task=colourhit", "task.budget=3", *line], monkeypatch, capfd) == (None, "")
    status, err = harness_precheck(["task=colourhitt", *line], monkeypatch, capfd)
    assert status == 2 and err.strip() == (
        "error: unknown task preset 'colourhitt' (in 'task=colourhitt'); did you mean 'colourhit'? the presets: "
        "benchmarks, colourhit, paper, shapes, shapes_lmms, vlmeval (conf/task/ and registered).")
    status, err = harness_precheck(["task=colourhit", "task.budgt=3", *line], monkeypatch, capfd)
    assert status == 2 and err.startswith("error: unknown setting 'task.budgt' (in 'task.budgt=3'); "
                                          "did you mean 'task.budget'? task has: n, budget, name."), err
    status, out, err = harness_cli(["task=colourhit", "task.budget=0", *line], monkeypatch, capfd)
    assert (status, err.strip().splitlines()[-1]) == (2, "error: task.budget must be >= 1, got 0."), err
    assert not (tmp_path / "r").exists()


def test_the_row_contract_is_one_line():
    with pytest.raises(ValueError, match=r"a task's row lacks id \(harness.metrics.ROW\)"):
        metrics.check_row({"prediction": "red"})
    assert set(metrics.REQUIRED) <= set(metrics.ROW)
    # a declaration is read back from result.json as it was written
    assert Metrics.from_json(ColourHit.metrics.to_json()) == ColourHit.metrics
    with pytest.raises(ValueError, match="an interval needs per-sample values"):
        Metric("pope_f1", aggregation="lmms_eval")


def test_the_docs_say_how(tmp_path):
    doc = (Path(__file__).resolve().parent.parent / "docs" / "tasks.md").read_text()
    section = doc[doc.index("## Adding a task"):]
    for word in ("harness.tasks.register", "BaseTask", "metrics_for", "Metric(", "harness.metrics.ROW",
                 "python -m harness.report tasks"):
        assert word in section, word
