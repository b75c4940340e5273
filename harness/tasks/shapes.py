"""The built-in ``shapes`` benchmark: coloured shapes on a grid, with questions and scorers.

Everything is generated from a seed, so no data has to be downloaded or stored: sample ``i`` of a
split is a pure function of ``(split, i, qtype)``.  The wording is fixed and small on purpose: a
tiny LLaVA-style model is trained on the train split with a word-level tokenizer built from
``VOCAB``, so every token a question or gold answer can contain must be listed there.

Splits are disjoint by construction: each possible scene is hashed into exactly one split, and
a split's generator rejects scenes that belong elsewhere.  Without that, small scenes (a single
object has only 5 * 6 * 16 = 480 variants) would appear in both train and test.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from dataclasses import dataclass
from typing import Sequence

from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
# long (a detailed description, 30-110 tokens) and dialogue (4-6 turns) came later: they are last, so the
# samples of the first six types do not move.
QTYPES: tuple[str, ...] = ("colour", "count", "exist", "position", "describe", "multiturn", "long", "dialogue")
SPLITS: dict[str, int] = {"train": 1000, "val": 2000, "test": 3000}
GRID = 4
MAX_OBJECTS = 4
BACKGROUND = (235, 235, 235)

# Which hash buckets (out of 10) of a scene belong to each split: 80 / 10 / 10.
_SPLIT_BUCKETS: dict[str, frozenset[int]] = {
    "train": frozenset(range(8)),
    "val": frozenset({8}),
    "test": frozenset({9}),
}
assert _SPLIT_BUCKETS.keys() == SPLITS.keys()

PLACES: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
SINGLE_TURN_TYPES: tuple[str, ...] = ("colour", "count", "exist", "position")

# Fixed wording.  VOCAB is derived from these strings, so editing one cannot leave VOCAB stale.
TEMPLATES: dict[str, str] = {
    "colour": "what colour is the {shape} ?",
    "count": "how many shapes are there ?",
    "exist": "is there a {colour} {shape} ?",
    "position_lr": "is the {shape} on the left or the right ?",
    "position_tb": "is the {shape} at the top or the bottom ?",
    "describe": "describe the image .",
    "long": "describe the shapes .",
}
DESCRIBE_ITEM = "a {colour} {shape} at {place}"
DESCRIBE_SEP = " , "
DESCRIBE_END = " ."
# The long description: how many objects, then four facts about each, in reading order.
LONG_HEAD = "there are {n} shapes ."
LONG_ITEM = (
    "the {shape} is {colour} , the {shape} is at the {vertical} , the {shape} is on the {horizontal} , "
    "the {shape} is at {row} {col} ."
)
YES, NO = "yes", "no"


def words(text: str) -> list[str]:
    """Tokenise the way VOCAB is built: lowercase, whitespace-split, with ? , . as own tokens."""
    return re.sub(r"([?,.])", r" \1 ", text.lower()).split()


def _template_words(template: str) -> list[str]:
    # Only the literal text of a template; the {fields} are covered by SHAPES/COLOURS/PLACES.
    literal = " ".join(text for text, _, _, _ in string.Formatter().parse(template))
    return words(literal)


def _build_vocab() -> tuple[str, ...]:
    vocab: set[str] = set()
    for template in (*TEMPLATES.values(), DESCRIBE_ITEM, DESCRIBE_SEP, DESCRIBE_END, LONG_HEAD, LONG_ITEM):
        vocab.update(_template_words(template))
    vocab.update(SHAPES)
    vocab.update(COLOURS)
    for place in PLACES:
        vocab.update(words(place))
    vocab.update(str(n) for n in range(1, MAX_OBJECTS + 1))
    vocab.update((YES, NO))
    return tuple(sorted(vocab))


VOCAB: tuple[str, ...] = _build_vocab()


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    row: int
    col: int

    @property
    def place(self) -> str:
        vertical = "top" if self.row < GRID / 2 else "bottom"
        horizontal = "left" if self.col < GRID / 2 else "right"
        return f"{vertical} {horizontal}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]

    def by_shape(self, shape: str) -> Obj:
        # Unambiguous because make_scene never repeats a shape.
        return next(o for o in self.objects if o.shape == shape)


def make_scene(rng: random.Random) -> Scene:
    """1..MAX_OBJECTS objects in distinct cells with distinct shapes (colours may repeat)."""
    n = rng.randint(1, MAX_OBJECTS)
    shapes = rng.sample(SHAPES, n)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    colours = [rng.choice(list(COLOURS)) for _ in range(n)]
    objects = [Obj(s, k, r, c) for s, k, (r, c) in zip(shapes, colours, cells)]
    # Reading order, so two scenes with the same objects compare equal and describe is canonical.
    return Scene(tuple(sorted(objects, key=lambda o: (o.row, o.col))))


def _scene_bucket(scene: Scene) -> int:
    # hashlib, not hash(): must be stable across processes and platforms.
    key = ";".join(f"{o.shape}:{o.colour}:{o.row}:{o.col}" for o in scene.objects)
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw filled shapes, one per grid cell, on a light grey background (no anti-aliasing)."""
    if size < 4 * GRID:
        raise ValueError(f"size must be at least {4 * GRID}, got {size}")
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = size / GRID
    margin = cell / 8
    for obj in scene.objects:
        fill = COLOURS[obj.colour]
        x0, y0 = obj.col * cell + margin, obj.row * cell + margin
        x1, y1 = (obj.col + 1) * cell - margin - 1, (obj.row + 1) * cell - margin - 1
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        elif obj.shape == "diamond":
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
        elif obj.shape == "cross":
            arm = (x1 - x0) / 6  # half the bar thickness: bars a third of the box wide
            draw.rectangle((cx - arm, y0, cx + arm, y1), fill=fill)
            draw.rectangle((x0, cy - arm, x1, cy + arm), fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; allowed: {SHAPES}")
    return image


# --------------------------------------------------------------------------- samples


@dataclass
class Sample:
    id: str
    split: str
    index: int
    qtype: str
    scene: Scene
    questions: list[str]
    answers: list[str]
    turn_types: list[str]

    def image(self, size: int = 64) -> Image.Image:
        return render(self.scene, size)


def describe_long(scene: Scene) -> str:
    """The gold long description: the object count, then colour, half, side and grid cell (row and
    column, 1-4) of every object in reading order."""
    items = [
        LONG_ITEM.format(shape=o.shape, colour=o.colour, vertical=o.place.split()[0], horizontal=o.place.split()[1],
                         row=o.row + 1, col=o.col + 1)
        for o in scene.objects
    ]
    return " ".join([LONG_HEAD.format(n=len(scene.objects)), *items])


def long_facts(text: str) -> set[tuple[str, str, str]]:
    """The facts a long description states: (shape, kind, value) for colour, vertical, horizontal
    and cell, and ("", "count", n); whatever else the text says is ignored."""
    tokens = words(text)
    facts = set()
    for i in range(len(tokens)):
        window = tokens[i : i + 7]
        if window[:2] == ["there", "are"] and len(window) > 3 and window[3] == "shapes":
            facts.add(("", "count", window[2]))
        if len(window) < 4 or window[0] != "the" or window[1] not in SHAPES or window[2] != "is":
            continue
        shape, rest = window[1], window[3:]
        if rest[0] in COLOURS:
            facts.add((shape, "colour", rest[0]))
        elif rest[:2] == ["at", "the"] and len(rest) > 2 and rest[2] in ("top", "bottom"):
            facts.add((shape, "vertical", rest[2]))
        elif rest[:2] == ["on", "the"] and len(rest) > 2 and rest[2] in ("left", "right"):
            facts.add((shape, "horizontal", rest[2]))
        elif rest[0] == "at" and len(rest) > 2 and rest[1].isdigit() and rest[2].isdigit():
            facts.add((shape, "cell", f"{rest[1]} {rest[2]}"))
    return facts


def describe(scene: Scene) -> str:
    """The gold description: every object in reading order."""
    items = [DESCRIBE_ITEM.format(colour=o.colour, shape=o.shape, place=o.place) for o in scene.objects]
    return DESCRIBE_SEP.join(items) + DESCRIBE_END


def _exist_question(scene: Scene, rng: random.Random, want_yes: bool) -> tuple[str, str]:
    present = {(o.colour, o.shape) for o in scene.objects}
    if want_yes:
        colour, shape = rng.choice(sorted(present))
    else:
        absent = [(k, s) for k in COLOURS for s in SHAPES if (k, s) not in present]
        # Make "no" hard two times in three: a near miss on one attribute, so the model must
        # bind colour to shape rather than check that each word appears somewhere in the image.
        kind = rng.choice(("same_shape", "same_colour", "any"))
        if kind == "same_shape":
            near = [(k, s) for k, s in absent if s in {o.shape for o in scene.objects}]
        elif kind == "same_colour":
            near = [(k, s) for k, s in absent if k in {o.colour for o in scene.objects}]
        else:
            near = []
        colour, shape = rng.choice(near or absent)
    return TEMPLATES["exist"].format(colour=colour, shape=shape), YES if want_yes else NO


def _single_turn(qtype: str, scene: Scene, rng: random.Random, exist_yes: bool) -> tuple[str, str]:
    if qtype == "colour":
        obj = rng.choice(scene.objects)
        return TEMPLATES["colour"].format(shape=obj.shape), obj.colour
    if qtype == "count":
        return TEMPLATES["count"], str(len(scene.objects))
    if qtype == "exist":
        return _exist_question(scene, rng, exist_yes)
    if qtype == "position":
        obj = rng.choice(scene.objects)
        vertical, horizontal = obj.place.split()
        if rng.random() < 0.5:
            return TEMPLATES["position_lr"].format(shape=obj.shape), horizontal
        return TEMPLATES["position_tb"].format(shape=obj.shape), vertical
    if qtype == "describe":
        return TEMPLATES["describe"], describe(scene)
    raise ValueError(f"unknown turn type {qtype!r}")


def _make_sample(split: str, index: int, qtype: str, n_qtypes: int) -> Sample:
    # The scene depends only on (split, index); the question rng is separate so that asking a
    # different question type about sample i still shows the same picture.
    scene_rng = random.Random(f"shapes-{SPLITS[split]}-{index}-scene")
    scene = make_scene(scene_rng)
    while _scene_bucket(scene) not in _SPLIT_BUCKETS[split]:
        scene = make_scene(scene_rng)
    rng = random.Random(f"shapes-{SPLITS[split]}-{index}-{qtype}")
    if qtype == "multiturn":
        turn_types = rng.sample(SINGLE_TURN_TYPES, 2)
        turns = [_single_turn(t, scene, rng, exist_yes=rng.random() < 0.5) for t in turn_types]
    elif qtype == "dialogue":  # a longer conversation: 4-6 single-turn questions about one image
        turn_types = [rng.choice(SINGLE_TURN_TYPES) for _ in range(rng.randint(4, 6))]
        turns = [_single_turn(t, scene, rng, exist_yes=rng.random() < 0.5) for t in turn_types]
    elif qtype == "long":
        turn_types = ["long"]
        turns = [(TEMPLATES["long"], describe_long(scene))]
    else:
        # Every other exist sample (in round-robin order) is a "yes": exactly balanced prefixes.
        turn_types = [qtype]
        turns = [_single_turn(qtype, scene, rng, exist_yes=(index // n_qtypes) % 2 == 0)]
    return Sample(
        id=f"{split}-{index}",
        split=split,
        index=index,
        qtype=qtype,
        scene=scene,
        questions=[q for q, _ in turns],
        answers=[a for _, a in turns],
        turn_types=list(turn_types),
    )


def load_split(split: str, n: int, qtypes: Sequence[str] | None = None, offset: int = 0) -> list[Sample]:
    """Samples ``offset .. offset+n-1`` of ``split``; sample i asks ``qtypes[i % len(qtypes)]``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {sorted(SPLITS)}")
    qtypes = tuple(QTYPES if qtypes is None else qtypes)
    bad = [q for q in qtypes if q not in QTYPES]
    if bad or not qtypes:
        raise ValueError(f"unknown qtypes {bad or '(empty)'}; allowed: {list(QTYPES)}")
    if n < 0 or offset < 0:
        raise ValueError(f"n and offset must be non-negative, got n={n}, offset={offset}")
    return [_make_sample(split, i, qtypes[i % len(qtypes)], len(qtypes)) for i in range(offset, offset + n)]


# --------------------------------------------------------------------------- scoring

_NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_TRAILING = ".,!?;:'\" \t\n"


def normalise(text: str) -> str:
    """Canonical form for exact match: "The Three." -> "3", " Red . " -> "red"."""
    text = " ".join(text.lower().split()).rstrip(_TRAILING).strip()
    tokens = [_NUMBER_WORDS.get(t, t) for t in text.split()]
    if len(tokens) > 1 and tokens[0] in _ARTICLES:
        tokens = tokens[1:]
    return " ".join(tokens)


def parse_description(text: str) -> set[tuple[str, str, str]]:
    """(colour, shape, place) triples from free text; an object with no place gets place ""."""
    tokens = [t for t in words(text.replace("-", " ")) if t not in {",", ".", "?"}]
    # Each "<colour> <shape>" starts an object; its place is the first "<top|bottom> <left|right>"
    # before the next object starts, so places cannot leak from one object to another.
    starts = [i for i in range(len(tokens) - 1) if tokens[i] in COLOURS and tokens[i + 1] in SHAPES]
    triples = set()
    for j, start in enumerate(starts):
        end = starts[j + 1] if j + 1 < len(starts) else len(tokens)
        place = ""
        for i in range(start + 2, end - 1):
            if tokens[i] in ("top", "bottom") and tokens[i + 1] in ("left", "right"):
                place = f"{tokens[i]} {tokens[i + 1]}"
                break
        triples.add((tokens[start], tokens[start + 1], place))
    return triples


def score_turn(turn_type: str, prediction: str, gold: str) -> dict[str, float]:
    if turn_type in SINGLE_TURN_TYPES:
        return {"acc": float(normalise(prediction) == normalise(gold))}
    if turn_type in ("describe", "long"):
        parse = parse_description if turn_type == "describe" else long_facts
        pred, ref = parse(prediction), parse(gold)
        hits = len(pred & ref)
        precision = hits / len(pred) if pred else 0.0
        recall = hits / len(ref) if ref else 0.0
        f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
        return {"acc": float(pred == ref), "f1": f1, "precision": precision, "recall": recall}
    raise ValueError(f"unknown turn type {turn_type!r}; allowed: {[*SINGLE_TURN_TYPES, 'describe', 'long']}")


def score_sample(sample: Sample, prediction: str) -> dict[str, float]:
    """Score ``prediction`` against the last turn only (earlier multiturn turns are context)."""
    return score_turn(sample.turn_types[-1], prediction, sample.answers[-1])


def aggregate(samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per qtype ``{"n", mean of each metric}``, plus ``"all": {"n", "acc"}`` over every sample."""
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
    scores: dict[str, list[dict[str, float]]] = {}
    for sample, prediction in zip(samples, predictions):
        scores.setdefault(sample.qtype, []).append(score_sample(sample, prediction))
    result: dict[str, dict[str, float]] = {}
    for qtype in sorted(scores, key=QTYPES.index):
        rows = scores[qtype]
        result[qtype] = {"n": len(rows)}
        for metric in rows[0]:
            result[qtype][metric] = sum(r[metric] for r in rows) / len(rows)
    every = [r["acc"] for rows in scores.values() for r in rows]
    result["all"] = {"n": len(every), "acc": sum(every) / len(every) if every else 0.0}
    return result
