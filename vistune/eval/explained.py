"""`vistune eval --explain N`: relevance maps of the model's answers for N sampled records, in the report.

Records with images whose answer came back without error are sampled (seeded); each answer, as the model
gave it, is mapped over its images (`vistune.infer.explain`), written to OUT/explain/ (overlay PNG, grid
.npy, JSON per record), listed in OUT/explain/index.json and shown in a section of report.md.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

from vistune.data.images import load_image
from vistune.data.records import Record
from vistune.eval import report
from vistune.eval.paths import image_path
from vistune.eval.tasks import get_task
from vistune.infer.explain import Explainer
from vistune.infer.generate import Generator


def explain_answers(
    generator: Generator,
    records: Sequence[Record],
    task: str,
    out_dir: str | Path,
    n: int,
    image_root: str | Path | None = None,
    method: str = "gradient",
    labels: Sequence[str] | None = None,
    seed: int = 0,
) -> list[dict]:
    """Maps of the answers in OUT/predictions.jsonl for `n` sampled records with images; returns what
    index.json lists (id, answer, correct, peak cell, seconds, files) and adds a report.md section."""
    out = Path(out_dir)
    rows = report.read_predictions(out / "predictions.jsonl")
    by_id = {record.id: record for record in records}
    spec = get_task(task)
    candidates = [r for r in rows if r["images"] and not r.get("error") and r["answer"] and r["id"] in by_id]
    chosen = random.Random(seed).sample(candidates, min(n, len(candidates)))
    explainer = Explainer(generator)
    entries = []
    for k, row in enumerate(chosen):
        turns = spec.prompt(by_id[row["id"]], labels)
        images = [load_image(image_path(image_root, p)) for p in row["images"]]
        found = explainer.explain(turns, images, row["answer"], method)
        stem = f"{k:03d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', row['id'])[:60]}"
        found.save(out / "explain", stem)
        entries.append({
            "id": row["id"], "answer": row["answer"], "references": row["references"],
            "correct": row.get("correct"), "method": method, "peaks": [list(found.peak(i)) for i in
            range(len(found.maps))], "seconds": round(found.seconds, 3),
            "overlays": [f"explain/{stem}-{i}.png" for i in range(len(found.maps))],
        })  # fmt: skip
    (out / "explain").mkdir(parents=True, exist_ok=True)
    (out / "explain" / "index.json").write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    _report_section(out / "report.md", entries, method, len(candidates))
    return entries


def _report_section(path: Path, entries: list[dict], method: str, pool: int) -> None:
    """Append the maps to report.md: one line per record, its overlays as images."""
    lines = [
        f"\n## Where the answers came from ({method})\n",
        f"{len(entries)} of {pool} answered records with images, sampled; red: the regions that made the "
        "answer more likely, blue: less likely (`vistune explain`, docs/explain.md).\n",
    ]
    for e in entries:
        mark = {True: "right", False: "wrong"}.get(e["correct"], "unscored")
        lines.append(f"- `{e['id']}`: {e['answer']!r} ({mark}; expected {e['references'][:1]})\n")
        lines += [f"  ![map of {e['id']}]({png})\n" for png in e["overlays"]]
    with path.open("a", encoding="utf-8") as f:
        f.writelines(lines)
