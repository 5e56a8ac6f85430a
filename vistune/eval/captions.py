"""Caption metrics through pycocoevalcap: BLEU-1..4, ROUGE-L, CIDEr, and METEOR/SPICE where they run.

pycocoevalcap's PTBTokenizer and METEOR are Java programs; without `java` on PATH we fall back to a
simple lower-case/punctuation tokenizer and say so in the returned notes. SPICE also needs Stanford
CoreNLP models that pycocoevalcap downloads on first use; we never download, so it runs only when those
files are already in place.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pycocoevalcap.spice.spice as spice_module
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

# The punctuation tokens pycocoevalcap's PTBTokenizer drops after tokenising.
_PTB_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
              "...", ";"}  # fmt: skip


def simple_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """A Java-free stand-in for PTBTokenizer: lower-case, split words from punctuation, drop the same
    punctuation tokens. Close to, not identical with, the official tokenisation."""
    out = {}
    for key, texts in captions.items():
        out[key] = [
            " ".join(
                t for t in re.findall(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]", s.lower()) if t not in _PTB_PUNCT
            )
            for s in texts
        ]
    return out


def ptb_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """pycocoevalcap's PTBTokenizer on {id: [sentence, ...]} (needs Java)."""
    wrapped = {k: [{"caption": s} for s in v] for k, v in captions.items()}
    # The Java tokenizer writes a progress line to stderr (fd 2): keep it, show it only on failure.
    with tempfile.TemporaryFile() as err, contextlib.redirect_stdout(io.StringIO()):
        saved = os.dup(2)
        try:
            sys.stderr.flush()
            os.dup2(err.fileno(), 2)
            out = PTBTokenizer().tokenize(wrapped)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        log = err.read().decode(errors="replace")
    bad = [k for k, v in captions.items() if len(out.get(k, [])) != len(v)]
    if bad:
        raise RuntimeError(f"PTBTokenizer (Java) lost captions of ids {bad[:5]}; its stderr:\n{log}")
    return out


def _spice_models_present() -> bool:
    """True when SPICE's Stanford CoreNLP jars are already installed next to spice-1.0.jar."""
    lib = Path(spice_module.__file__).parent / "lib"
    return (lib / "stanford-corenlp-3.6.0.jar").exists() and (
        lib / "stanford-corenlp-3.6.0-models.jar"
    ).exists()


def _scorers(meteor: bool, spice: bool, java: bool, notes: list[str]) -> list:
    """The pycocoevalcap scorers that can run here, with a note for each one skipped."""
    scorers = [(Bleu(4), ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]), (Rouge(), "ROUGE-L"), (Cider(), "CIDEr")]
    if meteor and not java:
        notes.append("METEOR skipped: needs Java")
    elif meteor:
        scorers.append((Meteor(), "METEOR"))
    if spice and not (java and _spice_models_present()):
        notes.append("SPICE skipped: needs Java and Stanford CoreNLP 3.6.0 models (not downloaded)")
    elif spice:
        scorers.append((Spice(), "SPICE"))
    return scorers


def caption_metrics(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    meteor: bool = True,
    spice: bool = False,
) -> dict:
    """Corpus-level caption scores of `predictions` {id: caption} against `references` {id: [refs]}.

    Args:
        predictions: one generated caption per id.
        references: one or more reference captions per id; must have the same ids.
        meteor: also run METEOR (Java, about 7 s to start on 2 cores).
        spice: also run SPICE when its models are installed (never downloads).

    Returns:
        {"BLEU-1".."BLEU-4", "ROUGE-L", "CIDEr"[, "METEOR", "SPICE"]: float, "per_id": {id: {"CIDEr": ..,
        "BLEU-4": ..}}, "tokenizer": "ptb" | "simple", "notes": [...], "n": int}
    """
    if set(predictions) != set(references):
        missing = sorted(set(predictions) ^ set(references))[:5]
        raise ValueError(f"caption predictions and references have different ids, e.g. {missing}")
    if not predictions:
        return {"n": 0, "notes": ["no captions to score"], "per_id": {}}
    if any(not refs for refs in references.values()):
        raise ValueError("every caption id needs at least one reference")
    notes: list[str] = []
    java = shutil.which("java") is not None
    tokenize = ptb_tokenize if java else simple_tokenize
    if not java:
        notes.append("Java not found: simple tokenizer instead of PTBTokenizer (scores differ slightly)")
    gts = tokenize({k: list(v) for k, v in references.items()})
    res = tokenize({k: [predictions[k]] for k in references})
    out: dict = {"n": len(res), "tokenizer": "ptb" if java else "simple", "notes": notes}
    ids = list(gts)
    per_id: dict[str, dict] = {k: {} for k in ids}
    for scorer, names in _scorers(meteor, spice, java, notes):
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its internals
            score, scores = scorer.compute_score(gts, res)
        for name, value, values in zip(*_as_lists(names, score, scores), strict=True):
            out[name] = float(value)
            if name in ("BLEU-4", "CIDEr", "METEOR"):
                for k, v in zip(ids, values, strict=True):
                    per_id[k][name] = float(v)
    out["per_id"] = per_id
    return out


def _as_lists(names, score, scores) -> tuple[list, list, list]:
    """Bleu returns lists of four; the other scorers a single value: make both look like lists."""
    if isinstance(names, list):
        return names, list(score), list(scores)
    return [names], [score], [scores]
