"""The shapes suite: every evaluation task on the shapes world's test, compositional and shifted splits.

`run_suite` runs VQA, captioning, POPE and classification on each split (and the built-in text set
once), writes each task's report and one report comparing the splits. The compositional split asks
about unseen colour+shape pairs; the shifted split draws unseen canvases and backgrounds and words its
questions in unseen ways. `vistune eval MODEL --suite shapes --data DIR` runs it from the command line.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from vistune.eval import report
from vistune.eval.command import positive_int
from vistune.eval.loaders import load_llava
from vistune.eval.run import Predictor, run_eval
from vistune.eval.tasks import get_task
from vistune.eval.text_bench import text_records
from vistune.infer.generate import load_generator

SUITE_SPLITS = ("test", "compositional", "shifted")
SHAPES_FILES = {
    "vqa": "vqa.json",
    "caption": "captions.json",
    "pope": "pope.json",
    "classify": "classify.json",
}


def shapes_labels(data_dir: str | Path) -> list[str]:
    """The class names in SHAPES_DIR/manifest.json ('labels')."""
    path = Path(data_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    if not isinstance(manifest.get("labels"), list) or not manifest["labels"]:
        raise ValueError(f"{path}: field 'labels' must be a non-empty list")
    return [str(x) for x in manifest["labels"]]


def suite_splits(data_dir: str | Path) -> tuple[str, ...]:
    """The SUITE_SPLITS the dataset holds: a DIR/<split>/ folder, and not 0 images in manifest 'sizes'.

    Datasets written before the shifted split existed have no shifted folder, so they score as before.
    """
    data_dir = Path(data_dir)
    sizes = json.loads((data_dir / "manifest.json").read_text()).get("sizes") or {}
    splits = tuple(s for s in SUITE_SPLITS if (data_dir / s).is_dir() and sizes.get(s) != 0)
    if not splits:
        raise ValueError(f"{data_dir}: holds none of the splits {SUITE_SPLITS} (sizes: {sizes})")
    return splits


def run_suite(
    predictor: Predictor,
    data_dir: str | Path,
    out_dir: str | Path,
    splits: Sequence[str] | None = None,
    tasks: Sequence[str] = ("vqa", "caption", "pope", "classify", "text"),
    batch_size: int = 8,
    limit: int | None = None,
    image_loader: Callable[[str], object] | None = None,
    meteor: bool = True,
) -> dict:
    """Every task on each shapes-world split; returns {split: {task: metrics}, "text": metrics}.

    Writes OUT/<split>/<task>/ (each task's report), OUT/text/ and OUT/report.md comparing splits.
    `splits` defaults to the SUITE_SPLITS the dataset holds (`suite_splits`). `limit` caps records per
    file (for quick looks). The text task does not depend on the split.
    """
    data_dir, out = Path(data_dir), Path(out_dir)
    splits = suite_splits(data_dir) if splits is None else tuple(splits)
    labels = shapes_labels(data_dir) if "classify" in tasks else None
    results: dict = {}
    for split in splits:
        results[split] = {}
        for task in [t for t in tasks if t != "text"]:
            records = load_llava(data_dir / split / SHAPES_FILES[task])[:limit]
            results[split][task] = run_eval(
                predictor, records, task, out / split / task, image_root=data_dir / "images",
                info={"split": split, "data": str(data_dir / split / SHAPES_FILES[task])},
                image_loader=image_loader, batch_size=batch_size, labels=labels, meteor=meteor,
            )  # fmt: skip
    if "text" in tasks:
        results["text"] = run_eval(
            predictor, text_records()[:limit], "text", out / "text", batch_size=batch_size
        )
    report.write_suite_report(
        out, results, "shapes", info={"data": str(data_dir), "splits": ", ".join(splits)}
    )
    return results


def generalisation_gap(results: dict) -> list[str]:
    """The suite report's section: how far each headline figure of the test split falls on the splits of
    unseen colour-shape pairs (compositional) and of unseen styles and wordings (shifted)."""
    others = [s for s in ("compositional", "shifted") if s in results]
    if "test" not in results or not others:
        return []
    rows = []
    for task, metrics in results["test"].items():
        for key in get_task(task).headline:
            base = report.lookup(metrics, key)
            if not isinstance(base, (int, float)):
                continue
            drops = [report.lookup(results[s].get(task, {}), key) for s in others]
            rows.append((task, key, *(base - d if isinstance(d, (int, float)) else None for d in drops)))
    header = ["task", "metric", *(f"test - {s}" for s in others)]
    return ["## Generalisation gap", "", *report.markdown_table(header, rows)]


def main_suite(argv: list[str] | None = None) -> int:
    """`vistune eval MODEL --suite shapes --data DIR`: every task on the shapes world's scored splits."""
    p = argparse.ArgumentParser(prog="vistune eval --suite shapes", description=main_suite.__doc__)
    p.add_argument("model_dir", help="trained model directory")
    p.add_argument("--data", required=True, help="the shapes world directory (vistune data synth --out)")
    p.add_argument("--out", default="runs/eval", help="output directory (default runs/eval)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N records of each file")
    p.add_argument("--no-meteor", action="store_true", help="caption: skip METEOR (Java, ~7 s start-up)")
    a = p.parse_args(argv)
    if not (Path(a.data) / "manifest.json").is_file():
        raise ValueError(f"--data {a.data}: not a shapes world directory (no manifest.json)")
    predictor = load_generator(a.model_dir, batch_size=a.batch_size)
    results = run_suite(
        predictor, a.data, a.out, batch_size=a.batch_size, limit=a.limit, meteor=not a.no_meteor
    )
    print(report.suite_table(results))
    failed = [
        f"{split}/{task}"
        for split, tasks in results.items()
        if split != "text"
        for task, m in tasks.items()
        if m.get("n_records") and m.get("failures") == m.get("n_records")
    ]
    if failed:
        raise ValueError(f"every record of {', '.join(failed)} failed (see {a.out}/SPLIT/TASK/report.md)")
    return 0
