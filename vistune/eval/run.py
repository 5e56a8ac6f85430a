"""The evaluation runner and the `vistune eval` command.

`evaluate` turns records into rows: it builds each prompt, loads the images itself (so a missing or
corrupt image, or a malformed record, becomes a failed row rather than a crash), calls
`predictor.answer` on batches, and scores the rows with the task. `run_eval` also writes
predictions.jsonl, metrics.json, report.md and PNGs. (The shapes world's suite, every task on its
splits, is `vistune.shapes.suite`; `vistune eval --suite shapes` runs it.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from vistune.data.images import load_image
from vistune.data.records import Record, Turn
from vistune.eval import report
from vistune.eval.loaders import load_eval_records
from vistune.eval.tasks import TASKS, get_task, make_row, score_rows
from vistune.eval.text_bench import retention, text_records
from vistune.infer.generate import load_generator

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
    """The row's images, or None with `row['error']` set when one cannot be loaded."""
    try:
        return [loader(str(Path(image_root or ".") / p)) for p in row["images"]]
    except (OSError, ValueError) as e:  # ImageError is a ValueError; OSError covers unreadable files
        row["error"] = f"image: {e}"
        return None


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
    """
    spec = get_task(task)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if predictor is None and classifier is None:
        raise ValueError("evaluate needs a predictor (or, for classify, a classifier)")
    if classifier is not None and task != "classify":
        raise ValueError(f"a classifier only applies to task 'classify', not {task!r}")
    loader = image_loader or load_image
    rows, pending = [], []
    for record in records:
        row, turns = make_row(record, spec, labels)
        rows.append(row)
        if turns is not None:
            pending.append((row, turns, record))
    start = time.perf_counter()
    for i in range(0, len(pending), batch_size):
        batch = pending[i : i + batch_size]
        _answer_batch(predictor, batch, image_root, loader, spec, max_new_tokens, labels, classifier)
    seconds = time.perf_counter() - start
    metrics = score_rows(task, rows, labels, meteor=meteor)
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

    kwargs are `evaluate`'s (batch_size, max_new_tokens, labels, classifier, meteor). Returns the metrics.
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
    predictions: str | Path, task: str, labels: Sequence[str] | None = None, meteor: bool = True
) -> tuple[list[dict], dict]:
    """Score an existing predictions.jsonl again (e.g. after editing answers) without a model."""
    rows = report.read_predictions(predictions)
    for row in rows:
        if row.get("task") not in (None, task):
            raise ValueError(f"{predictions} id {row['id']!r}: row is for task {row['task']!r}, not {task!r}")
    return rows, score_rows(task, rows, labels, meteor=meteor)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vistune eval",
        description="Evaluate a trained model on a benchmark.",
        epilog="Also: --task retrieval (recall@k of a contrastive model) and --suite shapes (every task on "
        "the shapes world's splits); each has its own --help.",
    )
    p.add_argument("model_dir", nargs="?", help="trained model directory (not needed with --predictions)")
    p.add_argument(
        "--task",
        choices=TASKS,
        help="what to measure (retrieval: see `vistune eval --task retrieval --help`)",
    )
    p.add_argument("--data", help="benchmark file")
    p.add_argument("--format", default="llava", help="llava, vqav2, gqa, pope or textvqa (default llava)")
    p.add_argument("--annotations", help="VQAv2 annotations JSON (with --format vqav2)")
    p.add_argument("--image-root", help="directory the image paths are relative to")
    p.add_argument("--out", default="runs/eval", help="output directory (default runs/eval)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="evaluate only the first N records")
    p.add_argument("--max-new-tokens", type=int, help="generation budget (default: the task's)")
    p.add_argument("--labels", help="comma-separated class names (classify)")
    p.add_argument("--base", help="text task: also ask this base LLM (e.g. smollm2) and report retention")
    p.add_argument("--predictions", help="score this predictions.jsonl instead of running a model")
    p.add_argument("--no-meteor", action="store_true", help="caption: skip METEOR (Java, ~7 s start-up)")
    return p


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if not a.task:
        p.error("give --task (or --suite shapes)")
    if not a.predictions and not a.model_dir:
        p.error("MODEL_DIR is required unless --predictions is given")
    if a.task != "text" and not a.predictions and not a.data:
        p.error("--data is required for this task")
    if a.base and a.task != "text":
        p.error("--base only applies to --task text")


def main_eval(argv: list[str] | None = None) -> int:
    """`vistune eval`: run or re-score one task; print the metrics.

    Returns 0, or 2 after printing the message when the data or arguments are wrong (ValueError).
    """
    p = _parser()
    a = p.parse_args(argv)
    _check_args(p, a)
    try:
        return _main(a)
    except ValueError as e:  # bad files, formats, labels: the message names file, record and field
        print(f"vistune eval: error: {e}", file=sys.stderr)
        return 2


def _main(a: argparse.Namespace) -> int:
    labels = [s.strip() for s in a.labels.split(",") if s.strip()] if a.labels else None
    if a.predictions:
        rows, metrics = rescore(a.predictions, a.task, labels, meteor=not a.no_meteor)
        image_root = a.image_root or _previous_image_root(a.predictions)
        Path(a.out).mkdir(parents=True, exist_ok=True)
        report.write_predictions(rows, Path(a.out) / "predictions.jsonl")
        info = {"predictions": a.predictions}
        report.write_report(a.out, a.task, metrics, rows, image_root=image_root, info=info)
        print(json.dumps(_brief(metrics), indent=2, default=float))
        return 0
    predictor = load_generator(a.model_dir, batch_size=a.batch_size)
    metrics = _run_task(a, predictor, labels)
    print(json.dumps(_brief(metrics), indent=2, default=float))
    return 0


def _run_task(a: argparse.Namespace, predictor: Predictor, labels: list[str] | None) -> dict:
    """One task from the command line (text: optionally against the base LLM)."""
    image_root = a.image_root
    if a.task == "text" and not a.data:
        records = text_records()
    else:
        records = load_eval_records(a.format, a.data, a.annotations)
        if image_root is None and a.format == "llava":  # llava.py's convention: the file's folder
            image_root = a.data if Path(a.data).is_dir() else str(Path(a.data).parent)
    records = records[: a.limit]
    if a.task == "classify" and labels is None:
        labels = sorted({r.meta.get("label") for r in records if r.meta.get("label")})
    info = {"model": a.model_dir, "data": a.data or "built-in text set", "format": a.format}
    kwargs = {
        "batch_size": a.batch_size,
        "max_new_tokens": a.max_new_tokens,
        "labels": labels,
        "meteor": not a.no_meteor,
    }
    metrics = run_eval(predictor, records, a.task, a.out, image_root=image_root, info=info, **kwargs)
    if a.base:
        base = load_generator(a.base, batch_size=a.batch_size)
        base_metrics = run_eval(base, records, "text", Path(a.out) / "base", info={"model": a.base}, **kwargs)
        metrics["base"] = base_metrics
        metrics["retention"] = retention(metrics, base_metrics)
        report.write_json(metrics, Path(a.out) / "metrics.json")
        with (Path(a.out) / "report.md").open("a") as f:
            r = metrics["retention"]
            f.write(
                f"\n## Retention vs. base LLM {a.base}\n\nmodel {r['model_accuracy']:.4f}, "
                f"base {r['base_accuracy']:.4f}, ratio {_ratio(r['retention'])} "
                "([base report](base/report.md))\n"
            )
    return metrics


def _previous_image_root(predictions: str) -> str | None:
    """The image root recorded in the metrics.json next to a predictions file, if any."""
    path = Path(predictions).with_name("metrics.json")
    return json.loads(path.read_text()).get("image_root") if path.exists() else None


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _brief(metrics: dict) -> dict:
    """Metrics without the long lists (failed ids, confusion, per id) for the terminal."""
    skip = ("failed_ids", "confusion", "per_class")
    return {k: v for k, v in metrics.items() if k not in skip}
