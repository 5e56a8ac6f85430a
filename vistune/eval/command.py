"""`vistune eval`: the command line over the evaluation runner (`vistune.eval.run`).

It reads the data before it loads a model, scores one task with a model or re-scores predictions
(any tool's, against `--data`), and answers with one message and exit 2 for bad input or when every
record failed. (`--task retrieval`, `--task lm` and the extensions' `--suite NAME` are routed elsewhere
by `vistune.cli`.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vistune.data.records import Record
from vistune.eval import report
from vistune.eval.explained import explain_answers
from vistune.eval.loaders import FORMATS, load_eval_records
from vistune.eval.metrics import VQA_SCORING
from vistune.eval.run import Predictor, check_records, rescore, run_eval
from vistune.eval.tasks import TASKS
from vistune.eval.text_bench import retention, text_records
from vistune.infer.explain import METHODS
from vistune.infer.generate import load_generator
from vistune.model.vlm import MODEL_FILE


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (so `--limit -1` or `--limit 0` is an error, not a silent slice)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vistune eval",
        description="Evaluate a trained model on a benchmark, or score predictions already made.",
        epilog="Also: --task retrieval (recall@k of a contrastive model), --task lm (held-out scores of a "
        "text pretraining objective) and --suite NAME (an installed "
        "extension's suite, listed by `vistune --help`); each has its own --help. Exit status: 0 scored; "
        "2 bad input, or every record failed; 1 an internal error (--debug shows its traceback).",
    )
    p.add_argument("model_dir", nargs="?", help="trained model directory (not with --predictions)")
    p.add_argument(
        "--task",
        choices=(*TASKS, "retrieval", "lm"),
        help="what to measure (retrieval and lm have their own: `vistune eval --task lm --help`)",
    )
    p.add_argument("--data", help="benchmark file (with --predictions: where the references come from)")
    p.add_argument("--format", choices=FORMATS, help="format of --data (default llava)")
    p.add_argument("--annotations", help="VQAv2 annotations JSON (with --format vqav2)")
    p.add_argument("--image-root", help="directory the image paths are relative to")
    p.add_argument("--out", default="runs/eval", help="output directory (default runs/eval)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N records")
    p.add_argument("--max-new-tokens", type=positive_int, help="generation budget (default: the task's)")
    p.add_argument("--labels", help="comma-separated class names (classify)")
    p.add_argument("--base", help="text task: also ask this base LLM (e.g. smollm2) and report retention")
    p.add_argument(
        "--predictions",
        help="score this file instead of running a model: a predictions.jsonl with references, or with "
        "--data any JSON/JSONL of {id or question_id, answer or text}",
    )
    p.add_argument(
        "--vqa-scoring",
        choices=VQA_SCORING,
        help="vqa: official (the VQAv2 script's figure; default with --format vqav2) or lenient "
        "(always normalise; the default otherwise)",
    )
    p.add_argument("--no-meteor", action="store_true", help="caption: skip METEOR (Java, ~7 s start-up)")
    p.add_argument(
        "--group-by",
        action="append",
        default=[],
        metavar="FIELD",
        help="also report the score by this field of the records (e.g. question_type, source); repeatable",
    )
    p.add_argument(
        "--explain",
        type=positive_int,
        metavar="N",
        help="also map where in the image the answers of N sampled records came from (into the report)",
    )
    p.add_argument(
        "--explain-method", choices=METHODS, default="gradient", help="with --explain (default: gradient)"
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Flag combinations that cannot work, refused before anything is loaded (argparse exits 2)."""
    if not a.task:
        p.error("give --task (or --suite NAME: see `vistune --help`)")
    if a.task in ("retrieval", "lm"):  # normally routed by `vistune eval` before this parser sees it
        p.error(f"--task {a.task} is handled by `vistune eval --task {a.task}` (see its --help)")
    if not a.predictions and not a.model_dir:
        p.error("MODEL_DIR is required unless --predictions is given")
    if a.predictions and (a.model_dir or a.base):
        p.error("give MODEL_DIR (to run a model) or --predictions (to score answers), not both")
    if a.task != "text" and not a.predictions and not a.data:
        p.error("--data is required for this task")
    if (a.format or a.annotations) and not a.data:
        p.error("--format and --annotations describe --data; give --data too")
    if a.format == "vqav2" and a.task == "vqa" and not a.annotations:
        p.error("--format vqav2 needs --annotations (the human answers) to score")
    if a.base and a.task != "text":
        p.error("--base only applies to --task text")
    if a.vqa_scoring and a.task != "vqa":
        p.error("--vqa-scoring only applies to --task vqa")
    if a.explain and (a.predictions or a.task == "text"):
        p.error("--explain maps a model's answers over images: give MODEL_DIR and an image task")
    if a.image_root and not Path(a.image_root).is_dir():
        p.error(f"--image-root {a.image_root}: no such directory")
    if Path(a.out).exists() and not Path(a.out).is_dir():
        p.error(f"--out {a.out}: exists and is not a directory")


def main_eval(argv: list[str] | None = None) -> int:
    """`vistune eval`: run or re-score one task; print the metrics.

    Returns 0; 2 after one message naming the file, record, field or flag when the input is wrong, or
    when every record failed; 1 for an unexpected error (its traceback with --debug).
    """
    p = _parser()
    a = p.parse_args(argv)
    _check_args(p, a)
    try:
        return _main(a)
    except (ValueError, OSError, RecursionError) as e:  # bad files, formats, labels, paths
        if a.debug:
            raise
        message = "input nested too deeply to read" if isinstance(e, RecursionError) else str(e)
        print(f"vistune eval: error: {message}", file=sys.stderr)
        return 2
    except Exception as e:
        if a.debug:
            raise
        print(f"vistune eval: internal error: {type(e).__name__}: {e} (--debug shows where)", file=sys.stderr)
        return 1


def _load_data(a: argparse.Namespace) -> tuple[list[Record] | None, str | None]:
    """The records to score (None: references live in the predictions file) and the image root."""
    image_root = a.image_root
    if a.data is None:
        records = text_records() if a.task == "text" and not a.predictions else None
        return (records[: a.limit] if records is not None else None), image_root
    fmt = a.format or "llava"
    records = load_eval_records(fmt, a.data, a.annotations)
    if image_root is None and fmt == "llava":  # llava.py's convention: the file's folder
        image_root = a.data if Path(a.data).is_dir() else str(Path(a.data).parent)
    records = records[: a.limit]
    check_records(records, a.data)
    return records, image_root


def _vqa_scoring(a: argparse.Namespace) -> str:
    """--vqa-scoring, else official for --format vqav2, else what the rescored run used, else lenient."""
    if a.vqa_scoring:
        return a.vqa_scoring
    if a.format == "vqav2":
        return "official"
    if a.predictions and not a.data:
        return _previous_metrics(a.predictions).get("vqa_scoring", "lenient")
    return "lenient"


def _main(a: argparse.Namespace) -> int:
    labels = [s.strip() for s in a.labels.split(",") if s.strip()] if a.labels else None
    records, image_root = _load_data(a)  # before the model: bad data fails fast
    if a.task == "classify" and labels is None and records is not None:
        labels = sorted({r.meta.get("label") for r in records if isinstance(r.meta.get("label"), str)})
        if not labels:
            raise ValueError(
                f"--task classify needs class names: give --labels a,b,c, or records in {a.data} with a "
                "'label' field"
            )
    scoring = _vqa_scoring(a)
    if a.predictions:
        metrics = _score_predictions(a, records, image_root, labels, scoring)
    else:
        predictor = _load_model(a.model_dir, a.task, a.batch_size)
        metrics = _run_task(a, predictor, records, image_root, labels, scoring)
        if a.explain:
            found = explain_answers(
                predictor, records, a.task, a.out, a.explain, image_root, a.explain_method, labels
            )
            print(f"mapped {len(found)} answers into {Path(a.out) / 'explain'} (listed in report.md)")
    print(json.dumps(_brief(metrics), indent=2, default=float))
    return _exit_status(metrics, a.out)


def _score_predictions(a, records, image_root, labels, scoring: str) -> dict:
    """--predictions: score, write predictions.jsonl, metrics.json and report.md into --out."""
    rows, metrics = rescore(
        a.predictions,
        a.task,
        labels,
        not a.no_meteor,
        records=records,
        vqa_scoring=scoring,
        limit=a.limit,
        group_by=a.group_by,
    )
    if records is None:
        image_root = image_root or _previous_metrics(a.predictions).get("image_root")
    if metrics.get("unmatched_predictions"):
        print(
            f"vistune eval: warning: {metrics['unmatched_predictions']} prediction(s) in {a.predictions} "
            f"have an id that is not among the {len(rows)} records of {a.data}; ignored",
            file=sys.stderr,
        )
    metrics["image_root"] = None if image_root is None else str(Path(image_root).resolve())
    Path(a.out).mkdir(parents=True, exist_ok=True)
    report.write_predictions(rows, Path(a.out) / "predictions.jsonl")
    info = {
        "predictions": a.predictions,
        **({"data": a.data, "format": a.format or "llava"} if a.data else {}),
    }
    report.write_report(a.out, a.task, metrics, rows, image_root=image_root, info=info)
    return metrics


def _load_model(model_dir: str, task: str, batch_size: int) -> Predictor:
    """The model, after a check that names the path: image tasks need a trained vistune model dir (a
    plain LLM cannot see images); the text task also takes an LLM name or hub id."""
    path = Path(model_dir)
    if not (path / MODEL_FILE).is_file():
        if not path.exists() and (task != "text" or path.is_absolute() or model_dir.startswith((".", "~"))):
            raise ValueError(f"MODEL_DIR {model_dir}: no such directory")
        if task != "text":
            raise ValueError(f"MODEL_DIR {model_dir}: not a trained vistune model (no {MODEL_FILE} in it)")
    try:
        return load_generator(model_dir, batch_size=batch_size)
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:  # a damaged or foreign model dir
        raise ValueError(f"MODEL_DIR {model_dir}: cannot load the model ({type(e).__name__}: {e})") from e


def _first_error(out: str) -> str:
    """The first failed row's error in OUT/predictions.jsonl (just written), for the exit message."""
    for line in (Path(out) / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("error"):
            return f"{row['id']!r}: {row['error']}"
    return "?"


def _exit_status(metrics: dict, out: str) -> int:
    """0, with a warning when some records failed; 2 when every record failed (nothing was measured:
    a wrong --image-root, or predictions whose ids are not those of --data, say)."""
    failures, total = metrics.get("failures", 0), metrics.get("n_records", 0)
    if total and failures == total:
        print(
            f"vistune eval: error: all {total} records failed, so the metrics measure nothing; the first: "
            f"{_first_error(out)} (all are in {Path(out) / 'report.md'}; check --image-root and --data)",
            file=sys.stderr,
        )
        return 2
    if failures:
        print(
            f"vistune eval: warning: {failures} of {total} records failed and score as wrong "
            f"(listed in {Path(out) / 'report.md'})",
            file=sys.stderr,
        )
    return 0


def _run_task(a, predictor: Predictor, records, image_root, labels, scoring: str) -> dict:
    """One task from the command line (text: optionally against the base LLM)."""
    info = {"model": a.model_dir, "data": a.data or "built-in text set", "format": a.format or "llava"}
    kwargs = {
        "batch_size": a.batch_size,
        "max_new_tokens": a.max_new_tokens,
        "labels": labels,
        "meteor": not a.no_meteor,
        "vqa_scoring": scoring,
        "group_by": a.group_by,
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


def _previous_metrics(predictions: str) -> dict:
    """The metrics.json next to a predictions file ({} when absent or unreadable): its image root and
    VQA scoring are reused when scoring the file again."""
    path = Path(predictions).with_name("metrics.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _brief(metrics: dict) -> dict:
    """Metrics without the long lists (failed ids, confusion, per id) for the terminal."""
    skip = ("failed_ids", "confusion", "per_class")
    return {k: v for k, v in metrics.items() if k not in skip}
