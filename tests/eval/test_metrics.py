"""Scoring arithmetic against known values: the official VQAv2 rules, POPE, classification vs sklearn."""

from __future__ import annotations

import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from vistune.eval import metrics as M


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Yes.", "yes"),
        ("  Two\n", "2"),
        ("the dog", "dog"),
        ("A red circle", "red circle"),
        ("dont", "don't"),
        ("Isnt it", "isn't it"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),  # digit-comma-digit: every mark is deleted, not spaced
        ("black-and-white", "black and white"),  # a mark not next to a space becomes a space
        ("hello, world!", "hello world"),  # a mark next to a space is deleted
        ("left/right", "left right"),
        ("None", "0"),
        ("ten apples", "10 apples"),
        ("It's red", "it's red"),  # apostrophes are not in the punctuation list
    ],
)
def test_vqa_normalisation_official_cases(raw, expected):
    assert M.normalize_vqa_answer(raw) == expected


def _official_soft_accuracy(pred: str, answers: list[str]) -> float:
    """The official loop verbatim in spirit: answer dicts with ids, leave one out, min(matches/3, 1)."""
    gts = [{"answer": a, "answer_id": i} for i, a in enumerate(answers)]
    accs = []
    for gt in gts:
        others = [item for item in gts if item != gt]
        accs.append(min(1, len([item for item in others if item["answer"] == pred]) / 3))
    return sum(accs) / len(accs)


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_soft_accuracy_leave_one_out_known_values(k, expected):
    answers = ["2"] * k + ["3"] * (10 - k)
    assert M.vqa_soft_accuracy("two", answers) == pytest.approx(expected)
    assert M.vqa_soft_accuracy("2", answers) == pytest.approx(_official_soft_accuracy("2", answers))


def test_soft_accuracy_mixed_answers_matches_official_loop():
    answers = ["red", "red", "dark red", "red", "maroon", "red", "crimson", "dark red", "red", "red"]
    for pred in ("red", "dark red", "maroon", "blue"):
        assert M.vqa_soft_accuracy(pred, answers) == pytest.approx(_official_soft_accuracy(pred, answers))
    assert M.vqa_soft_accuracy("Dark red.", answers) == pytest.approx(0.6)


def test_vqa_score_single_reference_is_exact_match():
    assert M.vqa_score("A circle.", ["circle"]) == 1.0
    assert M.vqa_score("square", ["circle"]) == 0.0
    assert M.exact_match("The Circle", ["square", "circle"])
    with pytest.raises(ValueError):
        M.vqa_soft_accuracy("x", [])


def test_mean_by_group():
    out = M.mean_by_group([1.0, 0.0, 0.5], ["color", "color", "count"])
    assert out == {"color": {"accuracy": 0.5, "n": 2}, "count": {"accuracy": 0.5, "n": 1}}


@pytest.mark.parametrize(
    "text, expected",
    [("Yes, there is.", "yes"), ("no", "no"), ("NO.", "no"), ("There is a cat", "invalid"), ("", "invalid")],
)
def test_parse_yes_no_first_word(text, expected):
    assert M.parse_yes_no(text) == expected


def test_pope_hand_computed_confusion_matrix():
    # tp=3, fn=2 (one of them an invalid answer), fp=1, tn=4
    labels = ["yes"] * 5 + ["no"] * 5
    preds = ["yes", "yes", "yes", "no", "invalid", "yes", "no", "no", "no", "no"]
    m = M.binary_metrics(preds, labels)
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["invalid"]) == (3, 2, 1, 4, 1)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(0.75)
    assert m["recall"] == pytest.approx(0.6)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert m["yes_ratio"] == pytest.approx(0.4)


def test_pope_per_setting_and_bad_label():
    labels = ["yes", "no", "yes", "no"]
    preds = ["yes", "yes", "no", "no"]
    out = M.pope_metrics(preds, labels, ["random", "random", "adversarial", "adversarial"])
    assert out["random"]["accuracy"] == 0.5 and out["random"]["yes_ratio"] == 1.0
    assert out["adversarial"]["accuracy"] == 0.5 and out["adversarial"]["recall"] == 0.0
    assert out["overall"]["n"] == 4
    with pytest.raises(ValueError, match="yes' or 'no"):
        M.binary_metrics(["yes"], ["maybe"])


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("circle", "circle"),
        ("Circle.", "circle"),
        ("It is a red square.", "red square"),  # the longer label wins over 'square' inside it
        ("a circle or a square", "invalid"),  # two labels
        ("a hexagon", "invalid"),
        ("squares", "invalid"),  # whole words only
    ],
)
def test_map_to_label(answer, expected):
    assert M.map_to_label(answer, ["circle", "square", "red square"]) == expected


def test_classification_metrics_equal_sklearn():
    labels = ["circle", "square", "triangle"]
    targets = ["circle", "circle", "square", "square", "triangle", "triangle", "circle", "square"]
    preds = ["circle", "square", "square", "invalid", "triangle", "circle", "circle", "triangle"]
    m = M.classification_metrics(preds, targets, labels)
    p, r, f, s = precision_recall_fscore_support(targets, preds, labels=labels, zero_division=0)
    assert m["accuracy"] == pytest.approx(accuracy_score(targets, preds))
    assert m["macro_f1"] == pytest.approx(
        f1_score(targets, preds, labels=labels, average="macro", zero_division=0)
    )
    for i, lab in enumerate(labels):
        assert m["per_class"][lab]["precision"] == pytest.approx(p[i])
        assert m["per_class"][lab]["recall"] == pytest.approx(r[i])
        assert m["per_class"][lab]["support"] == s[i]
    full = confusion_matrix(targets, preds, labels=labels + ["invalid"])
    assert m["confusion"]["matrix"] == full[:3].tolist()
    # hand check: 4 of 8 right; circle: precision 2/3, recall 2/3
    assert m["accuracy"] == 0.5
    assert m["per_class"]["circle"]["precision"] == pytest.approx(2 / 3)
    assert m["invalid"] == 1
    assert sum(map(sum, m["confusion"]["matrix"])) == len(targets)


def test_classification_rejects_unknown_target():
    with pytest.raises(ValueError, match="not among the labels"):
        M.classification_metrics(["a"], ["z"], ["a", "b"])


def test_confusion_png(tmp_path):
    m = M.classification_metrics(["a", "b", "invalid"], ["a", "a", "b"], ["a", "b"])
    path = M.save_confusion_png(m["confusion"], tmp_path / "cm.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_text_match_modes():
    assert M.text_match("The capital of France is Paris.", ["Paris"])
    assert not M.text_match("The capital of France is Paris.", ["Paris"], mode="exact")
    assert M.text_match("Blue.", ["blue"], mode="exact")
    assert not M.text_match("bluebird", ["blue"])  # whole words only
    assert M.text_match("There are seven days.", ["7"])  # number words become digits
    with pytest.raises(ValueError):
        M.text_match("x", ["x"], mode="fuzzy")


# --- Official VQAv2 scoring (vqaEval.py after a013f00) vs lenient: hand-computed values ----------------
@pytest.mark.parametrize(
    "prediction, answers, official, lenient",
    [
        # all ten agree: the official script compares the raw (whitespace-cleaned) prediction
        ("Two", ["2"] * 10, 0.0, 1.0),
        ("2", ["2"] * 10, 1.0, 1.0),
        ("Yes", ["yes"] * 10, 0.0, 1.0),
        (" yes\n", ["yes"] * 10, 1.0, 1.0),  # newlines, tabs and outer spaces are cleaned in any case
        ("the dog", ["dog"] * 10, 0.0, 1.0),
        # answers differ: both sides normalised. "two", "two", "2" -> three "2"; the left-out answer is
        # a "2" three times (2 others match: 2/3) and a "3" seven times (3 match: 1) -> (3*2/3 + 7)/10
        ("Two", ["two", "two", "2"] + ["3"] * 7, 0.9, 0.9),
        # 2 "yes" among 10: leaving out a yes leaves 1 (1/3), leaving out a no leaves 2 (2/3) -> 0.6
        ("Yes.", ["yes"] * 2 + ["no"] * 8, 0.6, 0.6),
        ("maybe", ["yes"] * 2 + ["no"] * 8, 0.0, 0.0),
        # the script removes at most 32 periods (re.UNICODE passed as sub's count): 8 remain
        ("x" + "." * 40, ["x"] * 9 + ["y"], 0.0, 1.0),
        ("x" + "." * 32, ["x"] * 9 + ["y"], 1.0, 1.0),
    ],
)
def test_official_vs_lenient_vqa_accuracy(prediction, answers, official, lenient):
    assert M.vqa_official_accuracy(prediction, answers) == pytest.approx(official)
    assert M.vqa_score(prediction, answers, "official") == pytest.approx(official)
    assert M.vqa_score(prediction, answers, "lenient") == pytest.approx(lenient)
    assert M.vqa_score(prediction, answers) == pytest.approx(lenient)  # the default stays lenient
    assert M.official_exact_match(prediction, answers) == (official > 0)  # a matching answer gives > 0


def test_official_scoring_refuses_a_single_reference_and_unknown_modes():
    with pytest.raises(ValueError, match="needs the human answers"):
        M.vqa_score("circle", ["circle"], "official")
    with pytest.raises(ValueError, match="not one of"):
        M.vqa_score("circle", ["circle", "circle"], "strict")
