"""Tests for the built-in shapes benchmark (harness/tasks/shapes.py)."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from harness.tasks import shapes
from harness.tasks.shapes import GRID, QTYPES, Obj, Scene

# ----------------------------------------------------------------- determinism


def test_load_split_is_deterministic():
    assert shapes.load_split("val", 60) == shapes.load_split("val", 60)


def test_load_split_is_prefix_stable_and_offset_consistent():
    for split in shapes.SPLITS:
        assert shapes.load_split(split, 10)[:5] == shapes.load_split(split, 5)
    assert shapes.load_split("train", 10)[4:] == shapes.load_split("train", 6, offset=4)


def test_render_is_deterministic():
    for sample in shapes.load_split("test", 12):
        assert sample.image().tobytes() == shapes.render(sample.scene).tobytes()
        assert sample.image(96).tobytes() == sample.image(96).tobytes()


def test_ids_and_fields():
    samples = shapes.load_split("val", 12, offset=3)
    assert [s.id for s in samples] == [f"val-{i}" for i in range(3, 15)]
    for s in samples:
        assert s.split == "val"
        turns = len(s.turn_types)
        assert len(s.questions) == len(s.answers) == turns
        assert turns == 2 if s.qtype == "multiturn" else 4 <= turns <= 6 if s.qtype == "dialogue" else turns == 1


# ----------------------------------------------------------------- scenes and rendering


def test_scenes_are_valid():
    for s in shapes.load_split("train", 300, qtypes=["count"]):
        objs = s.scene.objects
        assert 1 <= len(objs) <= 4
        assert len({(o.row, o.col) for o in objs}) == len(objs)
        assert len({o.shape for o in objs}) == len(objs)
        for o in objs:
            assert o.shape in shapes.SHAPES and o.colour in shapes.COLOURS
            assert 0 <= o.row < GRID and 0 <= o.col < GRID


def test_object_counts_cover_full_range():
    counts = {len(s.scene.objects) for s in shapes.load_split("train", 200, qtypes=["count"])}
    assert counts == {1, 2, 3, 4}


@pytest.mark.parametrize("size", [64, 96])
def test_render_draws_each_object_at_its_cell(size):
    for s in shapes.load_split("test", 40, qtypes=["describe"]):
        img = s.image(size)
        assert img.mode == "RGB" and img.size == (size, size)
        pixels = np.asarray(img).astype(int)
        occupied = {(o.row, o.col): o for o in s.scene.objects}
        for row in range(GRID):
            for col in range(GRID):
                y, x = int((row + 0.5) * size / GRID), int((col + 0.5) * size / GRID)
                obj = occupied.get((row, col))
                expected = shapes.COLOURS[obj.colour] if obj else shapes.BACKGROUND
                assert np.abs(pixels[y, x] - np.array(expected)).max() <= 10, (s.id, row, col, obj)


def test_background_is_light_and_colours_distinct():
    assert min(shapes.BACKGROUND) >= 200
    values = list(shapes.COLOURS.values())
    for i, a in enumerate(values):
        for b in values[i + 1:]:
            assert np.abs(np.array(a) - np.array(b)).sum() >= 60, (a, b)


def test_place_property():
    assert Obj("circle", "red", 0, 0).place == "top left"
    assert Obj("circle", "red", 1, 2).place == "top right"
    assert Obj("circle", "red", 2, 1).place == "bottom left"
    assert Obj("circle", "red", 3, 3).place == "bottom right"


def test_make_scene_uses_the_given_rng():
    assert shapes.make_scene(random.Random(7)) == shapes.make_scene(random.Random(7))
    scenes = {shapes.make_scene(random.Random(i)) for i in range(20)}
    assert len(scenes) > 10


# ----------------------------------------------------------------- answers are right


def _shape_in(question: str) -> str:
    found = [w for w in shapes.words(question) if w in shapes.SHAPES]
    assert len(found) == 1, question
    return found[0]


def _check_turn(turn_type: str, scene: Scene, question: str, answer: str) -> None:
    by_shape = {o.shape: o for o in scene.objects}
    if turn_type == "colour":
        assert question == f"what colour is the {_shape_in(question)} ?"
        assert answer == by_shape[_shape_in(question)].colour
    elif turn_type == "count":
        assert question == "how many shapes are there ?"
        assert answer == str(len(scene.objects))
    elif turn_type == "exist":
        m = re.fullmatch(r"is there a (\w+) (\w+) \?", question)
        assert m, question
        colour, shape = m.groups()
        present = any(o.colour == colour and o.shape == shape for o in scene.objects)
        assert answer == ("yes" if present else "no")
    elif turn_type == "position":
        obj = by_shape[_shape_in(question)]
        if question.endswith("on the left or the right ?"):
            assert answer == ("left" if obj.col < GRID / 2 else "right")
        else:
            assert question.endswith("at the top or the bottom ?"), question
            assert answer == ("top" if obj.row < GRID / 2 else "bottom")
    elif turn_type == "describe":
        assert question == "describe the image ."
        ordered = sorted(scene.objects, key=lambda o: (o.row, o.col))
        vert = lambda o: "top" if o.row < 2 else "bottom"  # noqa: E731
        horiz = lambda o: "left" if o.col < 2 else "right"  # noqa: E731
        parts = [f"a {o.colour} {o.shape} at {vert(o)} {horiz(o)}" for o in ordered]
        assert answer == " , ".join(parts) + " ."
    elif turn_type == "long":
        assert question == "describe the shapes ."
        ordered = sorted(scene.objects, key=lambda o: (o.row, o.col))
        head = f"there are {len(scene.objects)} shapes ."
        assert answer.startswith(head) and len(shapes.words(answer)) == 5 + 26 * len(ordered)
        facts = shapes.long_facts(answer)
        assert ("", "count", str(len(ordered))) in facts and len(facts) == 1 + 4 * len(ordered)
        for o in ordered:
            assert {(o.shape, "colour", o.colour), (o.shape, "cell", f"{o.row + 1} {o.col + 1}"),
                    (o.shape, "vertical", "top" if o.row < 2 else "bottom"),
                    (o.shape, "horizontal", "left" if o.col < 2 else "right")} <= facts
        assert shapes.score_turn("long", answer, answer)["f1"] == 1.0
        wrong = answer.replace(f"the {ordered[0].shape} is {ordered[0].colour}", f"the {ordered[0].shape} is ?")
        assert shapes.score_turn("long", wrong, answer)["recall"] == pytest.approx(1 - 1 / len(facts))
    else:
        raise AssertionError(f"unexpected turn type {turn_type}")


def test_answers_match_the_scene():
    seen = set()
    for s in shapes.load_split("train", 300):
        for turn_type, q, a in zip(s.turn_types, s.questions, s.answers):
            _check_turn(turn_type, s.scene, q, a)
            seen.add(turn_type)
        if s.qtype == "multiturn":
            assert len(set(s.turn_types)) == 2
            assert set(s.turn_types) <= {"colour", "count", "exist", "position"}
        elif s.qtype == "dialogue":
            assert 4 <= len(s.turn_types) <= 6 and set(s.turn_types) <= {"colour", "count", "exist", "position"}
        else:
            assert s.turn_types == [s.qtype]
    assert seen == set(QTYPES) - {"multiturn", "dialogue"}


def test_position_asks_both_axes():
    questions = [s.questions[0] for s in shapes.load_split("train", 60, qtypes=["position"])]
    assert any("left or the right" in q for q in questions)
    assert any("top or the bottom" in q for q in questions)


# ----------------------------------------------------------------- balance and splits


def test_qtypes_round_robin():
    samples = shapes.load_split("val", 30)
    assert [s.qtype for s in samples] == [QTYPES[i % len(QTYPES)] for i in range(30)]
    subset = shapes.load_split("val", 7, qtypes=["count", "describe"])
    assert [s.qtype for s in subset] == ["count", "describe"] * 3 + ["count"]


def test_exist_is_exactly_balanced():
    only = shapes.load_split("test", 40, qtypes=["exist"])
    assert [s.answers[0] for s in only] == ["yes", "no"] * 20
    mixed = [s for s in shapes.load_split("test", 20 * len(QTYPES)) if s.qtype == "exist"]
    assert len(mixed) == 20
    assert sum(s.answers[0] == "yes" for s in mixed) == 10


def test_exist_no_is_sometimes_a_near_miss():
    nos = [s for s in shapes.load_split("train", 100, qtypes=["exist"]) if s.answers[0] == "no"]
    near = 0
    for s in nos:
        colour, shape = re.fullmatch(r"is there a (\w+) (\w+) \?", s.questions[0]).groups()
        # Near miss: the shape is in the picture (in another colour), or the colour is.
        if shape in {o.shape for o in s.scene.objects} or colour in {o.colour for o in s.scene.objects}:
            near += 1
    assert near >= len(nos) // 4


def test_splits_do_not_leak():
    # The leakage check: no test scene (set of objects) occurs among the first 2000 train scenes.
    train = {s.scene for s in shapes.load_split("train", 2000, qtypes=["count"])}
    test = [s.scene for s in shapes.load_split("test", 500, qtypes=["count"])]
    assert not [scene for scene in test if scene in train]
    assert len(set(shapes.SPLITS.values())) == len(shapes.SPLITS)


def test_scene_does_not_depend_on_qtype():
    a = shapes.load_split("val", 12)
    b = shapes.load_split("val", 12, qtypes=["describe"])
    assert [s.scene for s in a] == [s.scene for s in b]


# ----------------------------------------------------------------- vocabulary


def test_every_word_is_in_vocab():
    vocab = set(shapes.VOCAB)
    for s in shapes.load_split("train", 400):
        for text in (*s.questions, *s.answers):
            missing = [w for w in shapes.words(text) if w not in vocab]
            assert not missing, (text, missing)


def test_vocab_is_sorted_unique_and_complete():
    assert list(shapes.VOCAB) == sorted(set(shapes.VOCAB))
    for w in (*shapes.SHAPES, *shapes.COLOURS, "yes", "no", "1", "4", "?", ",", ".", "top", "left"):
        assert w in shapes.VOCAB


def test_words_splits_punctuation():
    assert shapes.words("Is there a Red circle?") == ["is", "there", "a", "red", "circle", "?"]
    assert shapes.words("left,  right.") == ["left", ",", "right", "."]


# ----------------------------------------------------------------- scorers


@pytest.mark.parametrize(
    "pred,gold",
    [("Red.", "red"), ("  the   red ", "red"), ("3", "three"), ("Three.", "3"), ("YES", "yes"), ("a blue", "blue")],
)
def test_normalise_equal(pred, gold):
    assert shapes.normalise(pred) == shapes.normalise(gold)
    assert shapes.score_turn("colour", pred, gold) == {"acc": 1.0}


@pytest.mark.parametrize("pred,gold", [("red", "blue"), ("3", "4"), ("yes", "no"), ("", "red"), ("red circle", "red")])
def test_normalise_different(pred, gold):
    assert shapes.score_turn("count", pred, gold) == {"acc": 0.0}


def test_parse_description_accepts_loose_punctuation():
    tight = "A red circle at top left, a blue square at bottom-right."
    loose = "a red circle at top left , a blue square at bottom right ."
    expected = {("red", "circle", "top left"), ("blue", "square", "bottom right")}
    assert shapes.parse_description(tight) == shapes.parse_description(loose) == expected
    assert shapes.parse_description("a green cross") == {("green", "cross", "")}
    assert shapes.parse_description("") == set()


def test_describe_partial_f1():
    gold = "a red circle at top left , a blue square at bottom right , a green triangle at top right ."
    # One right, one with the wrong place, one missing: P = 1/2, R = 1/3, F1 = 2PR/(P+R) = 0.4.
    pred = "a red circle at top left, a blue square at top left."
    scores = shapes.score_turn("describe", pred, gold)
    assert scores["precision"] == pytest.approx(0.5)
    assert scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(0.4)
    assert scores["acc"] == 0.0


def test_gold_scores_perfect_and_empty_scores_zero():
    samples = shapes.load_split("val", 60)
    for s in samples:
        gold = shapes.score_sample(s, s.answers[-1])
        assert gold["acc"] == 1.0 and gold.get("f1", 1.0) == 1.0
        empty = shapes.score_sample(s, "")
        assert all(v == 0.0 for v in empty.values()), (s.id, empty)


def test_score_sample_uses_last_turn():
    s = next(s for s in shapes.load_split("val", 60) if s.qtype == "multiturn" and s.answers[0] != s.answers[1])
    assert shapes.score_sample(s, s.answers[1])["acc"] == 1.0
    assert shapes.score_sample(s, s.answers[0])["acc"] == 0.0


def test_aggregate():
    samples = shapes.load_split("test", 12, QTYPES[:6])
    # Gold everywhere except the first count sample (index 1) and the first describe (index 4).
    preds = [s.answers[-1] for s in samples]
    preds[1] = "99"
    preds[4] = ""
    agg = shapes.aggregate(samples, preds)
    assert set(agg) == set(QTYPES[:6]) | {"all"}
    assert agg["count"] == {"n": 2, "acc": 0.5}
    assert agg["describe"]["n"] == 2
    assert agg["describe"]["acc"] == 0.5 and agg["describe"]["f1"] == 0.5
    assert agg["colour"] == {"n": 2, "acc": 1.0}
    assert agg["all"]["n"] == 12
    assert agg["all"]["acc"] == pytest.approx(10 / 12)
    with pytest.raises(ValueError):
        shapes.aggregate(samples, preds[:-1])


# ----------------------------------------------------------------- errors


def test_bad_split_or_qtype_names_allowed_values():
    with pytest.raises(ValueError, match="train") as err:
        shapes.load_split("dev", 3)
    assert "test" in str(err.value) and "val" in str(err.value)
    with pytest.raises(ValueError, match="multiturn") as err:
        shapes.load_split("train", 3, qtypes=["colour", "shape"])
    assert "colour" in str(err.value) and "describe" in str(err.value)
    with pytest.raises(ValueError):
        shapes.score_turn("multiturn", "x", "y")
