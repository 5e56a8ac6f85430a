"""The evaluation runner (the command line over it is `vistune.eval.command`).

`evaluate` turns records into rows: it builds each prompt, loads the images itself (so a missing or
corrupt image, an image path leaving the image root, or a malformed record, becomes a failed row rather
than a crash), calls `predictor.answer` on batches, and scores the rows with the task. It refuses an
empty record list and repeated ids (`check_records`). `run_eval` also writes predictions.jsonl,
metrics.json, report.md and PNGs. `rescore` scores predictions without a model: a vistune
predictions.jsonl, or any tool's {id, answer} lines against a benchmark's records. (Evaluation suites,
every task on a dataset's splits, come from extensions: `vistune eval --suite NAME`.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from vistune.data.images import load_image
from vistune.data.records import Record, Turn
from vistune.eval import report
from vistune.eval.paths import image_path
from vistune.eval.tasks import add_groups, get_task, make_row, score_rows

# A zero-shot classifier (from embeddings): (records, images per record, labels) -> one label each.
Classifier = Callable[[Sequence[Record], list[list], Sequence[str]], list[str]]


class Predictor(Protocol):
    """What a model must offer the evaluation: greedy answers to batches of conversations."""

    def answer(
        self, conversations: list[list[Turn]], images: list[list], max_new_tokens: int = 32
    ) -> list[str]:
        """One answer per conversation; each ends with a user turn with one `<image>` per image."""
        ...


def _load_images(row: dict, image_root, loader) -> list | None:
    """The row's images, or None with `row['error']` set when one cannot be loaded or its path leaves
    the image root (by its text or through a symlink: `vistune.eval.paths`)."""
    try:
        return [loader(str(image_path(image_root, p))) for p in row["images"]]
    except (OSError, ValueError) as e:  # ImageError, PathEscapeError are ValueErrors; OSError: unreadable
        row["error"] = f"image: {e}"
        return None


def check_records(records: Sequence[Record], source: str = "the records") -> None:
    """Refuse what would give a score that means nothing: no records at all, or an id given to more
    than one record (its rows, answers and scores could not be told apart)."""
    if not records:
        raise ValueError(f"{source}: no records to evaluate")
    first: dict[str, Record] = {}
    for record in records:
        if record.id in first:
            raise ValueError(
                f"{record.where()}: id {record.id!r} repeated (first: {first[record.id].where()}); "
                "every record needs its own id"
            )
        first[record.id] = record


def evaluate(
    predictor: Predictor | None,
    records: Sequence[Record],
    task: str,
    image_root: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    labels: Sequence[str] | None = None,
    classifier: Classifier | None = None,
    image_loader: Callable[[str], object] | None = None,
    meteor: bool = True,
    vqa_scoring: str = "lenient",
    group_by: Sequence[str] = (),
) -> tuple[list[dict], dict]:
    """Answer and score `records` on `task`; returns (rows, metrics).

    Args:
        predictor: the model (unused when `classifier` is given).
        records: what to evaluate; never filtered: each gives exactly one row.
        task: one of TASKS.
        image_root: directory the records' image paths are relative to.
        batch_size: conversations per `predictor.answer` call.
        max_new_tokens: generation budget (default: the task's).
        labels: class names (classify).
        classifier: zero-shot hook for classify: returns a label per record instead of generating.
        image_loader: path -> PIL image (default `vistune.data.images.load_image`).
        meteor: caption task: also compute METEOR (Java).
        vqa_scoring: vqa task: "official" (the VQAv2 script's figure) or "lenient" (see `metrics`).
        group_by: record fields to also report the score by (`metrics["by_FIELD"]`).

    Raises ValueError for no records or a repeated id (see `check_records`).
    """
    spec = get_task(task)
    check_records(records)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if predictor is None and classifier is None:
        raise ValueError("evaluate needs a predictor (or, for classify, a classifier)")
    if classifier is not None and task != "classify":
        raise ValueError(f"a classifier only applies to task 'classify', not {task!r}")
    loader = image_loader or load_image
    rows, pending = [], []
    for record in records:
        row, turns = make_row(record, spec, labels, group_by)
        rows.append(row)
        if turns is not None:
            pending.append((row, turns, record))
    # Prompts of similar length share a batch: less padding to compute. Rows keep the records' order.
    pending.sort(key=lambda item: sum(len(turn.content) for turn in item[1]))
    start = time.perf_counter()
    for i in range(0, len(pending), batch_size):
        batch = pending[i : i + batch_size]
        _answer_batch(predictor, batch, image_root, loader, spec, max_new_tokens, labels, classifier)
    seconds = time.perf_counter() - start
    metrics = score_rows(task, rows, labels, meteor=meteor, vqa_scoring=vqa_scoring)
    add_groups(metrics, rows, group_by)
    metrics["timing"] = {"seconds": seconds, "records_per_s": len(pending) / seconds if seconds else None}
    return rows, metrics


def _answer_batch(predictor, batch, image_root, loader, spec, max_new_tokens, labels, classifier) -> None:
    """Load the batch's images, drop rows whose images fail (marked failed), answer the rest."""
    ready = []
    for row, turns, record in batch:
        images = _load_images(row, image_root, loader) if row["images"] else []
        if images is not None:
            ready.append((row, turns, record, images))
    if not ready:
        return
    if classifier is not None:
        answers = classifier([r[2] for r in ready], [r[3] for r in ready], labels)
    else:
        budget = max_new_tokens or spec.max_new_tokens
        answers = predictor.answer([r[1] for r in ready], [r[3] for r in ready], max_new_tokens=budget)
    if len(answers) != len(ready):
        raise RuntimeError(f"predictor returned {len(answers)} answers for {len(ready)} conversations")
    for (row, *_), answer in zip(ready, answers, strict=True):
        row["answer"] = answer


def run_eval(
    predictor: Predictor | None,
    records: Sequence[Record],
    task: str,
    out_dir: str | Path,
    image_root: str | Path | None = None,
    info: dict | None = None,
    image_loader: Callable[[str], object] | None = None,
    **kwargs,
) -> dict:
    """`evaluate`, then write predictions.jsonl, metrics.json, report.md (+ PNGs) into out_dir.

    kwargs are `evaluate`'s (batch_size, max_new_tokens, labels, classifier, meteor, vqa_scoring).
    Returns the metrics.
    """
    rows, metrics = evaluate(
        predictor, records, task, image_root=image_root, image_loader=image_loader, **kwargs
    )
    metrics["image_root"] = None if image_root is None else str(Path(image_root).resolve())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.write_predictions(rows, out / "predictions.jsonl")
    report.write_report(out, task, metrics, rows, image_root=image_root, info=info, image_loader=image_loader)
    return metrics


def rescore(
    predictions: str | Path,
    task: str,
    labels: Sequence[str] | None = None,
    meteor: bool = True,
    records: Sequence[Record] | None = None,
    vqa_scoring: str = "lenient",
    limit: int | None = None,
    group_by: Sequence[str] = (),
) -> tuple[list[dict], dict]:
    """Score predictions without a model (`group_by` as in `evaluate`).

    Without `records`, `predictions` is a vistune predictions.jsonl whose rows carry their references
    (e.g. after editing answers). With `records` (a benchmark file, loaded), the references come from
    the records and `predictions` only needs an id and an answer per line (any tool's output, see
    `report.read_answers`); a record without a prediction is a failed row, and predictions whose id is
    not among the records are counted in `unmatched_predictions`. `limit` keeps the first rows of a
    predictions.jsonl (records are limited by the caller).
    """
    if records is None:
        rows = report.read_predictions(predictions)[:limit]
        if not rows:
            raise ValueError(f"{predictions}: no predictions in the file")
        for row in rows:
            if row.get("task") not in (None, task):
                raise ValueError(
                    f"{predictions} id {row['id']!r}: row is for task {row['task']!r}, not {task!r}"
                )
        metrics = score_rows(task, rows, labels, meteor=meteor, vqa_scoring=vqa_scoring)
        add_groups(metrics, rows, group_by)
        return rows, metrics
    check_records(records)
    answers = report.read_answers(predictions)
    spec = get_task(task)
    rows = []
    for record in records:
        row, turns = make_row(record, spec, labels, group_by)
        if turns is not None:  # a well-formed record: take its answer
            if record.id in answers:
                row["answer"] = answers[record.id]
            else:
                row["error"] = f"no prediction for id {record.id!r} in {predictions}"
        rows.append(row)
    metrics = score_rows(task, rows, labels, meteor=meteor, vqa_scoring=vqa_scoring)
    add_groups(metrics, rows, group_by)
    metrics["unmatched_predictions"] = len(set(answers) - {r.id for r in records})
    return rows, metrics
