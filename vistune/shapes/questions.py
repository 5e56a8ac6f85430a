"""Every text of the shapes world, derived from a scene graph alone.

A scene is the dict written to `scenes/<split>.jsonl` (see `synth.py`): `objects` is a list of
`{"color", "shape", "size", "x", "y", ...}` with x, y the centre in pixels (y grows downward); only
these five are read here. From it we derive a short caption, a detailed description, single-turn VQA,
multi-turn conversations and a class label (POPE existence probes: `pope.py`; the kinds that relate
objects and bind colours to shapes: `relations.py`; follow-up conversations: `multiturn.py`). Every
question kind has many wordings (`wordings.py`); the shifted split is worded with its own, held out.

Questions are only asked when their answer is unique and exact: an object is referred to by the
shortest description (shape, colour+shape, ...) that matches exactly one object, and a spatial relation
is only asked when the centres differ by more than `SPATIAL_MARGIN` of the image side on that axis.
Left/right compare x, above/below compare y (smaller y is above). `answer()` re-derives any answer from
the scene and the question's `params`, independently of the question text.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product

import numpy as np

from vistune.shapes.wordings import INSTRUCTIONS, NO_INSTRUCTION, TEMPLATES

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "diamond")
SIZES = ("small", "large")
COMBOS = tuple(product(COLORS, SHAPES))  # every (color, shape) object kind, in a fixed order
QUESTION_TYPES = ("color", "shape", "size", "count", "exists", "spatial")
LABELS = SHAPES  # classification labels: the majority shape
SPATIAL_MARGIN = 0.1  # fraction of the image side two centres must differ by for a relation to be asked
POSITION_BINS = 10  # the digits of a position the object_words projector reads (regions follow them)

# The noun of an object named without its shape ("red object", "small red item"); shape questions never
# say "shape" for the object they ask about.
NOUNS = ("object", "shape", "item", "thing")
COUNT_ALL = 0.3  # fraction of count questions that ask for every object
# Which attributes may name an object in each question type, shortest first (never the asked attribute).
REFERENCES = {
    "color": (("shape",), ("size", "shape")),
    "shape": (("color",), ("size", "color")),
    "size": (("shape",), ("color", "shape")),
    "spatial": (("shape",), ("color", "shape"), ("size", "color", "shape")),
}


def pick(rng: np.random.Generator, options: Sequence):
    """Choose one element of a sequence with the scene's RNG (works for tuples of tuples too)."""
    return options[int(rng.integers(len(options)))]


def find(scene: dict, target: dict) -> list[dict]:
    """Objects of the scene whose attributes equal every key of `target`."""
    return [o for o in scene["objects"] if all(o[k] == v for k, v in target.items())]


def phrase(target: dict, noun: str = "object") -> str:
    """Noun phrase for a target, e.g. {"size": "small", "color": "red"} -> 'small red object'.

    `noun` stands in for the shape when the target names none ("small red item").
    """
    words = [target[k] for k in ("size", "color") if k in target]
    return " ".join([*words, target.get("shape", noun)])


def plural(target: dict, noun: str = "object") -> str:
    """Plural noun phrase: {} -> 'objects', {"color": "red", "shape": "star"} -> 'red stars'."""
    return phrase(target, noun) + "s"


def indefinite(text: str) -> str:
    """Prefix 'a' or 'an'."""
    return ("an " if text[0] in "aeiou" else "a ") + text


def combo_name(combo: Sequence[str]) -> str:
    """'red star' for ('red', 'star')."""
    return f"{combo[0]} {combo[1]}"


def unique_reference(scene: dict, obj: dict, qtype: str) -> dict | None:
    """Shortest target dict allowed for `qtype` that matches only `obj`, or None."""
    for keys in REFERENCES[qtype]:
        target = {k: obj[k] for k in keys}
        if len(find(scene, target)) == 1:
            return target
    return None


def the_one(scene: dict, target: dict) -> dict:
    """The one object matching `target`; ValueError when none or several do."""
    found = find(scene, target)
    if len(found) != 1:
        raise ValueError(f"scene {scene.get('id')}: {target} matches {len(found)} objects, not exactly one")
    return found[0]


def _offset(scene: dict, params: dict, axis: str) -> float:
    """a minus b along x or y; refuse when the relation would be ambiguous."""
    a, b = the_one(scene, params["a"]), the_one(scene, params["b"])
    delta = a[axis] - b[axis]
    if abs(delta) <= SPATIAL_MARGIN * scene["width" if axis == "x" else "height"]:
        raise ValueError(f"scene {scene.get('id')}: {params} is ambiguous (d{axis}={delta:.2f})")
    return delta


def answer(scene: dict, question_type: str, params: dict) -> str:
    """Re-derive the exact short answer of a question from the scene graph and its params.

    params by type: color/shape/size {"target": {...}}; count/exists {"filter": {...}};
    spatial {"a": {...}, "b": {...}, "relation": left|right|above|below} (yes/no) or
    {"a", "b", "axis": horizontal|vertical} (answers left/right or above/below).
    Raises ValueError when the question has no unique exact answer.
    """
    if question_type in ("color", "shape", "size"):
        return the_one(scene, params["target"])[question_type]
    if question_type == "count":
        return str(len(find(scene, params["filter"])))
    if question_type == "exists":
        return "yes" if find(scene, params["filter"]) else "no"
    if question_type == "spatial":
        if "relation" in params:
            relation = params["relation"]
            delta = _offset(scene, params, "x" if relation in ("left", "right") else "y")
            return "yes" if (delta < 0) == (relation in ("left", "above")) else "no"
        if params["axis"] == "horizontal":
            return "left" if _offset(scene, params, "x") < 0 else "right"
        return "above" if _offset(scene, params, "y") < 0 else "below"
    raise ValueError(f"unknown question type {question_type!r}; valid types are {QUESTION_TYPES}")


def _attribute_question(
    scene: dict, qtype: str, rng: np.random.Generator, templates: dict
) -> tuple[str, dict] | None:
    order = rng.permutation(len(scene["objects"]))
    for i in order:
        target = unique_reference(scene, scene["objects"][i], qtype)
        if target is not None:
            return ask_attribute(target, qtype, rng, templates), {"target": target}
    return None


def ask_attribute(target: dict, qtype: str, rng: np.random.Generator, templates: dict = TEMPLATES) -> str:
    """The question for attribute `qtype` (color, shape, size) of the object `target` names."""
    # "What shape is the red shape?" would be odd: shape questions say object, item or thing.
    noun = pick(rng, tuple(n for n in NOUNS if n != "shape") if qtype == "shape" else NOUNS)
    return pick(rng, templates[qtype]).format(a=phrase(target, noun))


def _random_filter(scene: dict, rng: np.random.Generator) -> dict:
    """A filter for count/exists: half the time one describing a present object, else any."""
    keys = pick(rng, (("shape",), ("color",), ("color", "shape"), ("size", "shape")))
    if rng.random() < 0.5:
        obj = scene["objects"][int(rng.integers(len(scene["objects"])))]
        return {k: obj[k] for k in keys}
    vocab = {"color": COLORS, "shape": SHAPES, "size": SIZES}
    return {k: pick(rng, vocab[k]) for k in keys}


def _count_question(scene: dict, rng: np.random.Generator, templates: dict) -> tuple[str, dict]:
    if rng.random() < COUNT_ALL:  # its own wordings, none of which names a kind of object
        return pick(rng, templates["count_all"]), {"filter": {}}
    target = _random_filter(scene, rng)
    return pick(rng, templates["count"]).format(p=plural(target, pick(rng, NOUNS))), {"filter": target}


def _exists_question(scene: dict, rng: np.random.Generator, templates: dict) -> tuple[str, dict]:
    # Pick the answer first so yes and no are balanced, then a filter that gives it.
    want = "yes" if rng.random() < 0.5 else "no"
    target = _random_filter(scene, rng)
    for _ in range(20):
        if answer(scene, "exists", {"filter": target}) == want:
            break
        target = _random_filter(scene, rng)
    name = phrase(target, pick(rng, NOUNS))
    text = pick(rng, templates["exists"]).format(n=indefinite(name), p=name + "s", a=name)
    return text, {"filter": target}


def _spatial_question(scene: dict, rng: np.random.Generator, templates: dict) -> tuple[str, dict] | None:
    objs = scene["objects"]
    pairs = [(i, j) for i in range(len(objs)) for j in range(len(objs)) if i != j]
    for k in rng.permutation(len(pairs)):
        i, j = pairs[k]
        a, b = unique_reference(scene, objs[i], "spatial"), unique_reference(scene, objs[j], "spatial")
        if a is None or b is None:
            continue
        axes = [
            ax
            for ax, key, side in (("horizontal", "x", "width"), ("vertical", "y", "height"))
            if abs(objs[i][key] - objs[j][key]) > SPATIAL_MARGIN * scene[side]
        ]
        if not axes:
            continue
        axis = pick(rng, axes)
        if rng.random() < 0.5:
            relation = pick(rng, ("left", "right") if axis == "horizontal" else ("above", "below"))
            params = {"a": a, "b": b, "relation": relation}
        else:
            relation, params = axis, {"a": a, "b": b, "axis": axis}
        return pick(rng, templates[relation]).format(a=phrase(a), b=phrase(b)), params
    return None


def make_question(
    scene: dict, question_type: str, rng: np.random.Generator, templates: dict = TEMPLATES
) -> tuple[str, dict] | None:
    """A (question, params) of the given type with a unique exact answer, or None if none exists.

    `templates` is the wording to draw from (`wordings.py`): TEMPLATES, or SHIFTED_TEMPLATES for the
    shifted split.
    """
    if question_type in ("color", "shape", "size"):
        return _attribute_question(scene, question_type, rng, templates)
    if question_type == "count":
        return _count_question(scene, rng, templates)
    if question_type == "exists":
        return _exists_question(scene, rng, templates)
    if question_type == "spatial":
        return _spatial_question(scene, rng, templates)
    raise ValueError(f"unknown question type {question_type!r}; valid types are {QUESTION_TYPES}")


def questions(scene: dict, rng: np.random.Generator, n: int, templates: dict = TEMPLATES) -> list[dict]:
    """Up to n questions of distinct types, each {"question_type", "question", "params", "answer"}."""
    out: list[dict] = []
    for i in rng.permutation(len(QUESTION_TYPES)):
        qtype = QUESTION_TYPES[i]
        made = make_question(scene, qtype, rng, templates)
        if made is not None:
            text, params = made
            out.append(
                {
                    "question_type": qtype,
                    "question": text,
                    "params": params,
                    "answer": answer(scene, qtype, params),
                }
            )
        if len(out) == n:
            break
    return out


def vqa_prompt(question: str, rng: np.random.Generator, instructions: Sequence[str] = INSTRUCTIONS) -> str:
    """A single-turn VQA prompt: the question, then an answer-format instruction (none in NO_INSTRUCTION)."""
    if rng.random() < NO_INSTRUCTION:
        return question
    return f"{question}\n{pick(rng, instructions)}"


def left_to_right(scene: dict) -> list[dict]:
    """The scene's objects ordered by x, then y (the order captions, descriptions and the projector use)."""
    return sorted(scene["objects"], key=lambda o: (o["x"], o["y"]))


def join(parts: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: dict) -> str:
    """Short caption listing the objects left to right: 'a small red star and a large blue circle'."""
    return join([indefinite(phrase(o)) for o in left_to_right(scene)])


def _band(fraction: float) -> int:
    """0, 1 or 2: which band of an axis a centre lies in, read through its position digit (0-9):
    digits 0-2, 3-6 and 7-9 (the bands are 30%, 40% and 30% of the side)."""
    digit = min(int(fraction * POSITION_BINS), POSITION_BINS - 1)
    return 0 if digit <= 2 else 1 if digit <= 6 else 2


def region(scene: dict, obj: dict) -> str:
    """Where an object is, by its position digits: 'top left', 'top', 'left', 'center', 'bottom right'.

    Each axis is cut where the object_words projector's digits (POSITION_BINS of them) change, so the
    region is a function of the two digits the LLM reads ("small red star 1 8" is at the bottom left).
    """
    col = ("left", "", "right")[_band(obj["x"] / scene["width"])]
    row = ("top", "", "bottom")[_band(obj["y"] / scene["height"])]
    return " ".join(w for w in (row, col) if w) or "center"


def where(scene: dict, obj: dict) -> str:
    """The region with its preposition: 'at the top left', 'on the left', 'in the center'."""
    name = region(scene, obj)
    if name == "center":
        return "in the center"
    return f"on the {name}" if name in ("left", "right") else f"at the {name}"


def object_list(scene: dict, objects: Sequence[dict]) -> str:
    """'a small red star at the top left, a large blue circle in the center and ...' (in the given order)."""
    return join([f"{indefinite(phrase(o))} {where(scene, o)}" for o in objects])


def detailed(scene: dict, rng: np.random.Generator) -> str:
    """A detailed description: how many objects, then each one left to right with its size, colour,
    shape and region: 'There are 2 objects: a small red star at the top left and a large blue circle in
    the center.' One draw from `rng` (the opener)."""
    objs = left_to_right(scene)
    n = len(objs)
    opener = pick(rng, ("There {v} {n} {o}:", "The image shows {n} {o}:", "I can see {n} {o}:"))
    head = opener.format(v="is" if n == 1 else "are", n=n, o="object" if n == 1 else "objects")
    return f"{head} {object_list(scene, objs)}."


def class_label(scene: dict) -> str:
    """The majority shape; a tie goes to the tied shape whose object is leftmost (smallest x, then y)."""
    counts = {s: sum(o["shape"] == s for o in scene["objects"]) for s in SHAPES}
    best = max(counts.values())
    return next(o["shape"] for o in left_to_right(scene) if counts[o["shape"]] == best)


def classify_prompt() -> str:
    """The classification question; it lists the candidate labels."""
    return (
        "Which shape appears most often in the image? If several are tied, choose the leftmost of them. "
        f"Answer with one of: {', '.join(LABELS)}."
    )
