"""How faithful the relevance maps are, on the shapes world, whose scene graphs say where every object is.

    python benchmarks/explain_faithfulness.py MODEL DATA_DIR [--per-type 25] [--methods gradient,occlusion]

MODEL is a vistune model dir (the quickstart's `runs/quickstart/model`), DATA_DIR the shapes world it was
trained on (`runs/quickstart/data`). From the test split's VQA, questions about one object are taken:
colour, shape and size questions (they name one object), and existence questions answered yes by exactly
one object; `--per-type` of each type, the first in file order. For each, the model's own greedy answer
(or `--answer truth`: the right one) is explained by each method, and:

- pointing game: the map's most relevant cell overlaps the asked object's box (its circumcircle's square
  from the scene graph): "hit"; "centre": the cell's centre lies inside the box (stricter); "|hit|": the
  cell of the largest magnitude, support or not, overlaps it;
- deletion curve: the image's cells are filled with its median colour, most relevant first, in
  `--points` steps; P(answer) after each, relative to before; against the same with the cells in a
  random order. The areas under the curves (fraction of cells 0..1) and their difference, random minus
  the map's ("between"; positive: the answer's probability falls faster than at random);
- cost: seconds per map (wall clock, and the process's CPU seconds), with the torch thread count.

Prints one table per method and question type, and writes everything (per record too) to `--json`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from vistune.data.images import load_image
from vistune.data.records import Turn
from vistune.infer.explain import METHODS, Explainer, cell_box
from vistune.infer.generate import load_generator
from vistune.shapes.questions import find
from vistune.shapes.scenes import load_scenes

TYPES = ("color", "shape", "size", "exists")


def asked_object(record: dict, scene: dict) -> dict | None:
    """The one object a question is about, or None (an existence question answered no, or by several)."""
    qtype, params = record.get("question_type"), record.get("params", {})
    if qtype in ("color", "shape", "size"):
        found = find(scene, params["target"])
    elif qtype == "exists":
        found = find(scene, params["filter"])
    else:
        return None
    return found[0] if len(found) == 1 else None


def object_box(obj: dict, scene: dict, side: int) -> tuple[float, float, float, float]:
    """The object's circumcircle's square in the tower's square input of `side` pixels (square images)."""
    scale = side / max(scene["width"], scene["height"])
    r = obj["radius"]
    return ((obj["x"] - r) * scale, (obj["y"] - r) * scale, (obj["x"] + r) * scale, (obj["y"] + r) * scale)


def pointing(grid: np.ndarray, box: tuple[float, float, float, float], side: int) -> tuple[bool, bool]:
    """(the peak cell overlaps the box, the peak cell's centre lies in it)."""
    row, col = np.unravel_index(int(np.argmax(grid)), grid.shape)
    return _in_box(int(row), int(col), grid.shape, box, side)


def _in_box(row: int, col: int, grid: tuple[int, int], box: tuple, side: int) -> tuple[bool, bool]:
    x0, y0, x1, y1 = cell_box(side, grid, row, col)
    overlap = x0 < box[2] and box[0] < x1 and y0 < box[3] and box[1] < y1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return bool(overlap), bool(box[0] <= cx <= box[2] and box[1] <= cy <= box[3])


def area(curve: np.ndarray) -> float:
    """The area under a deletion curve, relative to its start (P(answer) after filling / before), over
    the fraction of cells filled (0..1), trapezoids: 1 when filling never lowers the probability."""
    return float(np.trapezoid(curve / curve[0], dx=1.0 / (len(curve) - 1)))


def select(data_dir: Path, per_type: int, skip: int = 0) -> list[tuple[dict, dict, dict]]:
    """(record, scene, asked object) for the first `per_type` single-object questions of each type, after
    the first `skip` of each (to measure more in another run)."""
    records = json.loads((data_dir / "test" / "vqa.json").read_text(encoding="utf-8"))
    scenes = {s["image"]: s for s in load_scenes(data_dir / "scenes" / "test.jsonl")}
    taken: dict[str, list] = defaultdict(list)
    for record in records:
        qtype, scene = record.get("question_type"), scenes.get(record["image"])
        if qtype not in TYPES or scene is None or len(taken[qtype]) >= skip + per_type:
            continue
        obj = asked_object(record, scene)
        if obj is not None and (qtype != "exists" or record["answer"] == "yes"):
            taken[qtype].append((record, scene, obj))
    return [item for qtype in TYPES for item in taken[qtype][skip:]]


def measure(explainer: Explainer, item: tuple, image_root: Path, args: argparse.Namespace, rng) -> dict:
    """Maps, pointing and deletion curves of every method for one record."""
    record, scene, obj = item
    question = record["conversations"][0]["value"]
    turns = [Turn("user", question if "<image>" in question else f"<image>\n{question}", 1)]
    image = load_image(image_root / record["image"])
    truth = record["answer"]
    answer = truth if args.answer == "truth" else explainer.generator.generate([turns], [[image]], 8)[0]
    side = explainer.tower.image_size
    box = object_box(obj, scene, side)
    case = explainer.prepare(turns, [image], answer)
    h, w = explainer.tower.grid
    random_order = rng.permutation(h * w)
    row = {"id": record["id"], "type": record["question_type"], "answer": answer, "truth": truth,
           "correct": answer.strip().lower() == truth.lower(), "box": [round(v, 2) for v in box],
           "random_curve": explainer.deletion_curve(case, np.zeros((h, w)), points=args.points,
                                                    order=random_order).tolist()}  # fmt: skip
    for method in args.methods:
        cpu = time.process_time()
        found = explainer.explain(turns, [image], answer, method)
        cpu = time.process_time() - cpu
        hit, centre = pointing(found.maps[0], box, side)
        magnitude, _ = pointing(np.abs(found.maps[0]), box, side)
        curve = explainer.deletion_curve(case, found.maps[0], points=args.points)
        row[method] = {"hit": hit, "centre": centre, "abs_hit": magnitude, "seconds": found.seconds,
                       "cpu_seconds": cpu, "peak": list(found.peak(0)), "curve": curve.tolist(),
                       "map": np.round(found.maps[0], 5).tolist()}  # fmt: skip
    return row


def table(rows: list[dict], methods: list[str]) -> str:
    """Per method and question type: pointing (hit, centre), deletion areas, seconds per map."""
    lines = [
        f"{'method':<11} {'type':<7} {'n':>3} {'acc':>5} {'hit':>5} {'centre':>6} {'|hit|':>5} {'auc':>6} "
        f"{'random':>6} "
        f"{'between':>7} {'s/map':>6} {'cpu s':>6}"
    ]
    for method in methods:
        for qtype in (*TYPES, "all"):
            group = [r for r in rows if qtype in ("all", r["type"])]
            if not group:
                continue
            auc = np.mean([area(np.array(r[method]["curve"])) for r in group])
            rand = np.mean([area(np.array(r["random_curve"])) for r in group])
            lines.append(
                f"{method:<11} {qtype:<7} {len(group):>3} {np.mean([r['correct'] for r in group]):>5.2f} "
                f"{np.mean([r[method]['hit'] for r in group]):>5.2f} "
                f"{np.mean([r[method]['centre'] for r in group]):>6.2f} "
                f"{np.mean([r[method].get('abs_hit', np.nan) for r in group]):>5.2f} "
                f"{auc:>6.3f} {rand:>6.3f} "
                f"{rand - auc:>7.3f} {np.mean([r[method]['seconds'] for r in group]):>6.2f} "
                f"{np.mean([r[method]['cpu_seconds'] for r in group]):>6.2f}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model")
    parser.add_argument("data_dir")
    parser.add_argument("--per-type", type=int, default=25, help="questions per type (default: 25)")
    parser.add_argument("--skip", type=int, default=0, help="of each type, after the first SKIP (default: 0)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    parser.add_argument(
        "--answer", choices=["model", "truth"], default="model", help="which answer to explain"
    )
    parser.add_argument("--points", type=int, default=8, help="deletion curve steps (default: 8)")
    parser.add_argument("--steps", type=int, default=16, help="integrated gradients' steps (default: 16)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="of the random deletion orders")
    parser.add_argument("--json", help="write every figure, per record too, here")
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: {unknown} are not among {list(METHODS)}")
    data_dir = Path(args.data_dir)
    explainer = Explainer(load_generator(args.model, batch_size=1, device="cpu"), args.batch_size, args.steps)
    items = select(data_dir, args.per_type, args.skip)
    rng = np.random.default_rng(args.seed)
    rows = []
    for k, item in enumerate(items, 1):
        rows.append(measure(explainer, item, data_dir / "images", args, rng))
        print(f"[{k}/{len(items)}] {rows[-1]['id']} {rows[-1]['type']}: {rows[-1]['answer']!r}", flush=True)
        if args.json:  # after every record: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    text = table(rows, args.methods)
    print(f"\n{len(rows)} questions; torch threads {torch.get_num_threads()}; answers: {args.answer}\n{text}")


if __name__ == "__main__":
    main()
