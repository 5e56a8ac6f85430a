"""Tests for the follow-up conversations: every turn's answer re-derived here from the scene graph alone, the
kinds and their wordings, and the rendering of a record with the loss on the answers only."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from vistune.data.readers import to_record
from vistune.model.template import CHATML, IGNORE, render, set_chat_template
from vistune.shapes import multiturn as M
from vistune.shapes import scenes as S
from vistune.shapes import synth
from vistune.shapes import wordings as W

SCENES = [S.sample_scene(6, "train", i) for i in range(300)] + [
    S.sample_scene(6, "shifted", i) for i in range(60)
]
RECORDS = [(s, synth.extra_texts(s, 6)["multiturn"][0]) for s in SCENES]


def _one(scene, target):
    (obj,) = [o for o in scene["objects"] if all(o[k] == v for k, v in target.items())]
    return obj


def _neighbour(scene, obj, side):
    """A second derivation of "the object just to its left/right", asserting the order is clear."""
    objs = sorted(scene["objects"], key=lambda o: (o["x"], o["y"]))
    i = objs.index(obj)
    j = i - 1 if side == "left" else i + 1
    assert 0 <= j < len(objs)
    xs = [o["x"] for o in objs]
    for k in (i - 2, i - 1, i, i + 1):  # every gap around the object and its neighbour is wide
        if 0 <= k < len(objs) - 1 and {k, k + 1} & {i, j}:
            assert xs[k + 1] - xs[k] > 0.1 * scene["width"]
    return objs[j]


def _independent(scene, qtype, params, earlier):
    if qtype in ("color", "shape", "size"):
        assert qtype not in params["target"]
        return _one(scene, params["target"])[qtype]
    if qtype == "refer_back":
        assert params["target"] == earlier["target"] and params["attribute"] not in params["target"]
        return _one(scene, params["target"])[params["attribute"]]
    if qtype == "neighbour":
        assert params["target"] == earlier["target"]
        return _neighbour(scene, _one(scene, params["target"]), params["side"])[params["attribute"]]
    if qtype == "what_else":
        named = [_one(scene, t) for t in params["named"]]
        rest = [o for o in sorted(scene["objects"], key=lambda o: (o["x"], o["y"])) if o not in named]
        names = [
            f"{'an' if o['size'][0] in 'aeiou' else 'a'} {o['size']} {o['color']} {o['shape']}" for o in rest
        ]
        if not names:
            return "There is nothing else."
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    assert qtype == "unanswerable"
    return "I can't tell that from the image."


def test_every_turn_is_answered_from_the_scene_graph():
    kinds = Counter()
    for scene, r in RECORDS:
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n") and "<image>" not in "".join(
            t["value"] for t in turns[1:]
        )
        earlier = {}
        for k, (qtype, params, ans) in enumerate(
            zip(r["turn_types"], r["turn_params"], r["turn_answers"], strict=True)
        ):
            assert turns[2 * k + 1]["value"] == ans == _independent(scene, qtype, params, earlier)
            earlier = params
        assert r["question_type"] == r["turn_types"][-1] and r["answer"] == r["turn_answers"][-1]
        assert r["answer"] == M.answer(scene, r["question_type"], r["params"])
        kinds[r["question_type"]] += 1
    assert set(kinds) == set(M.TURN_KINDS) and min(kinds.values()) > 40, kinds


def test_follow_ups_refer_back_without_naming_the_object():
    for _, r in RECORDS:
        if r["question_type"] in ("refer_back", "neighbour"):
            follow_up = r["conversations"][2]["value"].lower()
            target = r["params"]["target"]
            assert not any(v in follow_up.split() for v in target.values()), follow_up
            assert {"it", "its"} & set(follow_up.replace("?", " ").replace(":", " ").split()), follow_up
            if r["question_type"] == "neighbour":
                assert r["params"]["side"] in follow_up


def test_each_split_words_its_follow_ups_with_its_own_templates():
    for scene, r in RECORDS:
        templates = W.SHIFTED_TEMPLATES if scene["split"] == "shifted" else W.TEMPLATES
        kind, last = r["question_type"], r["conversations"][-2]["value"].removeprefix("<image>\n")
        words = {"attr": ("color", "colour", "shape", "size"), "side": ("left", "right")}
        filled = {
            t.format(a=f"{o['color']} {o['shape']}", attr=w, side=side)
            for t in templates[kind]
            for o in scene["objects"]
            for w in words["attr"]
            for side in words["side"]
        }
        assert last in filled, last


def test_the_order_next_to_an_object_must_be_clear():
    scene = {"id": "x", "width": 100, "height": 100, "objects": [
        {"color": "red", "shape": "star", "size": "small", "x": 10.0, "y": 10.0},
        {"color": "blue", "shape": "circle", "size": "large", "x": 40.0, "y": 80.0},
        {"color": "green", "shape": "square", "size": "small", "x": 75.0, "y": 20.0},
    ]}  # fmt: skip
    star, circle, square = scene["objects"]
    assert M.neighbour(scene, star, "right") is circle and M.neighbour(scene, circle, "left") is star
    assert M.neighbour(scene, square, "left") is circle
    with pytest.raises(ValueError, match="nothing to the left"):
        M.neighbour(scene, star, "left")
    square["x"] = 45.0  # now the circle and the square are too close in x to tell their order
    for obj, side in ((square, "left"), (star, "right"), (circle, "left")):
        with pytest.raises(ValueError, match="in doubt"):
            M.neighbour(scene, obj, side)
    assert M.others(scene, [{"shape": "circle"}]) == "a small red star and a small green square"
    assert M.others({"objects": [star]}, [{"shape": "star"}]) == W.NOTHING_ELSE


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    import copy

    tokenizer = copy.deepcopy(smollm2_tokenizer)
    set_chat_template(tokenizer, CHATML)
    return tokenizer


def _spans(labels):
    spans, current = [], []
    for label in labels + [IGNORE]:
        if label == IGNORE and current:
            spans.append(current)
            current = []
        elif label != IGNORE:
            current.append(label)
    return spans


def test_multi_turn_records_render_with_the_loss_on_every_answer_only(tok):
    two_turns = [r for _, r in RECORDS if len(r["conversations"]) == 4][:20]
    assert two_turns
    for raw in two_turns:
        record = to_record(raw, "multiturn.json", 0)
        out = render(record.turns, tok, image_tokens=3, num_images=1)
        answers = [t.content for t in record.turns if t.role == "assistant"]
        assert [tok.decode(s) for s in _spans(out.labels)] == [a + "<|im_end|>\n" for a in answers]
        for question in (t.content.replace("<image>\n", "") for t in record.turns if t.role == "user"):
            assert question not in tok.decode(
                [i for i, lab in zip(out.input_ids, out.labels, strict=True) if lab != IGNORE]
            )


def test_conversations_are_deterministic_and_leave_the_first_stream_alone(monkeypatch):
    scene = SCENES[7]
    first = synth.scene_texts(scene, 6)
    assert synth.extra_texts(scene, 6) == synth.extra_texts(scene, 6)
    assert M.conversation(scene, np.random.default_rng(1)) == M.conversation(scene, np.random.default_rng(1))
    # the six types' records do not change when the new kinds draw differently
    monkeypatch.setattr(M, "conversation", lambda s, rng, t: [("unanswerable", "Why?", {}, W.CANNOT_TELL)])
    monkeypatch.setattr(synth.R, "relation_questions", lambda s, rng, t: [])
    again = synth.scene_texts(scene, 6)
    for task in ("captions", "detailed", "vqa", "conversations", "classify"):
        assert again[task] == first[task]
    assert again["multiturn"] != first["multiturn"]
