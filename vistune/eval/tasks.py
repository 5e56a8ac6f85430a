"""Evaluation tasks: how each one turns a Record into a prompt and references, and scores answers.

A task is data: `Task(name, max_new_tokens, references, prompt, score)`, looked up by name with
`get_task`. The runner keeps one *row* (a plain dict, also one line of predictions.jsonl) per record:

    {"id", "task", "prompt", "answer", "references", "images", "meta", "error", "correct", "score"}

`score(rows, labels)` fills `correct`/`score` on every row and returns the task's metrics; rows with an
`error` (missing image, malformed record) count as wrong answers and are reported as failures.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vistune.data.records import IMAGE_PLACEHOLDER, Record, Turn
from vistune.eval import metrics as M
from vistune.eval.captions import caption_metrics
from vistune.eval.loaders import LOAD_ERROR

TASKS = ("vqa", "caption", "pope", "classify", "text")
# Record.meta keys copied into each row (what scoring and the report need later).
META_KEYS = ("question_type", "pope_setting", "answer_type", "match", "object")


def _last_assistant(record: Record) -> str | None:
    texts = [t.content for t in record.turns if t.role == "assistant"]
    return texts[-1] if texts else None


def _reference_text(value: object, where: str, field: str) -> str:
    """One reference as text: a string, or an integer (a count); anything else (null, a float, a list,
    an object, true/false) is refused, naming the record and field, rather than turned into 'None'."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{where}: field {field!r}: a reference must be a string, got {json.dumps(value)}")


def _refs_from(record: Record, keys: Sequence[str]) -> list[str]:
    """The first of meta[keys] present (a string, an integer or a non-empty list of them), else the last
    assistant turn. A string is one reference, never a sequence of one-letter references."""
    for key in keys:
        if key not in record.meta or record.meta[key] in ("", []):
            continue
        value = record.meta[key]
        if isinstance(value, list):
            return [_reference_text(v, record.where(), f"{key}[{i}]") for i, v in enumerate(value)]
        text = _reference_text(value, record.where(), key)
        if text.strip():
            return [text]
    last = _last_assistant(record)
    if last is None:
        raise ValueError(f"{record.where()}: no reference (fields {', '.join(keys)} or an assistant turn)")
    return [last]


def conversation_prompt(record: Record) -> list[Turn]:
    """The record's turns up to and including its last user turn (the answer to be generated is
    dropped); checks that the `<image>` placeholders match the record's images."""
    users = [i for i, t in enumerate(record.turns) if t.role == "user"]
    if not users:
        raise ValueError(f"{record.where()}: field 'turns' has no user turn to answer")
    turns = list(record.turns[: users[-1] + 1])
    placeholders = sum(t.content.count(IMAGE_PLACEHOLDER) for t in turns)
    if placeholders != len(record.images):
        raise ValueError(
            f"{record.where()}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the prompt but "
            f"{len(record.images)} image(s) in field 'images'"
        )
    return turns


def classify_prompt(record: Record, labels: Sequence[str]) -> list[Turn]:
    """Generative classification: the record's prompt, plus the list of labels when it does not
    already name them all."""
    turns = conversation_prompt(record)
    last = turns[-1]
    if not all(lab.lower() in last.content.lower() for lab in labels):
        turns[-1] = Turn("user", f"{last.content}\nAnswer with one of: {', '.join(labels)}.")
    return turns


def _failures(rows: list[dict]) -> dict:
    failed = [r for r in rows if r.get("error")]
    return {"n_records": len(rows), "failures": len(failed), "failed_ids": [r["id"] for r in failed]}


def _scorable(rows: list[dict]) -> list[dict]:
    """Rows that have references. A malformed record without one cannot be scored at all (it still
    counts in `failures`); every other failed row is scored as a wrong answer."""
    for r in rows:
        if not r["references"]:
            r["correct"], r["score"] = False, 0.0
    return [r for r in rows if r["references"]]


def score_vqa(rows: list[dict], labels: Sequence[str] | None = None, scoring: str = "lenient") -> dict:
    """VQA accuracy (`scoring`: "official" VQAv2 or "lenient", see `metrics`), exact match (the prediction
    equals any reference, compared as that scoring compares them), per question type and, when rows
    carry one, per answer type."""
    if scoring not in M.VQA_SCORING:
        raise ValueError(f"VQA scoring {scoring!r} is not one of {', '.join(M.VQA_SCORING)}")
    all_rows, rows = rows, _scorable(rows)
    if scoring == "official":
        few = next((r for r in rows if len(r["references"]) < 2), None)
        if few is not None:
            raise ValueError(
                f"record {few['id']!r}: official VQAv2 scoring needs the human answers (10 per question), "
                f"the record has {len(few['references'])}; use lenient scoring (--vqa-scoring lenient)"
            )
    for r in rows:
        ok = not r.get("error")
        r["score"] = M.vqa_score(r["answer"], r["references"], scoring) if ok else 0.0
        match = M.official_exact_match if scoring == "official" else M.exact_match
        r["correct"] = ok and match(r["answer"], r["references"])
    n = len(rows)
    scores = [r["score"] for r in rows]
    out = {
        "accuracy": sum(scores) / n if n else 0.0,
        "exact_match": sum(r["correct"] for r in rows) / n if n else 0.0,
        "n": n,
        "vqa_scoring": scoring,
        "by_question_type": M.mean_by_group(
            scores, [r["meta"].get("question_type", "unknown") for r in rows]
        ),
    }
    if any("answer_type" in r["meta"] for r in rows):
        out["by_answer_type"] = M.mean_by_group(
            scores, [r["meta"].get("answer_type", "unknown") for r in rows]
        )
    return {**out, **_failures(all_rows)}


def score_caption(rows: list[dict], labels: Sequence[str] | None = None, meteor: bool = True) -> dict:
    """Corpus BLEU/ROUGE-L/CIDEr(/METEOR) via pycocoevalcap; failed rows score as empty captions.
    `correct` stays None: a caption is scored, not right or wrong (the row's score is its CIDEr)."""
    all_rows, rows = rows, _scorable(rows)
    preds = {r["id"]: ("" if r.get("error") else r["answer"]) for r in rows}
    refs = {r["id"]: r["references"] for r in rows}
    if len(preds) != len(rows):
        raise ValueError("caption rows need unique ids (several rows share one)")
    out = caption_metrics(preds, refs, meteor=meteor)
    per_id = out.pop("per_id")
    for r in rows:
        r["score"] = per_id.get(r["id"], {}).get("CIDEr", 0.0)
        r["correct"] = None
    return {**out, **_failures(all_rows)}


def score_pope(rows: list[dict], labels: Sequence[str] | None = None) -> dict:
    """POPE accuracy/precision/recall/F1/yes-ratio overall and per setting; answers parsed yes/no."""
    all_rows, rows = rows, _scorable(rows)
    parsed = []
    for r in rows:
        p = "invalid" if r.get("error") else M.parse_yes_no(r["answer"])
        r["parsed"] = p
        r["correct"] = p == r["references"][0].strip().lower()
        r["score"] = float(r["correct"])
        parsed.append(p)
    targets = [r["references"][0].strip().lower() for r in rows]
    settings = [r["meta"].get("pope_setting") or "unknown" for r in rows]
    return {**M.pope_metrics(parsed, targets, settings), **_failures(all_rows)}


def score_classify(rows: list[dict], labels: Sequence[str] | None = None) -> dict:
    """Accuracy, per-class precision/recall/F1, macro-F1 and a confusion matrix; a generated answer is
    mapped to a label (exact, else the one label it mentions, else 'invalid')."""
    all_rows, rows = rows, _scorable(rows)
    labels = list(labels) if labels else sorted({r["references"][0] for r in rows})
    preds = []
    for r in rows:
        p = M.INVALID if r.get("error") else M.map_to_label(r["answer"], labels)
        r["parsed"] = p
        r["correct"] = p == r["references"][0]
        r["score"] = float(r["correct"])
        preds.append(p)
    out = M.classification_metrics(preds, [r["references"][0] for r in rows], labels)
    return {**out, "labels": labels, **_failures(all_rows)}


def score_text(rows: list[dict], labels: Sequence[str] | None = None) -> dict:
    """Share of plain-text questions answered right (normalised exact or containment match)."""
    all_rows, rows = rows, _scorable(rows)
    for r in rows:
        mode = r["meta"].get("match", "contains")
        r["correct"] = not r.get("error") and M.text_match(r["answer"], r["references"], mode)
        r["score"] = float(r["correct"])
    n = len(rows)
    by_type = M.mean_by_group([r["score"] for r in rows], [r["meta"].get("question_type", "?") for r in rows])
    return {
        "accuracy": sum(r["score"] for r in rows) / n if n else 0.0,
        "n": n,
        "by_question_type": by_type,
        **_failures(all_rows),
    }


@dataclass(frozen=True)
class Task:
    """One evaluation task: default generation length, where references live, prompt and scoring."""

    name: str
    max_new_tokens: int
    reference_keys: tuple[str, ...]
    score: Callable[[list[dict], Sequence[str] | None], dict]
    headline: tuple[str, ...]  # metric keys shown in suite tables

    def references(self, record: Record) -> list[str]:
        """The reference answer(s) of a record (POPE: checked to be yes/no)."""
        refs = _refs_from(record, self.reference_keys)
        if self.name == "pope":
            refs = [refs[0].strip().lower()]
            if refs[0] not in ("yes", "no"):
                raise ValueError(f"{record.where()}: POPE reference must be yes/no, got {refs[0]!r}")
        return refs

    def prompt(self, record: Record, labels: Sequence[str] | None = None) -> list[Turn]:
        """The conversation to answer (ends with a user turn)."""
        if self.name == "classify":
            if not labels:
                raise ValueError("task 'classify' needs labels (--labels a,b,c)")
            return classify_prompt(record, labels)
        return conversation_prompt(record)


_TASKS = {
    "vqa": Task("vqa", 16, ("answers", "answer"), score_vqa, ("accuracy", "exact_match")),
    "caption": Task("caption", 64, ("captions", "references"), score_caption, ("CIDEr", "BLEU-4")),
    "pope": Task("pope", 8, ("answer", "label"), score_pope, ("overall.accuracy", "overall.f1")),
    "classify": Task("classify", 16, ("label",), score_classify, ("accuracy", "macro_f1")),
    "text": Task("text", 32, ("answers", "answer"), score_text, ("accuracy",)),
}


def get_task(name: str) -> Task:
    """The task called `name`; one of TASKS."""
    if name not in _TASKS:
        raise ValueError(f"unknown eval task {name!r}; valid tasks: {', '.join(TASKS)}")
    return _TASKS[name]


def score_rows(
    task: str,
    rows: list[dict],
    labels: Sequence[str] | None = None,
    meteor: bool = True,
    vqa_scoring: str = "lenient",
) -> dict:
    """Score rows with the task called `task` (`meteor` only matters for captions, `vqa_scoring`,
    "official" or "lenient", only for vqa)."""
    if task == "caption":
        return score_caption(rows, labels, meteor=meteor)
    if task == "vqa":
        return score_vqa(rows, labels, scoring=vqa_scoring)
    return get_task(task).score(rows, labels)


def add_groups(metrics: dict, rows: Sequence[dict], group_by: Sequence[str]) -> None:
    """`metrics["by_FIELD"]`: the mean row score per value of each record field in `group_by` (rows
    without the field count as "unknown"; a failed row scores 0). A field the task already groups by
    keeps the task's table."""
    for name in group_by:
        key = f"by_{name}"
        if key in metrics:
            continue
        values = [_group_label(row["meta"].get(name, "unknown")) for row in rows]
        metrics[key] = M.mean_by_group([float(row["score"] or 0.0) for row in rows], values)


def _group_label(value: object) -> str:
    """A field's value as a group label: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def make_row(
    record: Record, task: Task, labels: Sequence[str] | None = None, group_by: Sequence[str] = ()
) -> tuple[dict, list[Turn] | None]:
    """A fresh row for `record` and its prompt; a malformed record gives a row with `error` set and
    no prompt (it is scored as a failure, never dropped). The row's `meta` keeps META_KEYS and the
    `group_by` fields of the record."""
    keep = (*META_KEYS, *group_by)
    row = {
        "id": record.id, "task": task.name, "prompt": "", "answer": "", "references": [],
        "images": list(record.images), "meta": {k: record.meta[k] for k in keep if k in record.meta},
        "error": None, "correct": None, "score": None,
    }  # fmt: skip
    if LOAD_ERROR in record.meta:
        row["error"] = f"malformed record: {record.meta[LOAD_ERROR]}"
        return row, None
    try:
        row["references"] = task.references(record)
        if task.name == "classify" and labels and row["references"][0] not in labels:
            raise ValueError(f"{record.where()}: label {row['references'][0]!r} is not one of {list(labels)}")
        turns = task.prompt(record, labels)
        if any("\ud800" <= ch <= "\udfff" for t in turns for ch in t.content):  # the tokenizer would raise
            raise ValueError(f"{record.where()}: the prompt is not valid Unicode (it holds a lone surrogate)")
    except ValueError as e:
        # A malformed record is not scored (no references), only counted and listed as a failure.
        row["error"], row["references"] = f"malformed record: {e}", []
        return row, None
    row["prompt"] = turns[-1].content
    return row, turns
