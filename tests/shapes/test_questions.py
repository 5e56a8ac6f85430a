"""Tests for the texts of the shapes world: every answer is re-derived here from the scene graph alone, for
every wording (the seen templates and the shifted split's held-out ones)."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from vistune.shapes import pope, synth
from vistune.shapes import questions as Q
from vistune.shapes import scenes as S
from vistune.shapes import wordings as W

SCENES = [S.sample_scene(5, "train", i) for i in range(300)] + [
    S.sample_scene(5, "shifted", i) for i in range(100)
]
TEXTS = [synth.scene_texts(s, 5) for s in SCENES]
WORDINGS = {"seen": W.TEMPLATES, "shifted": W.SHIFTED_TEMPLATES}
# The keys of TEMPLATES each question type draws from.
KINDS = {
    "color": ("color",),
    "shape": ("shape",),
    "size": ("size",),
    "count": ("count", "count_all"),
    "exists": ("exists",),
    "spatial": ("left", "right", "above", "below", "horizontal", "vertical"),
}


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
    assert abs(dx if horizontal else dy) > 0.1 * scene["width"]  # only unambiguous relations are asked
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
        question = _question_line(question)
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
            assert words & STEMS[params["relation"]], question
        if params.get("filter") == {}:  # a total count names no kind of object
            assert not words & VOCABULARY, question


STEMS = {
    "left": {"left"},
    "right": {"right"},
    "above": {"above", "higher", "over", "up", "top"},
    "below": {"below", "lower", "under", "beneath", "underneath", "down", "bottom"},
}
VOCABULARY = {w for vocab in (Q.COLORS, Q.SHAPES, Q.SIZES) for v in vocab for w in (v, v + "s")}


_WORD = "(?:" + "|".join(sorted(VOCABULARY | {n + e for n in Q.NOUNS for e in ("", "s")})) + ")"
PHRASE = f"(?:an? )?{_WORD}(?: {_WORD}){{0,2}}"  # "a small red star", "red items", "circle"


def _pattern(template: str) -> re.Pattern:
    """A template as a regex: each {field} a named group holding an object phrase (repeats must match)."""
    named: set[str] = set()

    def group(m: re.Match) -> str:
        if m[1] in named:
            return f"(?P={m[1]})"
        named.add(m[1])
        return f"(?P<{m[1]}>{PHRASE})"

    return re.compile(re.sub(r"\\\{(\w)\\\}", group, re.escape(template)))


PATTERNS = [
    (name, kind, t, _pattern(t))
    for name, templates in WORDINGS.items()
    for kind, ts in templates.items()
    for t in ts
]


def _question_line(prompt: str) -> str:
    """The question of a prompt, without the image placeholder and the answer-format instruction."""
    return prompt.removeprefix("<image>\n").split("\n")[0]


def _kind(qtype: str, params: dict) -> str:
    """Which key of the templates worded a question of this type with these params."""
    if qtype == "spatial":
        return params.get("relation") or params["axis"]
    if qtype == "count" and params["filter"] == {}:
        return "count_all"
    return qtype


def _wording(question: str) -> set[tuple[str, str, str]]:
    """Every (wording set, kind, template) the question text matches."""
    return {(name, kind, t) for name, kind, t, pattern in PATTERNS if pattern.fullmatch(question)}


def test_both_wordings_cover_every_kind_and_share_no_template():
    assert W.TEMPLATES.keys() == W.SHIFTED_TEMPLATES.keys()
    for kind in W.TEMPLATES:
        assert len(W.TEMPLATES[kind]) >= 5 and len(W.SHIFTED_TEMPLATES[kind]) >= 2, kind
        seen = {t.lower() for t in W.TEMPLATES[kind]}
        assert len(seen) == len(W.TEMPLATES[kind]) and not seen & {
            t.lower() for t in W.SHIFTED_TEMPLATES[kind]
        }
    assert not set(W.INSTRUCTIONS) & set(W.SHIFTED_INSTRUCTIONS) and len(W.INSTRUCTIONS) >= 4


@pytest.mark.parametrize("wording", sorted(WORDINGS))
def test_every_template_says_what_its_kind_asks(wording):
    fields = {"color": {"a"}, "shape": {"a"}, "size": {"a"}, "count": {"p"}, "count_all": set(),
              "exists": {"n", "p", "a"}, "caption": set(), "detailed": set(), "nearer": {"a", "b", "c"},
              "largest": set(), "smallest": set(), "larger": {"a", "b"}, "smaller": {"a", "b"},
              "refer_back": {"attr"}, "neighbour": {"attr", "side"}, "what_else": set()}  # fmt: skip
    says = {"nearer": {"nearer", "closer"}, "largest": {"largest", "biggest"},
            "smallest": {"smallest", "tiniest"}, "larger": {"larger", "bigger"}, "smaller": {"smaller"},
            "what_else": {"else", "other", "besides"}}  # fmt: skip
    for kind, templates in WORDINGS[wording].items():
        for t in templates:
            words = set(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", "", t).lower()))
            used = set(re.findall(r"\{(\w+)\}", t))
            if kind in says:
                assert words & says[kind], t
            if kind == "unanswerable":  # about an object of the image, or about nothing in it
                assert used <= {"a"}, t
                continue
            if kind in STEMS:  # yes/no: says its relation and not the opposite one
                opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}[kind]
                assert words & STEMS[kind] and not words & STEMS[opposite], t
                assert used == {"a", "b"}, t
            elif kind in ("horizontal", "vertical"):  # names both answers
                pair = {"left", "right"} if kind == "horizontal" else {"above", "below"}
                assert (pair <= words or words >= {"which", "side"}) and used == {"a", "b"}, t
            else:
                assert used and used <= fields[kind] if fields[kind] else not used, t
            if kind == "color":
                assert words & {"color", "colour"}, t
            if kind == "count_all":
                assert not words & VOCABULARY and words & {"many", "count", "number"}, t
            if kind == "size":
                assert words & {"size", "big", "large", "small"}, t


@pytest.mark.parametrize("wording", sorted(WORDINGS))
def test_every_template_gives_exact_answers(wording):
    """Each template alone, on many scenes: its text names the params and every answer is exact."""
    templates = WORDINGS[wording]
    scenes = [S.sample_scene(9, "train", i) for i in range(40)] + [
        S.sample_scene(9, "shifted", i) for i in range(20)
    ]
    for qtype, kinds in KINDS.items():
        for kind in kinds:
            for t in templates[kind]:
                only = {k: (t,) if k == kind else v for k, v in templates.items()}
                made = 0
                for i, scene in enumerate(scenes):
                    question = Q.make_question(scene, qtype, np.random.default_rng(i), only)
                    if question is None:
                        continue
                    text, params = question
                    if _kind(qtype, params) != kind:
                        continue  # another kind of the same question type
                    match = _pattern(t).fullmatch(text)
                    assert match, (t, text)
                    _check_fields(match.groupdict(), params)
                    ans = Q.answer(scene, qtype, params)
                    assert ans == _independent_answer(scene, qtype, params), (text, params)
                    made += 1
                assert made, (kind, t)


def _check_fields(fields: dict, params: dict) -> None:
    """The text filled into a template names exactly the object(s) the params say."""
    nouns = Q.NOUNS
    for key, field in (("a", "target"), ("a", "a"), ("b", "b")):
        if key in fields and field in params:
            target = params[field]
            expected = {Q.phrase(target, n) for n in nouns}
            assert fields[key] in expected, (fields, params)
    if "filter" in params:
        names = {Q.phrase(params["filter"], n) for n in nouns}
        if "p" in fields:
            assert fields["p"] in {n + "s" for n in names}, (fields, params)
        if "n" in fields:
            assert fields["n"] in {Q.indefinite(n) for n in names}, (fields, params)
        if "a" in fields:
            assert fields["a"] in names, (fields, params)


def test_each_split_is_worded_with_its_own_templates_and_instructions():
    no_instruction = Counter()
    for scene, texts in zip(SCENES, TEXTS, strict=True):
        wording = "shifted" if scene["split"] == "shifted" else "seen"
        instructions = W.SHIFTED_INSTRUCTIONS if wording == "shifted" else W.INSTRUCTIONS
        prompts = [r["conversations"][0]["value"] for r in texts["vqa"]]
        prompts += [t["value"] for t in texts["conversations"][0]["conversations"][::2]]
        prompts += [texts[task][0]["conversations"][0]["value"] for task in ("captions", "detailed")]
        for prompt in prompts:
            question, *instruction = prompt.removeprefix("<image>\n").split("\n")
            assert {w for w, _, _ in _wording(question)} == {wording}, question
            assert instruction in ([], *([i] for i in instructions)), prompt
        for r in texts["vqa"]:  # "<image>\nquestion" alone, or "<image>\nquestion\ninstruction"
            no_instruction[r["conversations"][0]["value"].count("\n") == 1] += 1
    assert 0.15 < no_instruction[True] / no_instruction.total() < 0.35


def test_answers_are_short_lowercase_words_or_digits():
    for _, _, _, _, ans in _all_questions():
        assert re.fullmatch(r"[a-z]+|[0-6]", ans), ans


def test_yes_no_answers_are_balanced():
    answers = [a for _, _, _, _, a in _all_questions() if a in ("yes", "no")]
    assert len(answers) > 100 and 0.4 < answers.count("yes") / len(answers) < 0.6


def test_many_paraphrases_per_type_are_used():
    used = Counter()
    for _, qtype, _, question, _ in _all_questions():
        for _, kind, template in _wording(_question_line(question)):
            used[(qtype, kind, template)] += 1
    for qtype in KINDS:
        assert len([k for k in used if k[0] == qtype]) >= 8, qtype
    assert {k[1] for k in used} == {k for kinds in KINDS.values() for k in kinds}
    total_counts = {_question_line(q) for _, t, p, q, _ in _all_questions() if _kind(t, p) == "count_all"}
    assert len(total_counts) >= 8


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


def _region_by_digits(scene, o):
    """A second derivation of an object's region: its position digits 0-9, cut 0-2 / 3-6 / 7-9."""
    band = [min(int(10 * o[k] / scene[side]), 9) for k, side in (("x", "width"), ("y", "height"))]
    col = ("left", "", "right")[(band[0] >= 3) + (band[0] >= 7)]
    row = ("top", "", "bottom")[(band[1] >= 3) + (band[1] >= 7)]
    name = f"{row} {col}".strip() or "center"
    fixed = {"center": "in the center", "left": "on the left", "right": "on the right"}
    return fixed.get(name, f"at the {name}")


def test_detailed_description_names_every_object_left_to_right_with_its_region():
    pattern = re.compile(r"(?:There (?:is|are)|The image shows|I can see) (\d) objects?: (.*)\.")
    for scene, texts in zip(SCENES, TEXTS, strict=True):
        text = texts["detailed"][0]["conversations"][1]["value"]
        match = pattern.fullmatch(text)
        assert match, text
        objects = sorted(scene["objects"], key=lambda o: (o["x"], o["y"]))
        assert int(match[1]) == len(objects)
        parts = re.split(r", | and (?=an? )", match[2])
        expected = [f"{'an' if o['size'][0] in 'aeiou' else 'a'} {o['size']} {o['color']} {o['shape']} "
                    f"{_region_by_digits(scene, o)}" for o in objects]  # fmt: skip
        assert parts == expected, text


def test_regions_follow_the_position_digits():
    cases = {(0.05, 0.05): "top left", (0.29, 0.5): "left", (0.3, 0.5): "center", (0.69, 0.69): "center",
             (0.7, 0.1): "top right", (0.5, 0.95): "bottom", (0.99, 0.99): "bottom right"}  # fmt: skip
    for (x, y), name in cases.items():
        assert Q.region(_scene(), {"x": x * 64, "y": y * 64}) == name, (x, y)


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
