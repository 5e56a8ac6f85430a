"""Tests for scene-graph recall of descriptions, on hand-made descriptions and scenes, and on the shapes
world's own reference descriptions (which name every object right and nothing else)."""

from __future__ import annotations

import pytest

from vistune.shapes import scenes as S
from vistune.shapes import synth
from vistune.shapes.graph_recall import graph_recall, mentions, score_description


def _scene(*kinds):
    """A scene of (size, colour, shape) objects."""
    return {"objects": [{"size": s, "color": c, "shape": k, "x": 0.0, "y": 0.0} for s, c, k in kinds]}


SCENE = _scene(("small", "red", "star"), ("large", "red", "star"), ("large", "blue", "circle"))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a small red star", [{"shape": "star", "color": "red", "size": "small"}]),
        ("two red stars", [{"shape": "star", "color": "red"}] * 2),
        ("3 blue circles and no triangles", [{"shape": "circle", "color": "blue"}] * 3),
        ("red stars", [{"shape": "star", "color": "red"}] * 2),  # a plural without a count: two
        ("a star, then one red square", [{"shape": "star"}, {"shape": "square", "color": "red"}]),
        ("a red star. The red star is left of the star.", [{"shape": "star", "color": "red"}]),
        ("a glittering red gizmo beside an enormous object", []),  # unknown words are ignored
        # raw perception words: a digit before a singular names one object
        ("6 small yellow circle17 orange diamond", [{"shape": "circle", "color": "yellow", "size": "small"},
                                                    {"shape": "diamond", "color": "orange"}]),
    ],
)  # fmt: skip
def test_mentions(text, expected):
    assert mentions(text) == expected


def test_every_object_named_right_and_nothing_else():
    one = score_description("There are 3 objects: two red stars and a large blue circle.", SCENE)
    assert one == {"objects": 3, "mentions": 3, "recalled": 3, "sized": 1, "hallucinated": 0}


def test_sizes_pair_first_so_a_right_size_is_not_taken_by_a_vague_mention():
    # "a red star" must not take the large red star that "a large red star" names
    one = score_description("a red star and a large red star and a large blue circle", SCENE)
    assert one["recalled"] == 3 and one["sized"] == 2 and one["hallucinated"] == 0


def test_an_absent_object_is_hallucinated_and_a_wrong_colour_is_not_recalled():
    one = score_description("a small green star, a large blue circle and a purple diamond", SCENE)
    assert one == {"objects": 3, "mentions": 3, "recalled": 1, "sized": 1, "hallucinated": 2}


def test_too_many_of_a_kind_and_shapes_without_colours():
    one = score_description("three red stars and a circle", SCENE)
    # two red stars recalled, the third made up; the circle exists but its colour is not named
    assert one == {"objects": 3, "mentions": 4, "recalled": 2, "sized": 0, "hallucinated": 1}


def test_summed_over_descriptions():
    result = graph_recall(
        [("two red stars and a large blue circle", SCENE), ("a yellow square", SCENE), ("", SCENE)]
    )
    assert result["objects"] == 9 and result["mentions"] == 4 and result["recalled"] == 3
    assert result["recall"] == pytest.approx(3 / 9) and result["hallucination"] == pytest.approx(1 / 4)
    assert result["exact"] == pytest.approx(1 / 3) and result["descriptions"] == 3
    assert graph_recall([])["recall"] == 0.0


def test_the_reference_descriptions_score_perfectly():
    scenes = [S.sample_scene(2, split, i) for split in ("train", "shifted") for i in range(150)]
    texts = [synth.scene_texts(s, 2)["detailed"][0]["conversations"][1]["value"] for s in scenes]
    result = graph_recall(zip(texts, scenes, strict=True))
    assert (
        result["recall"] == result["size_recall"] == result["exact"] == 1.0 and result["hallucination"] == 0.0
    )
    captions = [synth.scene_texts(s, 2)["captions"][0]["conversations"][1]["value"] for s in scenes]
    assert graph_recall(zip(captions, scenes, strict=True))["exact"] == 1.0
