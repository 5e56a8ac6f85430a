"""Scoring arithmetic: VQA normalisation and soft accuracy, exact match, POPE, classification.

Pure functions over strings and lists; no model, no files (except the confusion-matrix PNG).
The VQA rules follow the official VQAv2 evaluation (GT-Vision-Lab/VQA
`PythonEvaluationTools/vqaEvaluation/vqaEval.py`, last changed in a013f00 "Fixed processing answers bug",
2021): its punctuation handling, number-word map, article list and contractions table, and its
leave-one-out soft accuracy. Two ways to score (`VQA_SCORING`):

- "official": exactly what that script computes. When the human answers are not all identical, the
  prediction and every human answer are normalised; when they all agree, the raw prediction (only
  whitespace-cleaned) is compared with the raw answers, so ten "2" against "Two" scores 0.0. The
  period removal is capped at 32 per answer, as the script's `sub(..., re.UNICODE)` does.
- "lenient": vistune's earlier rule: always normalise both sides, no cap (ten "2" against "Two": 1.0).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

# --- The official VQAv2 normalisation tables -------------------------------------------------------
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
PUNCT = [
    ";",
    r"/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
# The official pattern reads "(?!<=\d)": a typo for a look-behind, so in effect it removes every period
# that is not followed by a digit ("3.5" keeps its period, "yes." loses it). Kept as is on purpose.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


# vqaEval.py passes re.UNICODE (32) as `sub`'s count, so it removes at most 32 periods per answer.
OFFICIAL_PERIOD_CAP = int(re.UNICODE)
VQA_SCORING = ("official", "lenient")


def process_punctuation(text: str, max_periods: int = 0) -> str:
    """The official `processPunctuation`: drop a mark next to a space (or anywhere if the text holds a
    digit-comma-digit), else replace it by a space; then strip periods not followed by a digit (at most
    `max_periods` of them; 0: all, the lenient rule; OFFICIAL_PERIOD_CAP: the official script)."""
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=max_periods)


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lower-case, number words to digits, drop articles, expand
    contractions."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean_whitespace(text: str) -> str:
    """The official first step for predictions and human answers: newlines and tabs to spaces, strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(text: str, max_periods: int = 0) -> str:
    """Normalise an answer as the VQAv2 evaluation does when the human answers differ (whitespace,
    punctuation, digits, articles, contractions); `max_periods` as in `process_punctuation`."""
    return process_digit_article(process_punctuation(_clean_whitespace(text), max_periods))


def _leave_one_out(prediction: str, refs: Sequence[str]) -> float:
    """Mean over each reference left out in turn of min(#others equal to the prediction / 3, 1)."""
    accs = []
    for i in range(len(refs)):
        matches = sum(1 for j, ref in enumerate(refs) if j != i and ref == prediction)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Lenient VQAv2 accuracy: both sides always normalised; then for each human answer left out in
    turn, min(#matching among the others / 3, 1), averaged over those subsets (10 for VQAv2).

    With a single reference this degenerates to 0, so callers use exact match then (see `vqa_score`).
    """
    if not answers:
        raise ValueError("vqa_soft_accuracy needs at least one reference answer")
    return _leave_one_out(normalize_vqa_answer(prediction), [normalize_vqa_answer(a) for a in answers])


def vqa_official_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQAv2 accuracy of one prediction (`VQAEval.evaluate`, per question, unrounded).

    Whitespace is cleaned on both sides; only when the human answers are not all identical are they and
    the prediction normalised (punctuation with the 32-period cap, then digits/articles/contractions).
    Then the leave-one-out mean of min(#matching others / 3, 1).
    """
    if not answers:
        raise ValueError("vqa_official_accuracy needs at least one reference answer")
    return _leave_one_out(*_official_sides(prediction, answers))


def _official_sides(prediction: str, answers: Sequence[str]) -> tuple[str, list[str]]:
    """The prediction and human answers as the official script compares them."""
    refs = [_clean_whitespace(a) for a in answers]
    pred = _clean_whitespace(prediction)
    if len(set(refs)) > 1:
        refs = [normalize_vqa_answer(a, OFFICIAL_PERIOD_CAP) for a in refs]
        pred = normalize_vqa_answer(pred, OFFICIAL_PERIOD_CAP)
    return pred, refs


def official_exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """True when the prediction equals a human answer as the official script compares them (raw when
    all agree, normalised otherwise): `exact_match` for official scoring."""
    pred, refs = _official_sides(prediction, answers)
    return pred in refs


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """True when the normalised prediction equals any normalised reference."""
    pred = normalize_vqa_answer(prediction)
    return any(pred == normalize_vqa_answer(a) for a in answers)


def vqa_score(prediction: str, answers: Sequence[str], scoring: str = "lenient") -> float:
    """One prediction's VQA score.

    lenient: soft accuracy when there are several human answers, else exact match (1.0 or 0.0).
    official: `vqa_official_accuracy` (it needs several human answers; one gives 0 by its formula,
    so a single reference is refused).
    """
    if scoring == "official":
        if len(answers) < 2:
            raise ValueError(
                f"official VQAv2 scoring needs the human answers (10 per question), got {len(answers)}"
            )
        return vqa_official_accuracy(prediction, answers)
    if scoring != "lenient":
        raise ValueError(f"VQA scoring {scoring!r} is not one of {VQA_SCORING}")
    if len(answers) > 1:
        return vqa_soft_accuracy(prediction, answers)
    return float(exact_match(prediction, answers))


def mean_by_group(scores: Sequence[float], groups: Sequence[str]) -> dict[str, dict]:
    """Mean score and count per group label, groups sorted by name."""
    acc: dict[str, list[float]] = defaultdict(list)
    for score, group in zip(scores, groups, strict=True):
        acc[group].append(score)
    return {g: {"accuracy": sum(v) / len(v), "n": len(v)} for g, v in sorted(acc.items())}


# --- POPE --------------------------------------------------------------------------------------------
def parse_yes_no(text: str) -> str:
    """'yes' or 'no' from the first word of an answer (case and punctuation ignored), else 'invalid'."""
    words = re.findall(r"[a-z]+", text.lower())
    if words and words[0] in ("yes", "no"):
        return words[0]
    return "invalid"


def binary_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """POPE arithmetic with 'yes' as the positive class; an 'invalid' prediction counts as a wrong 'no'
    (it is neither a true nor a false positive), and is counted separately.

    Returns accuracy, precision, recall, f1, yes_ratio (share of predictions that are 'yes'),
    tp/fp/tn/fn, invalid and n.
    """
    tp = fp = tn = fn = invalid = 0
    for pred, label in zip(predictions, labels, strict=True):
        if label not in ("yes", "no"):
            raise ValueError(f"POPE label must be 'yes' or 'no', got {label!r}")
        invalid += pred == "invalid"
        if pred == "yes":
            tp += label == "yes"
            fp += label == "no"
        else:
            fn += label == "yes"
            tn += label == "no" and pred == "no"
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "invalid": invalid, "n": n,
    }  # fmt: skip


def pope_metrics(predictions: Sequence[str], labels: Sequence[str], settings: Sequence[str]) -> dict:
    """`binary_metrics` overall and per POPE setting (random/popular/adversarial)."""
    out = {"overall": binary_metrics(predictions, labels)}
    for setting in sorted(set(settings)):
        idx = [i for i, s in enumerate(settings) if s == setting]
        out[setting] = binary_metrics([predictions[i] for i in idx], [labels[i] for i in idx])
    return out


# --- Classification ----------------------------------------------------------------------------------
INVALID = "invalid"


def map_to_label(answer: str, labels: Sequence[str]) -> str:
    """Map a generated answer to a label: exact (case/punctuation-insensitive), else the one label
    mentioned as a whole word (the longest if several overlap, e.g. 'red square' vs 'square'),
    else 'invalid' (none, or several distinct labels mentioned)."""
    norm = " ".join(re.findall(r"[a-z0-9]+", answer.lower()))
    by_norm = {" ".join(re.findall(r"[a-z0-9]+", lab.lower())): lab for lab in labels}
    if norm in by_norm:
        return by_norm[norm]
    found = [key for key in by_norm if key and re.search(rf"\b{re.escape(key)}\b", norm)]
    # Drop labels contained in a longer mentioned label ('square' inside 'red square').
    found = [k for k in found if not any(k != o and re.search(rf"\b{re.escape(k)}\b", o) for o in found)]
    return by_norm[found[0]] if len(found) == 1 else INVALID


def classification_metrics(predictions: Sequence[str], targets: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro-F1 over `labels` and the confusion
    matrix (rows: true label, columns: predicted label plus a last 'invalid' column), via scikit-learn.
    """
    unknown = sorted(set(targets) - set(labels))
    if unknown:
        raise ValueError(f"classification targets {unknown} are not among the labels {list(labels)}")
    labels = list(labels)
    cols = labels + [INVALID]
    if not targets:  # every record failed: nothing to score (the caller counts the failures)
        per_class = {lab: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for lab in labels}
        matrix = [[0] * len(cols) for _ in labels]
        confusion = {"rows": labels, "cols": cols, "matrix": matrix}
        return {
            "accuracy": 0.0,
            "macro_f1": 0.0,
            "invalid": 0,
            "n": 0,
            "per_class": per_class,
            "confusion": confusion,
        }
    p, r, f, s = precision_recall_fscore_support(
        targets, predictions, labels=labels, average=None, zero_division=0
    )
    matrix = confusion_matrix(targets, predictions, labels=cols)[: len(labels)]
    n = len(targets)
    per_class = {
        lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, lab in enumerate(labels)
    }
    return {
        "accuracy": sum(a == b for a, b in zip(predictions, targets, strict=True)) / n if n else 0.0,
        "macro_f1": float(f.mean()) if len(labels) else 0.0,
        "invalid": sum(pred == INVALID for pred in predictions),
        "n": n,
        "per_class": per_class,
        "confusion": {"rows": labels, "cols": cols, "matrix": matrix.tolist()},
    }


def save_confusion_png(confusion: dict, path: str | Path, title: str = "confusion matrix") -> Path:
    """Draw `classification_metrics(...)["confusion"]` as an annotated heat map PNG."""
    matrix = np.asarray(confusion["matrix"])
    rows, cols = confusion["rows"], confusion["cols"]
    size = max(4.0, 0.6 * len(cols) + 2)
    fig = Figure(figsize=(size, size * 0.9))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = matrix.max() if matrix.size else 0
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


# --- Plain text --------------------------------------------------------------------------------------
def text_match(prediction: str, answers: Sequence[str], mode: str = "contains") -> bool:
    """Normalised match for short factual answers: 'exact' (the whole answer) or 'contains' (a
    reference appears as whole words inside the answer)."""
    if mode not in ("exact", "contains"):
        raise ValueError(f"text_match mode {mode!r} is not one of ('exact', 'contains')")
    pred = normalize_vqa_answer(prediction)
    for ans in answers:
        ref = normalize_vqa_answer(ans)
        if pred == ref or (mode == "contains" and ref and re.search(rf"(^|\s){re.escape(ref)}(\s|$)", pred)):
            return True
    return False
