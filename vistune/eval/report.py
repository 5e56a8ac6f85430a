"""Evaluation outputs: predictions.jsonl, metrics.json, report.md and the PNGs it links.

The report shows, not only tells: a grid of sample images with the question, the model's answer and
the reference, framed green (right), red (wrong) or grey (scored, not right/wrong: captions), a
confusion matrix for classification, and every failed record with its error.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from vistune import extensions
from vistune.data.images import load_image
from vistune.eval.metrics import save_confusion_png
from vistune.eval.paths import image_path
from vistune.eval.tasks import get_task

VQA_SCORING_NOTES = {
    "official": "as the official VQAv2 vqaEval.py: when the ten human answers agree, the prediction is "
    "compared unnormalised",
    "lenient": "prediction and human answers always normalised; not the official VQAv2 figure",
}
ROW_KEYS = ("id", "task", "prompt", "answer", "references", "images", "meta", "error", "correct", "score")
MAX_LISTED_FAILURES = 50


def write_predictions(rows: Sequence[dict], path: str | Path) -> Path:
    """One JSON object per row (id, prompt, answer, references, correct, score, ...)."""
    path = Path(path)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _read_entries(path: str | Path) -> list[tuple[str, object]]:
    """(where, parsed JSON) for each entry of a JSONL file or a JSON list; ValueError naming the file and
    line for unreadable, non-JSON or too deeply nested text."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from e
    if text.lstrip().startswith("["):  # a JSON list (e.g. an official VQAv2 results file)
        data = _loads(text, f"{path}")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list or JSON lines")
        return [(f"{path} entry #{i}", item) for i, item in enumerate(data)]
    return [
        (f"{path} line {n}", _loads(line, f"{path} line {n}"))
        for n, line in enumerate(text.splitlines(), 1)
        if line.strip()
    ]


def _loads(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON: {e}") from e
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to read") from None


def _row_id(value, where: str) -> str:
    """A row's id as text: a string or an integer (question ids); anything else is refused."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{where}: field 'id': expected a string or an integer, got {json.dumps(value)}")


def _check_row(row: dict, where: str) -> None:
    """Types of a predictions row's fields; a string reference is one reference, not one per letter."""
    if not isinstance(row["answer"], str):
        raise ValueError(f"{where}: field 'answer': expected a string, got {json.dumps(row['answer'])}")
    refs = row["references"]
    if isinstance(refs, str):
        row["references"] = refs = [refs]
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise ValueError(f"{where}: field 'references': expected a list of strings, got {json.dumps(refs)}")
    for key, kind in (("meta", dict), ("images", list)):
        if not isinstance(row[key], kind):
            raise ValueError(
                f"{where}: field {key!r}: expected a {kind.__name__}, got {json.dumps(row[key])}"
            )
    if not all(isinstance(p, str) for p in row["images"]):
        raise ValueError(
            f"{where}: field 'images': expected a list of paths, got {json.dumps(row['images'])}"
        )
    if row["error"] is not None and not isinstance(row["error"], str):
        raise ValueError(f"{where}: field 'error': expected a string or null, got {json.dumps(row['error'])}")


def read_predictions(path: str | Path) -> list[dict]:
    """Rows written by `write_predictions` (each with id, answer and references); raises ValueError naming
    the line and field for a missing or mistyped field or a repeated id."""
    rows, seen = [], {}
    for where, row in _read_entries(path):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {json.dumps(row)[:60]}")
        missing = [k for k in ("id", "answer", "references") if k not in row]
        if missing:
            hint = (
                " (to score answers against a benchmark file, give --data FILE)"
                if missing == ["references"]
                else ""
            )
            raise ValueError(f"{where} (id {row.get('id')!r}): missing field(s) {missing}{hint}")
        row["id"] = _row_id(row["id"], where)
        where = f"{where} (id {row['id']!r})"
        if row["id"] in seen:
            raise ValueError(f"{where}: id repeated (first at {seen[row['id']]})")
        seen[row["id"]] = where
        row.setdefault("meta", {})
        row.setdefault("images", [])
        row.setdefault("error", None)
        _check_row(row, where)
        rows.append(row)
    return rows


def read_answers(path: str | Path) -> dict[str, str]:
    """{id: answer} from predictions made by any tool: JSON lines or a JSON list of objects with an id
    (`id` or `question_id`) and an answer (`answer` or `text`, as LLaVA's answer files have). Other
    fields are ignored. Raises ValueError naming the entry and field (missing, mistyped, repeated id)."""
    answers: dict[str, str] = {}
    where_of: dict[str, str] = {}
    for where, entry in _read_entries(path):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a JSON object, got {json.dumps(entry)[:60]}")
        id_key = next((k for k in ("id", "question_id") if k in entry), None)
        answer_key = next((k for k in ("answer", "text") if k in entry), None)
        if id_key is None or answer_key is None:
            raise ValueError(
                f"{where}: needs an id ('id' or 'question_id') and an answer ('answer' or 'text')"
            )
        rid = _row_id(entry[id_key], f"{where}: field {id_key!r}")
        answer = entry[answer_key]
        if not isinstance(answer, str):
            raise ValueError(
                f"{where} (id {rid!r}): field {answer_key!r}: expected a string, got {json.dumps(answer)}"
            )
        if rid in answers:
            raise ValueError(f"{where}: id {rid!r} repeated (first at {where_of[rid]})")
        answers[rid], where_of[rid] = answer, where
    if not answers:
        raise ValueError(f"{path}: no predictions in the file")
    return answers


def write_json(obj, path: str | Path) -> Path:
    """Pretty JSON; numpy scalars become floats."""
    path = Path(path)
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    return path


def lookup(metrics: dict, dotted: str):
    """metrics['a']['b'] for 'a.b'; None when absent."""
    value = metrics
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    """The lines of a markdown table; floats with 4 decimals, None as "-"."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def _pick_samples(rows: Sequence[dict], n: int) -> list[dict]:
    """Up to n rows with images, spread evenly over the file (deterministic)."""
    with_images = [r for r in rows if r.get("images")]
    if len(with_images) <= n:
        return with_images
    step = len(with_images) / n
    return [with_images[int(i * step)] for i in range(n)]


def sample_grid(
    rows: Sequence[dict],
    image_root: str | Path | None,
    path: str | Path,
    image_loader: Callable[[str], object] | None = None,
    n: int = 16,
    cols: int = 4,
) -> Path | None:
    """A PNG grid of sample records: image, Q/A/reference text, green/red/grey frame. None when no row
    has an image. Images that fail to load are drawn as a grey tile with the error."""
    samples = _pick_samples(rows, n)
    if not samples:
        return None
    nrows = (len(samples) + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 4.6 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, samples, strict=False):
        _draw_sample(ax, row, image_root, image_loader or load_image)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    return path


def _draw_sample(ax, row: dict, image_root, image_loader) -> None:
    try:
        ax.imshow(image_loader(str(image_path(image_root, row["images"][0]))))
    except Exception as e:  # noqa: BLE001 - any unreadable image is shown, not fatal, in a report
        ax.text(
            0.5,
            0.5,
            textwrap.fill(str(e), 30),
            ha="center",
            va="center",
            fontsize=7,
            wrap=True,
            parse_math=False,
        )
    color = {True: "green", False: "red"}.get(row.get("correct"), "grey")
    ax.axis("on")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color(color)
        spine.set_linewidth(5)
    question = row.get("prompt", "").replace("<image>", "").strip()
    refs = row.get("references") or ["?"]
    answer = row.get("error") or row.get("answer", "")
    score = "" if row.get("score") is None else f"  (score {row['score']:.2f})"
    text = "\n".join(
        [
            textwrap.shorten(f"Q: {question}", 90),
            textwrap.shorten(f"A: {answer}", 90) + score,
            textwrap.shorten(f"ref: {refs[0]}", 90),
        ]
    )
    # parse_math=False: a model's answer is text; "$" in it must not be read as matplotlib's maths markup
    label = "\n".join(textwrap.fill(line, 38) for line in text.split("\n"))
    ax.set_xlabel(label, fontsize=7, color=color, parse_math=False)
    ax.set_title(str(row["id"])[:40], fontsize=7, parse_math=False)


def _detail_tables(task: str, metrics: dict) -> list[str]:
    """Per-group tables: question and answer types (vqa, text), POPE settings, classes (classify)."""
    lines: list[str] = []
    for key in (k for k in metrics if k.startswith("by_")):  # question and answer types, --group-by fields
        title = key[len("by_") :].replace("_", " ")
        lines += ["", f"## By {title}", ""]
        lines += markdown_table(
            [title, "accuracy", "n"], [(g, v["accuracy"], v["n"]) for g, v in metrics[key].items()]
        )
    if task == "pope":
        keys = ("accuracy", "precision", "recall", "f1", "yes_ratio", "invalid", "n")
        settings = [k for k, v in metrics.items() if isinstance(v, dict) and "tp" in v]
        lines += ["", "## By POPE setting", ""]
        lines += markdown_table(["setting", *keys], [(s, *(metrics[s][k] for k in keys)) for s in settings])
    if task == "classify":
        per = metrics["per_class"]
        lines += ["", "## Per class", ""]
        lines += markdown_table(
            ["label", "precision", "recall", "f1", "support"],
            [(lab, v["precision"], v["recall"], v["f1"], v["support"]) for lab, v in per.items()],
        )
    return lines


def write_report(
    out_dir: str | Path,
    task: str,
    metrics: dict,
    rows: Sequence[dict],
    image_root: str | Path | None = None,
    info: dict | None = None,
    image_loader: Callable[[str], object] | None = None,
) -> Path:
    """Write metrics.json, report.md, grid.png (records with images) and confusion.png (classify)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(metrics, out / "metrics.json")
    lines = [f"# Evaluation: {task}", ""]
    lines += [f"- {k}: {v}" for k, v in (info or {}).items()]
    scalars = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    head = [(k, lookup(metrics, k)) for k in get_task(task).headline if "." in k]
    lines += ["", "## Metrics", ""] + markdown_table(["metric", "value"], head + scalars)
    if "vqa_scoring" in metrics:
        lines.append(f"\nVQA scoring: {metrics['vqa_scoring']} ({VQA_SCORING_NOTES[metrics['vqa_scoring']]})")
    for note in metrics.get("notes", []):
        lines.append(f"\nNote: {note}")
    lines += _detail_tables(task, metrics)
    if task == "classify":
        save_confusion_png(metrics["confusion"], out / "confusion.png", title=f"{task}: confusion matrix")
        lines += ["", "## Confusion matrix", "", "![confusion matrix](confusion.png)"]
    grid = sample_grid(rows, image_root, out / "grid.png", image_loader=image_loader)
    lines += ["", "## Samples", ""]
    lines.append(
        "![samples: green right, red wrong, grey scored](grid.png)" if grid else "(no images in this task)"
    )
    lines += _failure_lines(rows)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _failure_lines(rows: Sequence[dict]) -> list[str]:
    failed = [r for r in rows if r.get("error")]
    lines = ["", f"## Failures ({len(failed)})", ""]
    if not failed:
        return lines + ["None."]
    lines += [f"- `{r['id']}`: {r['error']}" for r in failed[:MAX_LISTED_FAILURES]]
    if len(failed) > MAX_LISTED_FAILURES:
        lines.append(f"- ... and {len(failed) - MAX_LISTED_FAILURES} more (all in predictions.jsonl)")
    return lines


def headline(name: str, metrics: dict) -> tuple[str, ...]:
    """The metric keys a suite table shows for its entry `name`: the entry's own `headline` list (an
    extension's entry that is not named after a task, e.g. one task on another file), else its task's."""
    if isinstance(metrics.get("headline"), list):
        return tuple(metrics["headline"])
    return get_task(name).headline


def suite_table(results: dict) -> str:
    """A markdown table: one row per task (or suite entry) and headline metric, one column per split."""
    splits = [s for s in results if s != "text"]
    tasks = sorted({t for s in splits for t in results[s]})
    rows = []
    for task in tasks:
        first = next(results[s][task] for s in splits if task in results[s])
        for key in headline(task, first):
            rows.append((task, key, *(lookup(results[s].get(task, {}), key) for s in splits)))
    lines = markdown_table(["task", "metric", *splits], rows)
    if "text" in results:  # one built-in set, the same for every split
        lines.append(f"\ntext retention set (split-independent): accuracy {results['text']['accuracy']:.4f}")
    return "\n".join(lines)


def write_suite_report(out_dir: str | Path, results: dict, suite: str, info: dict | None = None) -> Path:
    """Top-level metrics.json and report.md of an evaluation suite, comparing its splits and linking each
    task's own report. `suite` names a registered suite (`vistune.extensions.register_suite`): its title
    heads the report and its report sections follow the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(results, out / "metrics.json")
    extensions.load_extensions()
    part = extensions.SUITES.get(suite)
    lines = [f"# Evaluation suite: {part.title if part else suite}", ""]
    lines += [f"- {k}: {v}" for k, v in (info or {}).items()]
    lines += ["", suite_table(results)]
    for section in extensions.REPORT_SECTIONS.get(suite, []):
        lines += ["", *extensions.resolve(section)(results)]
    lines += ["", "## Per-task reports", ""]
    for split, tasks in results.items():
        if split == "text":
            lines.append("- text (split-independent): [report](text/report.md)")
            continue
        lines += [f"- {split} / {task}: [report]({split}/{task}/report.md)" for task in tasks]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
