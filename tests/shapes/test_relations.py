"""Tests for the question kinds that relate objects and bind colours to shapes: every answer re-derived here
from the scene graph alone, the conditions under which each kind is asked, their wordings and balance."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from vistune.shapes import questions as Q
from vistune.shapes import relations as R
from vistune.shapes import scenes as S
from vistune.shapes import synth
from vistune.shapes import wordings as W

SCENES = (
    [S.sample_scene(5, "train", i) for i in range(300)]
    + [S.sample_scene(5, "shifted", i) for i in range(80)]
    + [S.sample_scene(5, "compositional", i) for i in range(80)]
)
RECORDS = [(s, r) for s in SCENES for r in synth.extra_texts(s, 5)["relations"]]


def _obj(color, shape, size="small", x=10.0, y=10.0):
    return {"color": color, "shape": shape, "size": size, "x": x, "y": y}


def _scene(*objects):
    return {"id": "train-000000", "split": "train", "width": 100, "height": 100, "objects": list(objects)}


def _one(scene, target):
    (obj,) = [o for o in scene["objects"] if all(o[k] == v for k, v in target.items())]
    return obj


def _independent_answer(scene, qtype, params):
    """A second derivation of each answer (not calling R.answer), asserting the asking conditions."""
    objs = scene["objects"]
    if qtype == "nearer":
        a, b, c = (_one(scene, params[k]) for k in ("a", "b", "to"))
        da, db = (float(np.hypot(o["x"] - c["x"], o["y"] - c["y"])) for o in (a, b))
        assert abs(da - db) > 0.15 * scene["width"]
        closer = a if da < db else b
        return f"{closer['color']} {closer['shape']}"
    if qtype == "largest":
        if "extreme" in params:
            size = {"largest": "large", "smallest": "small"}[params["extreme"]]
            (obj,) = [o for o in objs if o["size"] == size]
            assert len(objs) >= 2
        else:
            a, b = _one(scene, params["a"]), _one(scene, params["b"])
            assert a["size"] != b["size"]
            obj = a if (a["size"] == "large") == (params["compare"] == "larger") else b
        _one(scene, {"color": obj["color"], "shape": obj["shape"]})  # its name names it alone
        return f"{obj['color']} {obj['shape']}"
    color, shape = params["filter"]["color"], params["filter"]["shape"]
    assert any(o["color"] == color for o in objs) and any(o["shape"] == shape for o in objs)
    n = sum(o["color"] == color and o["shape"] == shape for o in objs)
    return str(n) if qtype == "count_pair" else ("yes" if n else "no")


def test_every_answer_matches_the_scene_graph():
    seen = Counter()
    for scene, r in RECORDS:
        qtype = r["question_type"]
        assert r["answer"] == r["conversations"][1]["value"]
        assert (
            r["answer"]
            == _independent_answer(scene, qtype, r["params"])
            == R.answer(scene, qtype, r["params"])
        )
        seen[qtype] += 1
    assert set(seen) == set(R.RELATION_TYPES) and min(seen.values()) > 100, seen


def test_the_question_names_the_objects_its_params_name():
    for _, r in RECORDS:
        question = r["conversations"][0]["value"].removeprefix("<image>\n").split("\n")[0]
        params = r["params"]
        for key in ("a", "b", "to"):
            if key in params:
                assert f"the {params[key]['color']} {params[key]['shape']}" in question, (question, params)
        if "filter" in params:
            assert re.search(rf"\b{params['filter']['color']} {params['filter']['shape']}s?\b", question)
        if "extreme" in params:
            assert not set(re.findall(r"[a-z]+", question.lower())) & set(Q.COLORS), question


def test_binding_asks_about_pairs_that_are_there_or_apart_half_and_half():
    answers = Counter()
    for scene, r in RECORDS:
        if r["question_type"] != "binding":
            continue
        answers[r["answer"]] += 1
        present, apart = R.pairs_in_view(scene)
        assert r["params"]["filter"] in (present if r["answer"] == "yes" else apart)
    assert 0.4 < answers["yes"] / answers.total() < 0.6, answers


def test_count_pair_asks_for_pairs_no_object_has_too():
    answers = Counter(r["answer"] for _, r in RECORDS if r["question_type"] == "count_pair")
    assert 0.25 < answers["0"] / answers.total() < 0.6 and answers["1"] and answers["2"], answers


def test_named_answers_get_their_own_instructions():
    for scene, r in RECORDS:
        prompt = r["conversations"][0]["value"]
        instruction = prompt.split("\n")[2] if prompt.count("\n") == 2 else None
        named = r["question_type"] in R.NAMED_ANSWERS
        shifted = scene["split"] == "shifted"
        allowed = {
            (True, False): W.NAME_INSTRUCTIONS, (True, True): W.SHIFTED_NAME_INSTRUCTIONS,
            (False, False): W.INSTRUCTIONS, (False, True): W.SHIFTED_INSTRUCTIONS,
        }[(named, shifted)]  # fmt: skip
        assert instruction is None or instruction in allowed, prompt


def test_hand_made_scenes():
    scene = _scene(
        _obj("red", "star", "small", x=10, y=10),
        _obj("blue", "circle", "large", x=80, y=10),
        _obj("green", "square", "small", x=20, y=30),
        _obj("blue", "star", "small", x=60, y=90),
    )
    near = {"a": {"color": "red", "shape": "star"}, "b": {"color": "blue", "shape": "circle"},
            "to": {"color": "green", "shape": "square"}}  # fmt: skip
    assert R.answer(scene, "nearer", near) == "red star"
    assert R.answer(scene, "largest", {"extreme": "largest"}) == "blue circle"
    with pytest.raises(ValueError, match="no single smallest"):
        R.answer(scene, "largest", {"extreme": "smallest"})
    pair = {"a": {"color": "red", "shape": "star"}, "b": {"color": "blue", "shape": "circle"}}
    assert R.answer(scene, "largest", pair | {"compare": "smaller"}) == "red star"
    assert R.answer(scene, "count_pair", {"filter": {"color": "blue", "shape": "square"}}) == "0"
    assert R.answer(scene, "binding", {"filter": {"color": "red", "shape": "circle"}}) == "no"
    assert R.answer(scene, "binding", {"filter": {"color": "blue", "shape": "star"}}) == "yes"
    present, apart = R.pairs_in_view(scene)
    assert {"color": "red", "shape": "circle"} in apart and {"color": "blue", "shape": "star"} in present


def test_ambiguous_relations_are_refused_and_never_asked():
    # three corners of an equilateral triangle: every object is as far from the other two
    tie = _scene(_obj("red", "star", x=50, y=50), _obj("blue", "circle", x=80, y=50),
                 _obj("green", "square", x=65, y=75.98))  # fmt: skip
    params = {"a": {"color": "blue", "shape": "circle"}, "b": {"color": "green", "shape": "square"},
              "to": {"color": "red", "shape": "star"}}  # fmt: skip
    with pytest.raises(ValueError, match="ambiguous"):
        R.answer(tie, "nearer", params)
    assert all(R.make_question(tie, "nearer", np.random.default_rng(i)) is None for i in range(5))
    same = _scene(_obj("red", "star", "large"), _obj("blue", "circle", "large", x=60))
    assert R.make_question(same, "largest", np.random.default_rng(0)) is None
    one_kind = _scene(_obj("red", "star"), _obj("red", "star", x=60))  # nothing apart, no unique names
    assert R.make_question(one_kind, "binding", np.random.default_rng(0)) is None
    assert R.make_question(one_kind, "nearer", np.random.default_rng(0)) is None
    with pytest.raises(ValueError, match="unknown question type"):
        R.make_question(one_kind, "farthest", np.random.default_rng(0))
