"""Benchmark files -> Records: VQAv2, GQA, POPE, TextVQA and LLaVA-format single-turn files.

Each loader builds a one-turn user prompt ("<image>\\nQUESTION\\n<suffix>") and keeps the references in
`Record.meta`: `answers` (all human answers), `answer` (the main one), `question_type` and, for POPE,
`pope_setting`. Image paths are relative to the benchmark's image root. Malformed entries raise a
ValueError naming the file, entry and field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from vistune.data.readers import load_records
from vistune.data.records import IMAGE_PLACEHOLDER, Record, Turn

# LLaVA-1.5's evaluation prompt for short-answer benchmarks.
SHORT_ANSWER = "Answer the question using a single word or phrase."
FORMATS = ("llava", "vqav2", "gqa", "pope", "textvqa")
# meta key of a stand-in Record for an entry that could not be read.
LOAD_ERROR = "load_error"


def _loads(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON: {e}") from e
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to read") from None


def _read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from e


def _read_json(path: str | Path, kind: type = dict):
    """The file's JSON, checked to be a `kind` (dict or list) at the top."""
    data = _loads(_read_text(path), str(path))
    if not isinstance(data, kind):
        raise ValueError(f"{path}: expected a JSON {_KIND_NAMES[kind]} at the top, got {_json_type(data)}")
    return data


_KIND_NAMES = {dict: "object", list: "list", str: "string", int: "integer", (str, int): "string or integer"}


def _json_type(value) -> str:
    return json.dumps(value)[:60] if not isinstance(value, (dict, list)) else type(value).__name__


def _field(entry, key: str, path, entry_id, kind: type | tuple | None = None):
    """entry[key], checked to be present (and of `kind`: str, int, list, dict or (str, int)); a ValueError
    names the file, the entry and the field otherwise. Booleans are not integers here."""
    if not isinstance(entry, dict):
        raise ValueError(f"{path} entry {entry_id!r}: expected a JSON object, got {_json_type(entry)}")
    if key not in entry:
        raise ValueError(f"{path} entry {entry_id!r}: missing field {key!r}")
    value = entry[key]
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        expected = _KIND_NAMES[kind]
        raise ValueError(
            f"{path} entry {entry_id!r}: field {key!r}: expected a {expected}, got {_json_type(value)}"
        )
    return value


def _question_record(rid, image: str, question: str, meta: dict, source) -> Record:
    prompt = f"{IMAGE_PLACEHOLDER}\n{question}\n{SHORT_ANSWER}"
    return Record(id=str(rid), images=[image], turns=[Turn("user", prompt)], meta=meta, source=str(source))


def _vqav2_meta(a: dict, path, qid) -> dict:
    """References of one VQAv2 annotation: the human answers (strings), main answer and types."""
    answers = _field(a, "answers", path, qid, list)
    return {
        "answers": [_field(x, "answer", path, f"{qid} answers[{i}]", str) for i, x in enumerate(answers)],
        "answer": a.get("multiple_choice_answer", ""),
        "question_type": a.get("question_type", "unknown"),
        "answer_type": a.get("answer_type", "unknown"),
    }


def load_vqav2(questions: str | Path, annotations: str | Path | None = None) -> list[Record]:
    """VQAv2 questions JSON (+ annotations JSON with the 10 human answers and question_type).

    Images are named as in COCO: `{data_subtype}/COCO_{data_subtype}_{image_id:012d}.jpg`. Without
    annotations the records carry no references (they cannot be scored).
    """
    qdata = _read_json(questions)
    subtype = qdata.get("data_subtype", "val2014")
    anns = {}
    if annotations is not None:
        for i, a in enumerate(_field(_read_json(annotations), "annotations", annotations, "<root>", list)):
            anns[_field(a, "question_id", annotations, f"#{i}", (str, int))] = a
    records = []
    for i, q in enumerate(_field(qdata, "questions", questions, "<root>", list)):
        qid = _field(q, "question_id", questions, f"#{i}", (str, int))
        meta: dict = {}
        if annotations is not None:
            if qid not in anns:
                raise ValueError(f"{annotations}: no annotation for question_id {qid}")
            meta = _vqav2_meta(anns[qid], annotations, qid)
        image = f"{subtype}/COCO_{subtype}_{_field(q, 'image_id', questions, qid, int):012d}.jpg"
        question = _field(q, "question", questions, qid, str)
        records.append(_question_record(qid, image, question, meta, questions))
    return records


def load_gqa(path: str | Path) -> list[Record]:
    """GQA balanced questions JSON: {question_id: {imageId, question, answer, types: {structural}}}.

    Images are `{imageId}.jpg`; question_type is the structural type (query, verify, logical, choose,
    compare), 'unknown' when absent.
    """
    records = []
    for qid, q in _read_json(path).items():
        answer = _field(q, "answer", path, qid, str)
        qtype = (q.get("types") or {}).get("structural", "unknown")
        meta = {"answers": [answer], "answer": answer, "question_type": qtype}
        image = f"{_field(q, 'imageId', path, qid, (str, int))}.jpg"
        records.append(_question_record(qid, image, _field(q, "question", path, qid, str), meta, path))
    return records


def load_pope(path: str | Path, setting: str | None = None) -> list[Record]:
    """POPE JSONL: one {question_id, image, text, label} per line.

    The setting (random/popular/adversarial) is `setting`, else read from the file name
    (coco_pope_random.json), else the entry's 'category' field, else 'unknown'.
    """
    path = Path(path)
    if setting is None:
        setting = next((s for s in ("random", "popular", "adversarial") if s in path.name), None)
    records = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        q = _loads(line, f"{path} line {n}")
        qid = _field(q, "question_id", path, f"line {n}", (str, int))
        label = _field(q, "label", path, qid, str).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"{path} entry {qid!r}: field 'label' must be yes/no, got {label!r}")
        meta = {"answers": [label], "answer": label, "pope_setting": setting or q.get("category", "unknown")}
        image, text = _field(q, "image", path, qid, str), _field(q, "text", path, qid, str)
        records.append(_question_record(qid, image, text, meta, path))
    return records


def load_textvqa(path: str | Path) -> list[Record]:
    """TextVQA JSON: {"data": [{question_id, image_id, question, answers: [10 strings]}]}; images are
    `{image_id}.jpg`. Entries without answers (the test split) have no references."""
    records = []
    for i, q in enumerate(_field(_read_json(path), "data", path, "<root>", list)):
        qid = _field(q, "question_id", path, f"#{i}", (str, int))
        answers = _field(q, "answers", path, qid, list) if q.get("answers") is not None else []
        for j, a in enumerate(answers):
            if not isinstance(a, str):
                raise ValueError(
                    f"{path} entry {qid!r}: field 'answers[{j}]': expected a string, got {_json_type(a)}"
                )
        meta = {"answers": answers, "answer": answers[0] if answers else "", "question_type": "text"}
        image = f"{_field(q, 'image_id', path, qid, (str, int))}.jpg"
        records.append(_question_record(qid, image, _field(q, "question", path, qid, str), meta, path))
    return records


def load_llava(path: str | Path) -> list[Record]:
    """LLaVA JSON/JSONL (or an ImageFolder) through `vistune.data.readers.load_records`; extra fields land
    in meta. A malformed record does not stop the load: it becomes a stand-in Record whose
    meta[LOAD_ERROR] holds the error, so the runner reports it as a failed row."""
    recordset = load_records(str(path))
    records = []
    for i in range(len(recordset)):
        try:
            records.append(recordset[i])
        except ValueError as e:  # DataError names the file, record and field
            raw = recordset.raw(i)
            rid = str(raw.get("id", f"#{i}")) if isinstance(raw, dict) else f"#{i}"
            records.append(Record(id=rid, images=[], turns=[], meta={LOAD_ERROR: str(e)}, source=str(path)))
    return records


def load_eval_records(fmt: str, path: str | Path, annotations: str | Path | None = None) -> list[Record]:
    """Load a benchmark file by format name: one of FORMATS."""
    loaders: dict[str, Callable[[], list[Record]]] = {
        "llava": lambda: load_llava(path),
        "vqav2": lambda: load_vqav2(path, annotations),
        "gqa": lambda: load_gqa(path),
        "pope": lambda: load_pope(path),
        "textvqa": lambda: load_textvqa(path),
    }
    if fmt not in loaders:
        raise ValueError(f"unknown eval data format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if annotations is not None and fmt != "vqav2":
        raise ValueError(f"--annotations is only used with --format vqav2, not {fmt!r}")
    return loaders[fmt]()
