"""The VLMEvalKit backend, in VLMEvalKit's environment (``make test`` runs these with
.venv-vlmeval/bin/python; the main suite skips the folder where VLMEvalKit cannot be imported).

What is checked: VLMEvalKit's own scoring of the exported shapes sets equals the harness's scorer
on the same predictions; dense through VLMEvalKit answers what dense through the harness answers
on the same samples; a method changes the answers and the KV bytes; VLMEvalKit's own inference
job runs the model class by name; bad input fails in one line and nothing is downloaded.
"""

import base64
import json
import os
import shutil

import pytest

from harness.vlmeval import import_vlmeval

import_vlmeval()

from helpers import cfg_for, harness_cli  # noqa: E402
from vlmeval.smp import dump  # noqa: E402

from harness.settings import RunError  # noqa: E402
from harness.run import run  # noqa: E402
from harness.tasks import build as build_task  # noqa: E402
from harness.tasks import shapes  # noqa: E402
from harness.vlmeval import data as vdata  # noqa: E402
from harness.vlmeval import export_shapes  # noqa: E402

COMMON = ("model=llava_tiny", "device=cpu", "wandb.mode=disabled", "efficiency.enabled=false", "batch_size=4")


@pytest.fixture(scope="module")
def lmu(tmp_path_factory):
    root = tmp_path_factory.mktemp("LMUData")
    export_shapes.export(root, n=24)
    return root


def vlmeval_cfg(root, out, *extra):
    return cfg_for("task=vlmeval", "task.datasets=[shapes_yorn,shapes_mcq]", f"task.data_dir={root}",
                   f"out_dir={out}", *COMMON, *extra)


def rows_of(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def crafted(found, data):
    """Predictions in the harness's words, right and wrong, cycling through every option."""
    out = []
    for i, (_, line) in enumerate(data.iterrows()):
        if found.kind == "Y/N":
            out.append(["yes", "no .", "Yes."][i % 3])
        else:
            choices = export_shapes.options(shapes.load_split("test", i + 1, list(export_shapes.MCQ_QTYPES))[i])
            out.append(choices[i % len(choices)])
    return out


@pytest.mark.parametrize("name", [export_shapes.YORN, export_shapes.MCQ])
def test_vlmeval_scoring_equals_harness_scoring(lmu, tmp_path, name):
    """The same predictions scored by VLMEvalKit's evaluate (its files) and by the harness's scorer."""
    found = vdata.locate_all([name], str(lmu))[name]
    dataset = vdata.build(found, lmu)
    data = dataset.data.drop(columns=["image"]).copy()
    data["prediction"] = crafted(found, data)
    pred_file = tmp_path / f"lazyattn_{name}.xlsx"
    dump(data, str(pred_file))
    table = dataset.evaluate(str(pred_file), model=vdata.JUDGE, nproc=1)
    theirs = vdata.sample_scores(found, str(pred_file))
    ours = {str(row["index"]): shapes.score_turn(row["qtype"], row["prediction"], row["harness_answer"])["acc"]
            for _, row in data.iterrows()}
    assert theirs == ours
    assert 0 < sum(ours.values()) < len(ours)  # right and wrong answers both present
    overall = vdata.to_plain(table)["Overall"][0]
    assert overall == pytest.approx(sum(ours.values()) / len(ours) * (100 if found.kind == "Y/N" else 1))


@pytest.fixture(scope="module")
def lazy_run(lmu, tmp_path_factory):
    """task=vlmeval with Lazy Attention (r=0.5) and dense beside it, on 12 samples of each set."""
    out = tmp_path_factory.mktemp("vlmeval_run")
    path = run(vlmeval_cfg(lmu, out, "method=lazy", "limit=12", "task.max_new_tokens=8"))
    return json.loads(path.read_text()), rows_of(out), out


def test_dense_through_vlmeval_equals_dense_through_harness(lazy_run, tmp_path):
    result, rows, out = lazy_run
    via_vlmeval = {(r["task"], r["harness_id"]): r["prediction"] for r in rows if r["variant"] == "dense"}
    for name, qtypes in ((export_shapes.YORN, "[exist]"), (export_shapes.MCQ, "[colour,count,position]")):
        builtin = tmp_path / name
        run(cfg_for("task=shapes", f"task.qtypes={qtypes}", "method=dense", "limit=12", f"out_dir={builtin}",
                    *COMMON))
        own = {r["id"]: r for r in rows_of(builtin) if r["variant"] == "method"}
        assert len(own) == 12
        assert {i: r["prediction"] for i, r in own.items()} == {i: p for (t, i), p in via_vlmeval.items() if t == name}
        dense_acc = result["tasks_dense"][name]["acc"]
        assert dense_acc == pytest.approx(sum(r["acc"] for r in own.values()) / 12)
    # VLMEvalKit's own files, and its numbers in result.json
    for variant in ("dense", "method"):
        for name in (export_shapes.YORN, export_shapes.MCQ):
            assert (out / "vlmeval" / variant / f"lazyattn_{name}.xlsx").is_file()
            assert result["vlmeval"][variant][name]["kind"] in ("Y/N", "MCQ")
    assert result["tasks"]["shapes_yorn"]["agreement"] == 1.0 and result["tasks"]["shapes_mcq"]["agreement"] == 1.0


def test_method_changes_answers_and_kv_bytes(lazy_run):
    result, rows, _ = lazy_run
    dense = {r["id"]: r for r in rows if r["variant"] == "dense"}
    method = [r for r in rows if r["variant"] == "method"]
    assert any(r["prediction"] != dense[r["id"]]["prediction"] for r in method)
    assert all(r["kv_bytes"][0] < dense[r["id"]]["kv_bytes"][0] for r in method)
    assert result["kv_workload"]["reduction"] > 0.2 and result["fidelity"]["exact_match"] < 1
    head = result["headline"]  # the first dataset's, not both pooled
    assert head["task"] == "shapes_yorn" and head["delta_score"] == pytest.approx(result["tasks"]["shapes_yorn"]["delta"])
    for name in ("shapes_yorn", "shapes_mcq"):  # the paired difference per dataset, with its interval
        lo, hi = result["tasks"][name]["delta_ci95"]
        assert lo <= result["tasks"][name]["delta"] <= hi
        assert lo <= result["tasks"][name]["acc"] - result["tasks_dense"][name]["acc"] <= hi


def test_the_report_renders_its_datasets_and_refuses_the_shapes_tables(lazy_run, tmp_path, capsys):
    """VLMEvalKit's results in the report: the tasks table shows each dataset by its declared metric
    (accuracy), a row per method; the shapes-only main table is refused in one line, non-zero."""
    from harness import report

    result, _, out = lazy_run
    header, rows = report.benchmark_table(report.collect(out))
    assert header[2:4] == ["shapes_yorn Acc", "shapes_mcq Acc"]
    method = next(row for row in rows if row[0] == result["method"]["label"])
    assert method[2:4] == [f"{100 * result['tasks'][n]['acc']:.1f}" for n in ("shapes_yorn", "shapes_mcq")]
    with pytest.raises(SystemExit) as refused:
        report.main(["main", "--results", str(out), "--out", str(tmp_path)])
    assert str(refused.value).startswith("error: the main table has nothing to show") and "shapes_yorn" in str(
        refused.value)
    assert not (tmp_path / "tables").exists()


def test_vlmeval_inference_job_builds_the_model_by_name(lazy_run, lmu, tmp_path):
    """VLMEvalKit's own tooling: the model registered under a name, built by infer_data_job, one
    message at a time (batch size 1): the route's answers (batch size 4)."""
    from vlmeval.inference import infer_data_job
    from vlmeval.smp import load

    from harness.vlmeval.model import register

    _, rows, _ = lazy_run
    register("lazyattn_tiny_lazy", model="llava_tiny", method="lazy", device="cpu", max_new_tokens=8)
    found = vdata.locate_all(["shapes_mcq"], str(lmu))["shapes_mcq"]
    dataset = vdata.build(found, lmu)
    dataset.data = dataset.data.iloc[:12]
    infer_data_job("lazyattn_tiny_lazy", work_dir=str(tmp_path), model_name="lazyattn_tiny_lazy", dataset=dataset)
    predictions = load(str(tmp_path / "lazyattn_tiny_lazy_shapes_mcq.xlsx"))
    route = {r["id"]: r["prediction"] for r in rows if r["variant"] == "method" and r["task"] == "shapes_mcq"}
    assert {f"shapes_mcq/{i}": str(p) for i, p in zip(predictions["index"], predictions["prediction"])} == route


def test_missing_and_malformed_tsvs_fail_in_one_line(lmu, tmp_path):
    with pytest.raises(ValueError, match=r"nope\.tsv does not exist.*never downloads") as err:
        build_task(cfg_for("task=vlmeval", "task.datasets=[nope]", f"task.data_dir={lmu}").task)
    assert "\n" not in str(err.value)
    (tmp_path / "bad.tsv").write_text("index\tquestion\n0\twhat ?\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['answer', 'image \(or image_path\)'\]"):
        vdata.locate_all(["bad"], str(tmp_path))
    with pytest.raises(ValueError, match="task.datasets is empty"):
        vdata.locate_all([], str(tmp_path))
    with pytest.raises(ValueError, match="is not a directory"):
        vdata.locate_all(["x"], str(tmp_path / "absent"))


def test_an_empty_tsv_is_refused_and_a_limit_above_the_rows_said(lmu, tmp_path):
    """Issue 34: a header without rows would score n=0 and print acc 0.000; a limit above a set's rows
    scores fewer samples than asked, said before the model loads and in the console's n."""
    from harness.console import limit_notes, samples_scored

    (tmp_path / "Empty.tsv").write_text("index\tquestion\tanswer\timage\n")
    with pytest.raises(ValueError, match="Empty.tsv holds a header and no rows; nothing to score") as err:
        vdata.locate_all(["Empty"], str(tmp_path))
    assert "\n" not in str(err.value)
    task = build_task(cfg_for("task=vlmeval", "task.datasets=[shapes_yorn]", f"task.data_dir={lmu}").task)
    rows = task.sizes()["shapes_yorn"]
    assert rows > 0
    assert limit_notes(rows + 10, task) == [f"note: limit={rows + 10} exceeds the {rows} row(s) of shapes_yorn: "
                                            f"{rows} will be scored"]
    assert samples_scored(rows + 10, task) == f"n={rows} (limit={rows + 10} or fewer rows)"


def test_corrupt_image_names_the_row(lmu, tmp_path):
    data = (lmu / "shapes_yorn.tsv").read_text().splitlines()
    cells = data[4].split("\t")
    cells[1] = base64.b64encode(os.urandom(120)).decode()  # index 3: bytes that are no image
    data[4] = "\t".join(cells)
    (tmp_path / "shapes_yorn.tsv").write_text("\n".join(data) + "\n")
    with pytest.raises(RunError, match=r"shapes_yorn .*index 3: its image or prompt cannot be read") as err:
        run(cfg_for("task=vlmeval", "task.datasets=[shapes_yorn]", f"task.data_dir={tmp_path}", "method=dense",
                    "limit=6", f"out_dir={tmp_path / 'out'}", *COMMON))
    assert "\n" not in str(err.value)


def test_md5_mismatch_is_refused_not_downloaded(lmu, tmp_path):
    """A released name whose local file differs: refused in one line (VLMEvalKit would download it
    again); verify_md5=false scores the copy; and a download VLMEvalKit still tries is an error."""
    shutil.copy(lmu / "shapes_yorn.tsv", tmp_path / "POPE.tsv")
    with pytest.raises(ValueError, match=r"POPE: .*MD5 differs .* task.verify_md5=false"):
        vdata.locate_all(["POPE"], str(tmp_path))
    found = vdata.locate_all(["POPE"], str(tmp_path), verify_md5=False)["POPE"]
    assert found.kind == "Y/N" and found.md5_verified is False
    assert len(vdata.build(found, tmp_path).data) == 24
    from vlmeval.dataset.image_yorn import ImageYORNDataset

    os.environ["LMUData"] = str(tmp_path)
    with vdata.no_downloads(), pytest.raises(ValueError, match=r"tried to download https://.*POPE\.tsv"):
        ImageYORNDataset(dataset="POPE")  # VLMEvalKit's own class, its MD5 check, our refusal


def test_circular_evaluation_scores_a_question_with_its_variants(lmu, tmp_path):
    """A name VLMEvalKit evaluates circularly (MMBench's way): each question and its rotated
    variants (index + 1e6, same g_index) get one verdict, right only when every variant is."""
    import pandas as pd

    data = pd.read_csv(lmu / "shapes_mcq.tsv", sep="\t").iloc[:6]
    data["g_index"] = data["index"]
    variants = data[data["D"].notna()].copy()  # four-option rows: the options rotated by one
    letters = ["A", "B", "C", "D"]
    variants[letters] = variants[["B", "C", "D", "A"]].to_numpy()
    variants["answer"] = [letters[(letters.index(a) - 1) % 4] for a in variants["answer"]]
    variants["index"] = variants["index"] + 1_000_000
    assert len(variants) >= 1
    pd.concat([data, variants]).to_csv(tmp_path / "shapes_circular.tsv", sep="\t", index=False)
    out = tmp_path / "run"
    run(cfg_for("task=vlmeval", "task.datasets=[shapes_circular]", f"task.data_dir={tmp_path}", "method=dense",
                f"out_dir={out}", *COMMON, "compare_dense=false", "task.max_new_tokens=8"))
    rows = rows_of(out)
    assert len(rows) == 6 and sum("circular" in r for r in rows) == len(variants)
    result = json.loads((out / "result.json").read_text())
    overall = result["vlmeval"]["method"]["shapes_circular"]["scores"]["Overall"][0]
    assert result["tasks"]["shapes_circular"]["acc"] == pytest.approx(overall)


def test_a_missing_dataset_from_the_command_line_is_one_line(tmp_path, monkeypatch, capfd):
    """``python -m harness task=vlmeval 'task.datasets=[POPE]'`` without POPE.tsv (its entry point's code,
    in this environment's process: what the re-executed command runs): exit 2, the one line last,
    no result."""
    status, _, err = harness_cli(["model=llava_tiny", "task=vlmeval", "task.datasets=[POPE]", f"task.data_dir={tmp_path}",
                                  f"out_dir={tmp_path / 'run'}"], monkeypatch, capfd, cwd=tmp_path,
                                 env={"LMUData": str(tmp_path)})
    assert status == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: VLMEvalKit dataset POPE:") and "POPE.tsv does not exist" in last
    assert not (tmp_path / "run" / "result.json").exists()
