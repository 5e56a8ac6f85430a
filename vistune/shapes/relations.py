"""The question kinds that relate objects and bind colours to shapes, derived from a scene graph alone.

Four question types beside the six of `questions.py` (whose meaning they leave as it was):

- nearer: "Which is nearer to the green square, the red star or the blue circle?" -> "red star".
  Distances between centres; asked only when the two distances differ by more than NEAR_MARGIN of the
  image side.
- largest: "Which object is the largest?" (asked when exactly one of two or more objects is large;
  "smallest" likewise) or "Which is larger, the red star or the blue circle?" (asked when their sizes
  differ) -> "red star". Sizes are the scene's small and large, what perception reads.
- count_pair: "How many red stars are there?" about a colour and a shape that both appear in the image;
  half the time (where the image allows) a pair that no single object has, so the answer is 0.
- binding: "Is there a blue star?" about a colour and a shape that both appear: "yes" when one object
  has both, "no" when they belong to different objects, half and half; only asked of images where some
  colour and shape appear apart (a red star beside a blue circle).

Objects in nearer and largest questions are named by colour and shape, only where that names exactly
one object, and the answer is that name. `answer` re-derives every answer from the scene and params.
"""

from __future__ import annotations

import numpy as np

from vistune.shapes import questions as Q
from vistune.shapes.wordings import TEMPLATES

RELATION_TYPES = ("nearer", "largest", "count_pair", "binding")
NAMED_ANSWERS = ("nearer", "largest")  # answered with an object's colour and shape ("red star")
NEAR_MARGIN = 0.15  # fraction of the side by which the two distances of a nearer question must differ


def name_target(scene: dict, obj: dict) -> dict | None:
    """{"color", "shape"} of an object when no other object has both, else None."""
    target = {"color": obj["color"], "shape": obj["shape"]}
    return target if len(Q.find(scene, target)) == 1 else None


def _name(target: dict) -> str:
    return f"{target['color']} {target['shape']}"


def _distance(a: dict, b: dict) -> float:
    return float(np.hypot(a["x"] - b["x"], a["y"] - b["y"]))


def _nearer(scene: dict, params: dict) -> str:
    a, b, to = (Q.the_one(scene, params[k]) for k in ("a", "b", "to"))
    da, db = _distance(a, to), _distance(b, to)
    if abs(da - db) <= NEAR_MARGIN * scene["width"]:
        raise ValueError(f"scene {scene.get('id')}: {params} is ambiguous (distances {da:.1f}, {db:.1f})")
    return _name(params["a"] if da < db else params["b"])


def _largest(scene: dict, params: dict) -> str:
    if "extreme" in params:
        size = "large" if params["extreme"] == "largest" else "small"
        found = Q.find(scene, {"size": size})
        if len(scene["objects"]) < 2 or len(found) != 1 or name_target(scene, found[0]) is None:
            raise ValueError(f"scene {scene.get('id')}: no single {params['extreme']} object to name")
        return _name(found[0])
    a, b = Q.the_one(scene, params["a"]), Q.the_one(scene, params["b"])
    if a["size"] == b["size"]:
        raise ValueError(f"scene {scene.get('id')}: {params} compares two objects of one size")
    want = "large" if params["compare"] == "larger" else "small"
    return _name(params["a"] if a["size"] == want else params["b"])


def answer(scene: dict, question_type: str, params: dict) -> str:
    """The exact answer of a question of any type (these four and the six of `questions.py`).

    params by type: nearer {"a", "b", "to"} (colour+shape targets); largest {"extreme":
    largest|smallest} or {"a", "b", "compare": larger|smaller}; count_pair and binding {"filter":
    {"color", "shape"}}. Raises ValueError when the question has no unique exact answer.
    """
    if question_type == "nearer":
        return _nearer(scene, params)
    if question_type == "largest":
        return _largest(scene, params)
    if question_type == "count_pair":
        return Q.answer(scene, "count", params)
    if question_type == "binding":
        return Q.answer(scene, "exists", params)
    return Q.answer(scene, question_type, params)


def _named_objects(scene: dict) -> list[tuple[dict, dict]]:
    return [(o, t) for o in scene["objects"] if (t := name_target(scene, o)) is not None]


def _nearer_question(scene: dict, rng: np.random.Generator, templates: dict) -> tuple[str, dict] | None:
    named = _named_objects(scene)
    n = len(named)
    triples = [(i, j, k) for i in range(n) for j in range(n) for k in range(n) if len({i, j, k}) == 3]
    for t in rng.permutation(len(triples)):
        (a, ta), (b, tb), (c, tc) = (named[i] for i in triples[t])
        if abs(_distance(a, c) - _distance(b, c)) > NEAR_MARGIN * scene["width"]:
            text = Q.pick(rng, templates["nearer"]).format(a=_name(ta), b=_name(tb), c=_name(tc))
            return text, {"a": ta, "b": tb, "to": tc}
    return None


def _largest_question(scene: dict, rng: np.random.Generator, templates: dict) -> tuple[str, dict] | None:
    extremes = []
    for extreme, size in (("largest", "large"), ("smallest", "small")):
        found = Q.find(scene, {"size": size})
        if len(scene["objects"]) >= 2 and len(found) == 1 and name_target(scene, found[0]) is not None:
            extremes.append(extreme)
    named = _named_objects(scene)
    pairs = [(a, b) for a in named for b in named if a[0]["size"] != b[0]["size"]]
    if extremes and (not pairs or rng.random() < 0.5):
        extreme = Q.pick(rng, extremes)
        return Q.pick(rng, templates[extreme]), {"extreme": extreme}
    if not pairs:
        return None
    (_, ta), (_, tb) = pairs[int(rng.integers(len(pairs)))]
    compare = Q.pick(rng, ("larger", "smaller"))
    text = Q.pick(rng, templates[compare]).format(a=_name(ta), b=_name(tb))
    return text, {"a": ta, "b": tb, "compare": compare}


def pairs_in_view(scene: dict) -> tuple[list[dict], list[dict]]:
    """Colour+shape filters whose colour and shape both appear: (those one object has, those apart)."""
    colors = {o["color"] for o in scene["objects"]}
    shapes = {o["shape"] for o in scene["objects"]}
    both = [{"color": c, "shape": s} for c in Q.COLORS if c in colors for s in Q.SHAPES if s in shapes]
    present = [f for f in both if Q.find(scene, f)]
    return present, [f for f in both if not Q.find(scene, f)]


def _count_pair_question(scene: dict, rng: np.random.Generator, templates: dict) -> tuple[str, dict]:
    present, apart = pairs_in_view(scene)
    target = Q.pick(rng, apart if apart and rng.random() < 0.5 else present)
    return Q.pick(rng, templates["count"]).format(p=Q.plural(target)), {"filter": target}


def _binding_question(scene: dict, rng: np.random.Generator, templates: dict) -> tuple[str, dict] | None:
    present, apart = pairs_in_view(scene)
    if not apart:
        return None
    target = Q.pick(rng, present if rng.random() < 0.5 else apart)
    name = Q.phrase(target)
    text = Q.pick(rng, templates["exists"]).format(n=Q.indefinite(name), p=name + "s", a=name)
    return text, {"filter": target}


MAKERS = {
    "nearer": _nearer_question,
    "largest": _largest_question,
    "count_pair": _count_pair_question,
    "binding": _binding_question,
}


def make_question(
    scene: dict, question_type: str, rng: np.random.Generator, templates: dict = TEMPLATES
) -> tuple[str, dict] | None:
    """A (question, params) of one of RELATION_TYPES with a unique exact answer, or None if the scene
    allows none (`templates`: TEMPLATES, or SHIFTED_TEMPLATES for the shifted split)."""
    if question_type not in MAKERS:
        raise ValueError(f"unknown question type {question_type!r}; valid types are {RELATION_TYPES}")
    return MAKERS[question_type](scene, rng, templates)


def relation_questions(scene: dict, rng: np.random.Generator, templates: dict = TEMPLATES) -> list[dict]:
    """One question of each of RELATION_TYPES the scene allows, in a random order; each
    {"question_type", "question", "params", "answer"}."""
    out = []
    for i in rng.permutation(len(RELATION_TYPES)):
        qtype = RELATION_TYPES[i]
        made = make_question(scene, qtype, rng, templates)
        if made is not None:
            text, params = made
            ans = answer(scene, qtype, params)
            out.append({"question_type": qtype, "question": text, "params": params, "answer": ans})
    return out
