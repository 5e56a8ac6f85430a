"""Raw text for the text pretraining stages: a reader of text files, and an English corpus that ships
with Python itself.

`read_texts(spec)` reads the documents of a stage's data: a `.jsonl` file of `{"text": ...}` records
(other fields are kept out of the way) or a `.txt` file whose documents are separated by blank lines.
`sentences(document)` cuts a document into sentences for next-sentence prediction.

`vistune data text --out DIR` writes the corpus: the documentation topics of the standard library's
`pydoc_data.topics` (what `help("if")` shows: the language reference, one topic a document), split by
document into `train.jsonl` and `heldout.jsonl` (a fixed share of the characters, chosen by a hash of
each topic's name, so the split never depends on the order topics are listed in), with two tokenizers
trained on the training documents only (`vistune.data.vocab`): `bpe/` for decoders (byte-level BPE with
ChatML's tokens and template) and `wordpiece/` for encoders ([PAD] [UNK] [CLS] [SEP] [MASK]). The text
is that of the Python that runs the command: `manifest.json` records its version and each file's SHA-256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
from pathlib import Path

from vistune.config import DataSpec
from vistune.data.outdir import OutputKind, check_out, move_into_place, staging_dir
from vistune.data.readers import DataError
from vistune.data.vocab import train_bpe, train_wordpiece

HELDOUT_SHARE = 0.1  # of the corpus's characters
VOCAB_SIZE = 8192
CORPUS = OutputKind(
    name="text corpus",
    command="vistune data text",
    owned=frozenset({"train.jsonl", "heldout.jsonl", "bpe", "wordpiece", "manifest.json"}),
    is_manifest=lambda data: data.get("kind") == "text corpus",
)
_PARAGRAPHS = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z])")


def read_texts(spec: DataSpec) -> list[str]:
    """The documents of one data entry (`limit` first ones, each `repeat` times), empty ones left out."""
    path = Path(spec.path)
    if path.suffix not in (".jsonl", ".txt"):
        raise ValueError(f'{path}: text data is a .jsonl file of {{"text": ...}} records or a .txt file')
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the file as UTF-8 text ({err})", kind="bad file") from err
    docs = _jsonl_texts(path, raw) if path.suffix == ".jsonl" else _PARAGRAPHS.split(raw)
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{path}: no text in the file", kind="bad file")
    return docs[: spec.limit] * spec.repeat


def _jsonl_texts(path: Path, raw: str) -> list[str]:
    """The `text` field of each line of a JSONL file; a bad line or field names the file and line."""
    texts = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {lineno}: not valid JSON ({err.msg})") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}: line {lineno}: field text: expected a string, got {text!r:.40}")
        texts.append(text)
    return texts


def read_all(specs: list[DataSpec]) -> list[str]:
    """The documents of every data entry of a stage, in order."""
    return [doc for spec in specs for doc in read_texts(spec)]


def sentences(document: str) -> list[str]:
    """A document's sentences: its paragraphs, prose cut after . ! or ? (code blocks stay whole);
    lines of punctuation only (heading underlines) are dropped."""
    out = []
    for paragraph in _PARAGRAPHS.split(document):
        text = " ".join(paragraph.split()) if not paragraph.startswith("   ") else paragraph.strip("\n")
        out += [s for s in _SENTENCE_END.split(text) if re.search(r"[A-Za-z0-9]", s)]
    return out


def python_docs() -> dict[str, str]:
    """The standard library's documentation topics: name -> text."""
    from pydoc_data.topics import topics

    return {name: text.strip() for name, text in sorted(topics.items()) if text.strip()}


def split_documents(docs: dict[str, str], share: float) -> tuple[list[str], list[str]]:
    """(train, held-out) names: in the order of their names' SHA-256, documents are held out until they
    hold `share` of the characters."""
    order = sorted(docs, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    total, held = sum(map(len, docs.values())), []
    for name in order:
        if sum(len(docs[n]) for n in held) >= share * total:
            break
        held.append(name)
    return sorted(set(docs) - set(held)), sorted(held)


def write_corpus(out: Path, share: float = HELDOUT_SHARE, vocab_size: int = VOCAB_SIZE) -> dict:
    """Write the corpus, its tokenizers and manifest.json into `out` (see the module docstring)."""
    replace = check_out(out, CORPUS)
    docs = python_docs()
    train, held = split_documents(docs, share)
    tmp = staging_dir(out)
    manifest = {"kind": "text corpus", "source": "pydoc_data.topics", "python": platform.python_version(),
                "heldout_share": share, "vocab_size": vocab_size, "files": {}}  # fmt: skip
    for name, split in (("train.jsonl", train), ("heldout.jsonl", held)):
        lines = [json.dumps({"id": n, "text": docs[n]}, ensure_ascii=False) + "\n" for n in split]
        (tmp / name).write_text("".join(lines), encoding="utf-8")
        digest = hashlib.sha256((tmp / name).read_bytes()).hexdigest()
        chars = sum(len(docs[n]) for n in split)
        manifest["files"][name] = {"documents": len(split), "characters": chars, "sha256": digest}
    texts = [docs[n] for n in train]
    train_bpe(texts, vocab_size).save_pretrained(tmp / "bpe")
    train_wordpiece(texts, vocab_size).save_pretrained(tmp / "wordpiece")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    move_into_place(tmp, out, replace)
    return manifest


def main_text(argv: list[str] | None = None) -> int:
    """`vistune data text --out DIR`: write the offline English corpus and its tokenizers."""
    parser = argparse.ArgumentParser(prog="vistune data text", description=main_text.__doc__)
    parser.add_argument("--out", required=True, help="a new or empty directory (or a previous corpus)")
    parser.add_argument("--heldout", type=float, default=HELDOUT_SHARE, help="share of characters held out")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="largest tokenizer vocabulary")
    args = parser.parse_args(argv)
    if not 0 < args.heldout < 0.5:
        raise ValueError(f"--heldout must be in (0, 0.5), got {args.heldout}")
    if args.vocab_size < 512:
        raise ValueError(f"--vocab-size must be at least 512, got {args.vocab_size}")
    manifest = write_corpus(Path(args.out), args.heldout, args.vocab_size)
    for name, info in manifest["files"].items():
        print(f"{args.out}/{name}: {info['documents']} documents, {info['characters']} characters")
    print(f"{args.out}/bpe, {args.out}/wordpiece: tokenizers (Python {manifest['python']}'s documentation)")
    return 0
