"""Tests for the texts of the shapes world: every answer is re-derived here from the scene graph alone."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from vistune.shapes import pope, synth
from vistune.shapes import questions as Q
from vistune.shapes import scenes as S

SCENES = [S.sample_scene(5, "train", i) for i in range(300)]
TEXTS = [synth.scene_texts(s, 5) for s in SCENES]


def _obj(color, shape, size="small", x=10.0, y=10.0):
    return {"color": color, "shape": shape, "size": size, "x": x, "y": y, "radius": 5.76, "rotation": 0.0}


def _scene(*objects):
    return {"id": "train-000000", "split": "train", "width": 64, "height": 64, "objects": list(objects)}


def _matching(scene, target):
    return [o for o in scene["objects"] if all(o[k] == v for k, v in target.items())]


def _independent_answer(scene, qtype, params):
    """A second, separate derivation of each answer (not calling Q.answer)."""
    if qtype in ("color", "shape", "size"):
        (obj,) = _matching(scene, params["target"])  # exactly one object must match
        assert qtype not in params["target"]  # never name the asked attribute
        return obj[qtype]
    if qtype == "count":
        return str(len(_matching(scene, params["filter"])))
    if qtype == "exists":
        return "yes" if _matching(scene, params["filter"]) else "no"
    (a,), (b,) = _matching(scene, params["a"]), _matching(scene, params["b"])
    dx, dy = a["x"] - b["x"], a["y"] - b["y"]
    horizontal = params.get("relation") in ("left", "right") or params.get("axis") == "horizontal"
    assert abs(dx if horizontal else dy) > 0.1 * 64  # only unambiguous relations are asked
    if "relation" in params:
        truth = {"left": dx < 0, "right": dx > 0, "above": dy < 0, "below": dy > 0}[params["relation"]]
        return "yes" if truth else "no"
    if horizontal:
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _all_questions():
    for scene, texts in zip(SCENES, TEXTS, strict=True):
        for r in texts["vqa"]:
            yield scene, r["question_type"], r["params"], r["conversations"][0]["value"], r["answer"]
        conv = texts["conversations"][0]
        for i, (qtype, params, ans) in enumerate(
            zip(conv["question_types"], conv["params"], conv["answers"], strict=True)
        ):
            assert conv["conversations"][2 * i + 1]["value"] == ans
            yield scene, qtype, params, conv["conversations"][2 * i]["value"], ans


def test_every_answer_matches_the_scene_graph():
    seen = Counter()
    for scene, qtype, params, _question, ans in _all_questions():
        assert ans == _independent_answer(scene, qtype, params) == Q.answer(scene, qtype, params)
        seen[qtype] += 1
    assert set(seen) == set(Q.QUESTION_TYPES) and min(seen.values()) > 50


def test_question_text_names_what_params_say():
    for _, _qtype, params, question, _ in _all_questions():
        words = set(re.findall(r"[a-z]+", question.lower()))
        targets = [
            params.get("target", {}),
            params.get("filter", {}),
            params.get("a", {}),
            params.get("b", {}),
        ]
        for target in targets:
            for value in target.values():
                assert value in words or value + "s" in words, (question, params)
        if "relation" in params:
            stems = {
                "left": "left",
                "right": "right",
                "above": ("above", "higher", "over"),
                "below": ("below", "lower", "under"),
            }[params["relation"]]
            assert any(s in words for s in ([stems] if isinstance(stems, str) else stems)), question


def test_answers_are_short_lowercase_words_or_digits():
    for _, _, _, _, ans in _all_questions():
        assert re.fullmatch(r"[a-z]+|[0-6]", ans), ans


def test_yes_no_answers_are_balanced():
    answers = [a for _, _, _, _, a in _all_questions() if a in ("yes", "no")]
    assert len(answers) > 100 and 0.4 < answers.count("yes") / len(answers) < 0.6


def test_several_paraphrases_per_type():
    for qtype, templates in Q.TEMPLATES.items():
        assert len(templates) >= 3, qtype
    used = Counter()
    for _, qtype, _, question, _ in _all_questions():
        used[(qtype, question.split(" the ")[0].split(" a ")[0][:12])] += 1
    for qtype in Q.QUESTION_TYPES:
        assert len([k for k in used if k[0] == qtype]) >= 3, qtype


def test_ambiguous_questions_are_refused():
    two_stars = _scene(_obj("red", "star", x=10), _obj("blue", "star", x=50))
    with pytest.raises(ValueError, match="matches 2 objects"):
        Q.answer(two_stars, "color", {"target": {"shape": "star"}})
    close = _scene(_obj("red", "star", x=30), _obj("blue", "circle", x=34, y=50))
    with pytest.raises(ValueError, match="ambiguous"):
        Q.answer(close, "spatial", {"a": {"shape": "star"}, "b": {"shape": "circle"}, "relation": "left"})
    assert (
        Q.answer(close, "spatial", {"a": {"shape": "star"}, "b": {"shape": "circle"}, "axis": "vertical"})
        == "above"
    )
    # Identical objects are never referred to in a spatial question.
    twins = _scene(_obj("red", "star", x=10), _obj("red", "star", x=50))
    assert Q.make_question(twins, "spatial", np.random.default_rng(0)) is None
    assert Q.make_question(twins, "color", np.random.default_rng(0)) is None


def test_counts_of_zero_are_asked():
    zeros = [a for _, t, _, _, a in _all_questions() if t == "count" and a == "0"]
    assert zeros


def test_caption_lists_objects_left_to_right():
    scene = _scene(_obj("blue", "circle", "large", x=50), _obj("red", "star", "small", x=12))
    assert Q.caption(scene) == "a small red star and a large blue circle"
    scene["objects"].append(_obj("orange", "square", x=30))
    assert Q.caption(scene) == "a small red star, a small orange square and a large blue circle"
    assert Q.indefinite("orange star") == "an orange star"


def test_detailed_description_mentions_every_object_and_region():
    for scene, texts in zip(SCENES[:50], TEXTS[:50], strict=True):
        text = texts["detailed"][0]["conversations"][1]["value"]
        for o in scene["objects"]:
            assert f"{Q.phrase(o)} is" in text and Q.region(scene, o) in text
        for a, b in re.findall(r"The (\w+ \w+ \w+) is to the left of the (\w+ \w+ \w+)\.", text):
            (oa,) = [o for o in scene["objects"] if Q.phrase(o) == a]
            (ob,) = [o for o in scene["objects"] if Q.phrase(o) == b]
            assert oa["x"] < ob["x"] - 0.1 * 64


def test_class_label_is_majority_shape_with_leftmost_tie_break():
    assert (
        Q.class_label(
            _scene(_obj("red", "star", x=40), _obj("red", "star", x=50), _obj("blue", "circle", x=5))
        )
        == "star"
    )
    assert Q.class_label(_scene(_obj("red", "star", x=40), _obj("blue", "circle", x=5))) == "circle"
    for scene, texts in zip(SCENES, TEXTS, strict=True):
        counts = Counter(o["shape"] for o in scene["objects"])
        label = texts["classify"][0]["label"]
        assert counts[label] == max(counts.values())
        tied = [o for o in scene["objects"] if counts[o["shape"]] == counts[label]]
        assert min(tied, key=lambda o: o["x"])["shape"] == label
    prompt = Q.classify_prompt()
    assert all(label in prompt for label in Q.LABELS)


def test_pope_probes_follow_their_definitions():
    stats = pope.pope_stats(SCENES)
    freq = Counter(n for s in SCENES for n in {f"{o['color']} {o['shape']}" for o in s["objects"]})
    assert stats["frequency"] == dict(freq)
    for scene in SCENES[:100]:
        present = {f"{o['color']} {o['shape']}" for o in scene["objects"]}
        absent = [Q.combo_name(c) for c in Q.COMBOS if Q.combo_name(c) not in present]
        probes = pope.pope_probes(scene, np.random.default_rng(0), stats)
        for setting in pope.POPE_SETTINGS:
            mine = [p for p in probes if p["setting"] == setting]
            yes = {p["object"] for p in mine if p["answer"] == "yes"}
            no = [p["object"] for p in mine if p["answer"] == "no"]
            assert yes <= present and not set(no) & present and len(yes) == len(no) == min(3, len(present))
            if setting == "popular":  # the most frequent absent kinds in training
                assert min(freq[n] for n in no) >= max(freq[n] for n in absent if n not in no)
            if setting == "adversarial":  # absent kinds sharing a colour or shape with a present one
                shares = [n for n in absent if any(set(n.split()) & set(p.split()) for p in present)]
                assert set(no) <= set(shares) or set(shares) <= set(no)


def test_pope_records_ask_the_exact_question(tmp_path):
    stats = pope.pope_stats(SCENES)
    for r in synth.pope_records(SCENES[0], 5, stats):
        assert r["conversations"][0]["value"] == f"<image>\n{pope.pope_question(r['object'])}"
        assert re.fullmatch(r"Is there an? \w+ \w+ in the image\?", pope.pope_question(r["object"]))
        assert r["answer"] == r["conversations"][1]["value"] in ("yes", "no")
