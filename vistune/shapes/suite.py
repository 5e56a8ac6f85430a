"""The shapes suite: every evaluation task on the shapes world's test, compositional and shifted splits.

`run_suite` runs on each split the suite's entries (ENTRIES): VQA on the six question types, the
relation and binding types of `relations.py` (also VQA), short captions, detailed descriptions (caption
metrics and scene-graph recall, `graph_recall.py`), follow-up conversations scored on their last turn
(`multiturn.py`, VQA grouped by the turn's kind), POPE and classification; and the built-in text set
once. It writes each entry's report and one report comparing the splits. The compositional split asks
about unseen colour+shape pairs; the shifted split draws unseen canvases and backgrounds and words its
questions in unseen ways. `vistune eval MODEL --suite shapes --data DIR` runs it from the command line.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vistune.data.records import Record
from vistune.eval import report
from vistune.eval.command import positive_int
from vistune.eval.loaders import LOAD_ERROR, load_llava
from vistune.eval.run import Predictor, evaluate, run_eval
from vistune.eval.text_bench import text_records
from vistune.infer.generate import load_generator
from vistune.shapes import questions as Q
from vistune.shapes import relations as R
from vistune.shapes.graph_recall import graph_recall, score_description
from vistune.shapes.scenes import load_scenes

SUITE_SPLITS = ("test", "compositional", "shifted")
DESCRIBE_TOKENS = 112  # a detailed description of six objects is about 70 tokens
FOLLOW_UP_TOKENS = 48  # "what else": up to five objects as a caption


@dataclass(frozen=True)
class Entry:
    """What the suite scores under one name on each split: a task on a file of the split, the question
    types it keeps (vqa.json holds two groups), its generation budget and, for an entry not named after
    its task, the metrics its table row shows."""

    file: str
    task: str
    types: tuple[str, ...] | None = None
    max_new_tokens: int | None = None
    headline: tuple[str, ...] | None = None


ENTRIES = {
    "vqa": Entry("vqa.json", "vqa", Q.QUESTION_TYPES),
    "relations": Entry("vqa.json", "vqa", R.RELATION_TYPES, headline=("accuracy",)),
    "caption": Entry("captions.json", "caption"),
    "detailed": Entry("detailed.json", "caption", None, DESCRIBE_TOKENS,
                      ("graph_recall", "graph_hallucination", "CIDEr")),
    "multiturn": Entry("multiturn.json", "vqa", None, FOLLOW_UP_TOKENS, ("accuracy",)),
    "pope": Entry("pope.json", "pope"),
    "classify": Entry("classify.json", "classify"),
}  # fmt: skip
SHAPES_FILES = {name: entry.file for name, entry in ENTRIES.items()}
# Entries that datasets written before them lack (no file, or no records of their types): the default
# suite skips them there, so older datasets score as before; named explicitly, they are required.
NEWER = ("relations", "multiturn")


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


def entry_records(data_dir: Path, split: str, name: str, limit: int | None) -> list[Record]:
    """The first `limit` records of entry `name` on `split` (a malformed record is kept: it is scored
    as a failure)."""
    if name not in ENTRIES:
        raise ValueError(f"unknown shapes suite entry {name!r}; valid entries: {', '.join(ENTRIES)}, text")
    entry = ENTRIES[name]
    records = load_llava(data_dir / split / entry.file)
    if entry.types is not None:
        records = [r for r in records if r.meta.get("question_type") in entry.types or LOAD_ERROR in r.meta]
    return records[:limit]


def run_entry(
    predictor: Predictor, data_dir: str | Path, out_dir: str | Path, split: str, name: str,
    limit: int | None = None, **kwargs,
) -> dict | None:  # fmt: skip
    """Score entry `name` (one of ENTRIES) on `split`, writing OUT/<split>/<name>/; None when the entry is
    one of NEWER and the dataset predates it. kwargs: `run_eval`'s (batch_size, labels, meteor,
    image_loader)."""
    data_dir, entry = Path(data_dir), ENTRIES.get(name)
    if entry and name in NEWER and not (data_dir / split / entry.file).is_file():
        return None
    records = entry_records(data_dir, split, name, limit)
    if not records and name in NEWER:
        return None
    out = Path(out_dir) / split / name
    info = {"split": split, "data": str(data_dir / split / entry.file)}
    kwargs |= {"image_root": data_dir / "images", "max_new_tokens": entry.max_new_tokens}
    if name == "detailed":
        scenes = {s["image"]: s for s in load_scenes(data_dir / "scenes" / f"{split}.jsonl")}
        metrics = score_descriptions(predictor, records, scenes, out, info, **kwargs)
    else:
        metrics = run_eval(predictor, records, entry.task, out, info=info, **kwargs)
    if entry.headline:
        metrics["headline"] = list(entry.headline)
    return metrics


def score_descriptions(
    predictor: Predictor, records: list[Record], scenes: dict[str, dict], out: Path, info: dict, **kwargs
) -> dict:
    """Detailed descriptions: caption metrics against the reference description, and scene-graph recall
    against the image's scene (`graph_recall`: graph_recall, graph_hallucination, graph_size_recall,
    graph_exact); writes OUT/predictions.jsonl (each row with its `graph` counts) and the report."""
    rows, metrics = evaluate(predictor, records, "caption", **kwargs)
    pairs = []
    for row in rows:
        scene = scenes.get(row["images"][0]) if row["images"] else None
        if scene is None:
            raise ValueError(f"record {row['id']!r}: no scene graph for image {row['images'][:1]} in scenes/")
        text = "" if row.get("error") else row["answer"]
        row["graph"] = score_description(text, scene)
        pairs.append((text, scene))
    graph = graph_recall(pairs)
    metrics |= {f"graph_{k}": graph[k] for k in ("recall", "hallucination", "size_recall", "exact")}
    metrics["graph"] = graph
    out.mkdir(parents=True, exist_ok=True)
    report.write_predictions(rows, out / "predictions.jsonl")
    image_root, loader = kwargs.get("image_root"), kwargs.get("image_loader")
    report.write_report(out, "caption", metrics, rows, image_root=image_root, info=info, image_loader=loader)
    return metrics


def run_suite(
    predictor: Predictor,
    data_dir: str | Path,
    out_dir: str | Path,
    splits: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    image_loader: Callable[[str], object] | None = None,
    meteor: bool = True,
    limits: Mapping[str, int] | None = None,
) -> dict:
    """Every entry on each shapes-world split; returns {split: {entry: metrics}, "text": metrics}.

    Writes OUT/<split>/<entry>/ (each entry's report), OUT/text/ and OUT/report.md comparing splits.
    `splits` defaults to the SUITE_SPLITS the dataset holds (`suite_splits`); `tasks` to every entry
    (ENTRIES, then "text"), skipping the NEWER ones a dataset predates. `limit` caps records per entry
    (for quick looks), `limits` per entry name. The text task does not depend on the split.
    """
    data_dir, out = Path(data_dir), Path(out_dir)
    splits = suite_splits(data_dir) if splits is None else tuple(splits)
    names = list(tasks) if tasks is not None else [*ENTRIES, "text"]
    labels = shapes_labels(data_dir) if "classify" in names else None
    results: dict = {}
    for split in splits:
        results[split] = {}
        for name in [t for t in names if t != "text"]:
            explicit = tasks is not None and name in NEWER
            metrics = run_entry(
                predictor, data_dir, out, split, name, (limits or {}).get(name, limit), batch_size=batch_size,
                image_loader=image_loader, labels=labels, meteor=meteor,
            )  # fmt: skip
            if metrics is None and explicit:
                raise ValueError(f"{data_dir / split}: no {name} records (a dataset older than them?)")
            if metrics is not None:
                results[split][name] = metrics
    if "text" in names:
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
        for key in report.headline(task, metrics):
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
