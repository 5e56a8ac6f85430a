"""Conversations that go on: follow-ups that refer back, "what else is there?", and questions the image
cannot answer, derived from a scene graph alone.

Each conversation is about one image; its last turn is the one scored (its kind is the record's
`question_type`), the earlier turns hold their right answers. The kinds of the last turn (TURN_KINDS):

- refer_back: "What colour is the star?" -> "red"; "And what size is it?" -> "small". "It" is the object
  the first turn asked about, and the follow-up asks an attribute that neither turn has named.
- neighbour: "What colour is the star?" -> "red"; "And what shape is the object just to its left?" ->
  "circle". The neighbour is the next object in left-to-right order, asked about only when the order
  is not in doubt: the object, its neighbour, the object beyond the neighbour and the object on the
  other side are each more than SPATIAL_MARGIN of the side apart in x.
- what_else: the first turn asks about an object; "What else is there?" -> every other object, left to
  right, as in a caption ("a large blue circle and a small green square"), or NOTHING_ELSE.
- unanswerable: "What is the star's name?", "What time is it in the picture?" -> CANNOT_TELL, as the
  first turn or after a question about an object.

Conversation turns carry no answer-format instruction (as in conversations.json). `answer` re-derives
the scored answer from the scene and the last turn's params.
"""

from __future__ import annotations

import numpy as np

from vistune.shapes import questions as Q
from vistune.shapes.wordings import CANNOT_TELL, NOTHING_ELSE, TEMPLATES

TURN_KINDS = ("refer_back", "neighbour", "what_else", "unanswerable")
ATTRIBUTES = ("color", "shape", "size")
ATTRIBUTE_WORDS = {"color": ("color", "colour"), "shape": ("shape",), "size": ("size",)}


def neighbour(scene: dict, obj: dict, side: str) -> dict:
    """The object just to the `side` (left or right) of `obj`; ValueError when the order is in doubt."""
    objs = Q.left_to_right(scene)
    i = objs.index(obj)
    step = -1 if side == "left" else 1
    chain = [objs[k] if 0 <= k < len(objs) else None for k in (i - step, i, i + step, i + 2 * step)]
    if chain[2] is None:
        raise ValueError(f"scene {scene.get('id')}: nothing to the {side} of the {Q.phrase(obj)}")
    margin = Q.SPATIAL_MARGIN * scene["width"]
    for a, b in zip(chain[:-1], chain[1:], strict=True):
        if a is not None and b is not None and abs(a["x"] - b["x"]) <= margin:
            raise ValueError(f"scene {scene.get('id')}: the order next to the {Q.phrase(obj)} is in doubt")
    return chain[2]


def others(scene: dict, named: list[dict]) -> str:
    """The objects that none of the `named` targets names, left to right, as a caption; NOTHING_ELSE
    when there are none."""
    mentioned = [Q.the_one(scene, target) for target in named]
    rest = [o for o in Q.left_to_right(scene) if not any(o is m for m in mentioned)]
    return Q.join([Q.indefinite(Q.phrase(o)) for o in rest]) if rest else NOTHING_ELSE


def answer(scene: dict, kind: str, params: dict) -> str:
    """The scored answer of a last turn of `kind`.

    params by kind: refer_back {"target", "attribute"}; neighbour {"target", "side", "attribute"};
    what_else {"named": [targets]}; unanswerable {} (any object it names is in "object").
    """
    if kind == "refer_back":
        return Q.answer(scene, params["attribute"], {"target": params["target"]})
    if kind == "neighbour":
        return neighbour(scene, Q.the_one(scene, params["target"]), params["side"])[params["attribute"]]
    if kind == "what_else":
        return others(scene, params["named"])
    if kind == "unanswerable":
        return CANNOT_TELL
    raise ValueError(f"unknown turn kind {kind!r}; valid kinds are {TURN_KINDS}")


def _first_turn(scene: dict, obj: dict, rng: np.random.Generator, templates: dict) -> tuple | None:
    """The turn (question_type, question, params, answer) asking an attribute of `obj`, or None when
    `obj` has no unique name for any attribute."""
    for i in rng.permutation(len(ATTRIBUTES)):
        qtype = ATTRIBUTES[i]
        target = Q.unique_reference(scene, obj, qtype)
        if target is not None:
            return qtype, Q.ask_attribute(target, qtype, rng, templates), {"target": target}, obj[qtype]
    return None


def _follow_up(scene: dict, kind: str, first: tuple, rng: np.random.Generator, templates: dict):
    """(question, params) of a last turn of `kind` after the `first` turn, or None if not possible."""
    asked, _, params, _ = first
    target = params["target"]
    if kind == "what_else":
        return Q.pick(rng, templates["what_else"]), {"named": [target]}
    if kind == "refer_back":
        left = [a for a in ATTRIBUTES if a != asked and a not in target]
        if not left:
            return None
        attribute = Q.pick(rng, left)
        text = Q.pick(rng, templates["refer_back"]).format(attr=Q.pick(rng, ATTRIBUTE_WORDS[attribute]))
        return text, {"target": target, "attribute": attribute}
    sides = [side for side in ("left", "right") if _has_neighbour(scene, target, side)]
    if not sides:
        return None
    side, attribute = Q.pick(rng, sides), Q.pick(rng, ATTRIBUTES)
    word = Q.pick(rng, ATTRIBUTE_WORDS[attribute])
    text = Q.pick(rng, templates["neighbour"]).format(attr=word, side=side)
    return text, {"target": target, "side": side, "attribute": attribute}


def _has_neighbour(scene: dict, target: dict, side: str) -> bool:
    try:
        neighbour(scene, Q.the_one(scene, target), side)
    except ValueError:
        return False
    return True


def _unanswerable(scene: dict, rng: np.random.Generator, templates: dict) -> list[tuple]:
    """The turns of an unanswerable conversation: the question alone or after one about an object."""
    obj = scene["objects"][int(rng.integers(len(scene["objects"])))]
    first = _first_turn(scene, obj, rng, templates) if rng.random() < 0.5 else None
    name = Q.phrase({k: obj[k] for k in ("color", "shape")})
    last = ("unanswerable", Q.pick(rng, templates["unanswerable"]).format(a=name), {}, CANNOT_TELL)
    return [first, last] if first else [last]


def conversation(scene: dict, rng: np.random.Generator, templates: dict = TEMPLATES) -> list[tuple]:
    """The turns of one conversation whose last turn is of the first of TURN_KINDS, in a random order,
    that the scene allows: (question_type, question, params, answer) each, the last one scored (its
    question_type is its kind)."""
    for i in rng.permutation(len(TURN_KINDS)):
        kind = TURN_KINDS[i]
        if kind == "unanswerable":
            return _unanswerable(scene, rng, templates)
        for k in rng.permutation(len(scene["objects"])):
            first = _first_turn(scene, scene["objects"][k], rng, templates)
            made = _follow_up(scene, kind, first, rng, templates) if first else None
            if made:
                text, params = made
                return [first, (kind, text, params, answer(scene, kind, params))]
    raise AssertionError("unreachable: an unanswerable turn is always possible")
