"""A tiny real-text corpus for the text pretraining tests: eight of Python's documentation topics, cut
short, with the two tokenizers a corpus carries (a byte-level BPE and a WordPiece of 400 tokens)."""

from __future__ import annotations

import json
from pathlib import Path

from vistune.data.texts import python_docs
from vistune.data.vocab import train_bpe, train_wordpiece

TOPICS = ("assert", "break", "continue", "del", "global", "pass", "return", "while")


def write_tiny_corpus(root: Path, chars: int = 1500) -> Path:
    """root/train.jsonl, root/bpe and root/wordpiece; returns root."""
    docs = python_docs()
    texts = [docs[name][:chars] for name in TOPICS]
    root.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": name, "text": text}) for name, text in zip(TOPICS, texts, strict=True)]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    train_bpe(texts, 400).save_pretrained(root / "bpe")
    train_wordpiece(texts, 400).save_pretrained(root / "wordpiece")
    return root
