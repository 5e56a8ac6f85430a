"""`vistune quickstart`: the whole recipe on the embedded default, from a fresh clone, offline.

1. generate the shapes world (skipped when OUT/data is already complete);
2. train `configs/quickstart.yaml`: a from-scratch ResNet pretrained on scene graphs (no LLM), then
   LoRA on SmolLM2-135M-Instruct tuned on conversations and VQA, reading each image through the
   object_words projector as "small red star 3 7, ...";
3. evaluate on the held-out test split and the compositional split, print a table and example answers.

Everything lands in OUT: data/, model/ (loadable by `vistune chat` and `vistune eval`), metrics.jsonl,
loss.png, eval/ (reports, predictions, sample grids) and quickstart.json (the figures and timings).
Stopping and re-running the same command resumes from the last complete checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path

from vistune.config import load_config
from vistune.infer.generate import load_generator
from vistune.shapes.suite import run_suite
from vistune.shapes.synth import synthesize
from vistune.train.run import train

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
SPLITS = {"train": 8000, "val": 200, "test": 500, "compositional": 500}


def make_data(data_dir: Path, sizes: dict[str, int], seed: int) -> None:
    """Synthesize into a temporary dir and rename it into place, so a half-written dataset never counts."""
    if (data_dir / "manifest.json").is_file():
        print(f"data: reusing {data_dir}")
        return
    tmp = data_dir.with_name(data_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"data: generating the shapes world ({sizes}) into {data_dir}", flush=True)
    start = time.perf_counter()
    synthesize(tmp, sizes=sizes, seed=seed, workers=min(2, os.cpu_count() or 1))
    os.replace(tmp, data_dir)
    print(f"data: {sum(sizes.values())} images in {time.perf_counter() - start:.1f} s", flush=True)


def examples(eval_dir: Path, n: int = 6) -> list[dict]:
    """A few test-split predictions (question, answer, reference) to print."""
    path = eval_dir / "test" / "vqa" / "predictions.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    step = max(1, len(rows) // n)
    return rows[::step][:n]


def main_quickstart(argv: list[str] | None = None) -> int:
    """Generate data, train the embedded default through all stages, evaluate, report."""
    parser = argparse.ArgumentParser(prog="vistune quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart", help="run directory")
    parser.add_argument("--config", default=str(RECIPE), help="recipe (default: configs/quickstart.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    parser.add_argument("--train-images", type=int, default=SPLITS["train"])
    parser.add_argument("--test-images", type=int, default=SPLITS["test"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    parser.add_argument("--eval-limit", type=int, default=500, help="VQA questions per split (0: all)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    started = time.perf_counter()
    sizes = SPLITS | {"train": args.train_images, "test": args.test_images, "compositional": args.test_images}
    make_data(out / "data", sizes, args.seed)
    data_time = time.perf_counter() - started
    cfg = load_config(args.config, [f"data_root={out / 'data'}", f"out={out}", *args.set])
    model_dir = train(cfg, resume=True)
    train_time = time.perf_counter() - started - data_time
    results = evaluate(model_dir, out / "data", out / "eval", args.batch_size, args.eval_limit or None)
    summary = {
        "seconds": {"data": round(data_time, 1), "train": round(train_time, 1),
                    "eval": round(time.perf_counter() - started - data_time - train_time, 1),
                    "total": round(time.perf_counter() - started, 1)},
        "vqa": {split: results[split]["vqa"] for split in ("test", "compositional")},
        "peak_memory_gb": round(peak_memory_gb(), 2),
        "model": str(model_dir),
    }  # fmt: skip
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print_summary(summary, out)
    return 0


def peak_memory_gb() -> float:
    """The largest resident memory of this process or any of its finished children (data workers), GB."""
    usage = (resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return max(usage) * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def evaluate(model_dir: Path, data_dir: Path, eval_dir: Path, batch_size: int, limit: int | None) -> dict:
    """VQA on the test and compositional splits (the first `limit` questions of each), with reports."""
    predictor = load_generator(str(model_dir), batch_size=batch_size)
    return run_suite(predictor, data_dir, eval_dir, tasks=("vqa",), batch_size=batch_size, limit=limit)


def print_summary(summary: dict, out: Path) -> None:
    """The accuracy table by question type, and a few example answers."""
    vqa = summary["vqa"]
    splits = ("test", "compositional")
    print("\nexact-match accuracy on held-out single-turn VQA")
    print(f"{'question type':<16}{'test':>8}{'compositional':>15}")
    for qtype in sorted(vqa["test"].get("by_question_type", {})):
        cells = [vqa[s]["by_question_type"].get(qtype, {}).get("accuracy") for s in splits]
        print(f"{qtype:<16}" + "".join(_cell(c, w) for c, w in zip(cells, (8, 15), strict=True)))
    print(
        f"{'all':<16}{_cell(vqa['test']['exact_match'], 8)}{_cell(vqa['compositional']['exact_match'], 15)}"
    )
    print("\nexamples (test split):")
    for row in examples(out / "eval"):
        question = row["prompt"].replace("<image>", "").strip().splitlines()[0]
        print(f"  [{'ok ' if row.get('correct') else 'bad'}] {question}")
        print(f"        model: {row['answer']!r}   reference: {row['references'][0]!r}")
    print(f"\ntimes (s): {summary['seconds']}; peak memory {summary['peak_memory_gb']} GB; run dir: {out}")


def _cell(value: float | None, width: int) -> str:
    return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"
