"""harness.longform: dialogue accuracy by turn, long fact-F1 by answer length, and whether a method's
loss against dense grows, computed from rows built by hand (no model)."""

import pytest

from harness import longform
from harness.tasks import shapes


def dialogue_row(i, answers, turns, kv=100):
    return {"id": f"d{i}", "qtype": "dialogue", "answers": answers, "turns": turns, "prediction": turns[-1],
            "acc": float(shapes.normalise(turns[-1]) == shapes.normalise(answers[-1])), "kv_bytes": [kv] * len(turns)}


def long_row(i, n_objects, f1, kv=100):
    sample = next(s for s in shapes.load_split("test", 80, ["long"]) if len(s.scene.objects) == n_objects)
    return {"id": f"l{i}", "qtype": "long", "answers": sample.answers, "turns": ["x"], "prediction": "x",
            "acc": 0.0, "f1": f1, "kv_bytes": [kv]}


def test_turns_objects_and_growth():
    gold = ["3", "red", "yes", "left", "no"]
    dense = [dialogue_row(i, gold, gold) for i in range(10)]
    # the method is right on turns 1-2 and wrong from turn 4 on in every dialogue: its loss grows
    method = [dialogue_row(i, gold, ["3", "red", "yes", "right", "yes"], kv=80) for i in range(10)]
    dense += [long_row(10 + k, k, 1.0) for k in (1, 2, 3, 4)]
    method += [long_row(10 + k, k, 1.0 if k <= 2 else 0.5, kv=90) for k in (1, 2, 3, 4)]
    num = longform.numbers(method, dense)
    assert num["turns"][1]["score"] == 1.0 and num["turns"][1]["delta"] == 0.0
    assert num["turns"][4]["score"] == 0.0 and num["turns"][4]["delta"] == -1.0 and num["turns"][4]["n"] == 10
    assert 6 not in num["turns"]  # no dialogue had six turns
    assert num["dialogue"]["score"] == 0.0 and num["dialogue"]["delta"] == -1.0
    growth = num["growth"]["turns"]
    assert growth["delta"] == -1.0 and growth["delta_ci95"][1] < 0  # later turns lose more, every sample
    assert num["objects"][1]["delta"] == 0.0 and num["objects"][4]["delta"] == -0.5
    assert num["growth"]["objects"]["delta"] == pytest.approx(-0.5)
    assert num["kv_cut"]["dialogue"] == pytest.approx(0.2) and num["kv_cut"]["long"] == pytest.approx(0.1)
    assert [longform.objects_of(r) for r in dense[10:]] == [1, 2, 3, 4]

    header, rows = longform.table([("Dense", "m", longform.numbers(dense, dense)), ("M", "m", num)])
    assert rows[0][header.index("turn 1")] == "100.0"
    assert rows[1][header.index("turn 4")].endswith("*") and rows[1][header.index("turn 1")] == "+0 ± 0"


def test_a_method_equal_to_dense_changes_nothing():
    gold = ["3", "red", "yes", "left"]
    rows = [dialogue_row(i, gold, gold) for i in range(5)] + [long_row(9, 2, 0.8)]
    num = longform.numbers(rows, rows)
    assert all(v["delta"] == 0.0 for v in num["turns"].values())
    assert num["growth"]["turns"]["delta"] == 0.0 and num["kv_cut"]["dialogue"] == 0.0
