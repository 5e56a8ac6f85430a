"""Caption metrics equal direct pycocoevalcap calls on the same inputs; the Java-free fallback is noted.

PTBTokenizer and METEOR are Java programs: CI installs a Java runtime (.ci/run) and always runs them (a
missing `java` fails there); elsewhere they are skipped without one.
"""

from __future__ import annotations

import os
import shutil

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from vistune.eval import captions

PREDS = {
    "a": "A red circle left of a blue square.",
    "b": "two green triangles",
    "c": "a small yellow star on top",
    "d": "an empty picture",
}
REFS = {
    "a": ["A red circle to the left of a blue square.", "red circle, blue square"],
    "b": ["Three green triangles."],
    "c": ["A small yellow star above a big star.", "a yellow star at the top"],
    "d": ["A purple hexagon."],
}
java = pytest.mark.skipif(
    shutil.which("java") is None and not os.environ.get("CI"),
    reason="pycocoevalcap's PTBTokenizer and METEOR need Java (apt-get install default-jre-headless)",
)


def _direct(gts_raw, res_raw):
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in gts_raw.items()})
    res = tok.tokenize({k: [{"caption": res_raw[k]}] for k in gts_raw})
    bleu, _ = Bleu(4).compute_score(gts, res)
    return {
        **{f"BLEU-{i + 1}": b for i, b in enumerate(bleu)},
        "ROUGE-L": Rouge().compute_score(gts, res)[0],
        "CIDEr": Cider().compute_score(gts, res)[0],
    }


@java
def test_caption_metrics_equal_direct_pycocoevalcap():
    ours = captions.caption_metrics(PREDS, REFS, meteor=False)
    direct = _direct(REFS, PREDS)
    for key, value in direct.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    assert ours["tokenizer"] == "ptb" and ours["n"] == 4
    assert "METEOR" not in ours
    assert ours["per_id"]["a"]["CIDEr"] > ours["per_id"]["d"]["CIDEr"]


@java
@pytest.mark.slow  # METEOR's Java start-up: about 7 s on 2 idle cores
def test_meteor_runs_with_java():
    ours = captions.caption_metrics(PREDS, REFS, meteor=True)
    assert 0.0 < ours["METEOR"] < 1.0
    assert set(ours["per_id"]["a"]) >= {"METEOR", "CIDEr", "BLEU-4"}


def test_without_java_falls_back_and_notes(monkeypatch):
    monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    ours = captions.caption_metrics(PREDS, REFS, meteor=True, spice=True)
    assert ours["tokenizer"] == "simple"
    notes = " ".join(ours["notes"])
    assert "Java not found" in notes and "METEOR skipped" in notes and "SPICE skipped" in notes
    gts = captions.simple_tokenize(REFS)
    res = captions.simple_tokenize({k: [v] for k, v in PREDS.items()})
    assert gts["a"][1] == "red circle blue square"
    assert ours["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0])


def test_identical_captions_score_high_and_ids_must_match():
    same = {k: v[0] for k, v in REFS.items()}
    out = captions.caption_metrics(same, REFS, meteor=False, spice=False)
    assert out["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="different ids"):
        captions.caption_metrics({"a": "x"}, {"b": ["x"]}, meteor=False)
