"""`vistune quickstart`: the whole recipe on the embedded default, from a fresh clone, offline.

1. generate the shapes world (skipped when OUT/data is already complete);
2. train the profile's recipe (`configs/quickstart.yaml` on a CPU, `configs/quickstart_gpu.yaml` on a
   CUDA device, printed first): a from-scratch ResNet pretrained on scene graphs (no LLM), then
   LoRA on SmolLM2-135M-Instruct tuned on conversations and VQA, reading each image through the
   object_words projector as "small red star 3 7, ...";
3. evaluate VQA on the held-out test split, the compositional split (unseen colour+shape pairs) and the
   shifted split (unseen canvases, backgrounds and wordings): the six question types and the relation
   and binding types; on the test split POPE, short captions (CIDEr, BLEU-4), detailed descriptions
   (scene-graph recall and the share of named objects that do not exist) and follow-up conversations;
   and plain-text questions against the base SmolLM2; print a table and example answers.

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

import torch

from vistune.commands.train import train
from vistune.config import load_config
from vistune.eval.loaders import load_llava
from vistune.eval.report import write_suite_report
from vistune.eval.run import run_eval
from vistune.eval.text_bench import retention, text_records
from vistune.infer.generate import load_generator
from vistune.infer.replay import write_replay
from vistune.shapes.suite import SHAPES_FILES, run_entry, run_suite
from vistune.shapes.synth import synthesize

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# The same command on any machine: the 2-core CPU recipe, or on a CUDA device larger batches and more steps.
PROFILES = {"cpu": CONFIGS / "quickstart.yaml", "gpu": CONFIGS / "quickstart_gpu.yaml"}
REPLAY = "train/text_replay.json"  # the base LLM's answers to plain-text prompts (the recipes train on it)
RECIPE = PROFILES["cpu"]  # the recipe the CPU benchmarks measure
SPLITS = {"train": 8000, "val": 200, "test": 500, "compositional": 500, "shifted": 500}
EVAL_SPLITS = ("test", "compositional", "shifted")  # scored, each the size of test
# Records scored on the test split only, per entry of the shapes suite (generation is the slow part:
# a description is ~70 tokens); relations are scored on every split, `--extra-limit` of them.
TEST_ONLY = {"caption": 50, "detailed": 100, "multiturn": 200}


def make_data(data_dir: Path, sizes: dict[str, int], seed: int, base: str) -> None:
    """Synthesize the shapes world and the base LLM's text replay (`infer/replay.py`) into a temporary dir and
    rename it into place, so a half-written dataset never counts."""
    if (data_dir / "manifest.json").is_file():
        print(f"data: reusing {data_dir}")
        return
    tmp = data_dir.with_name(data_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"data: generating the shapes world ({sizes}) into {data_dir}", flush=True)
    start = time.perf_counter()
    synthesize(tmp, sizes=sizes, seed=seed, workers=min(2, os.cpu_count() or 1))
    replayed = write_replay(tmp / REPLAY, base)
    os.replace(tmp, data_dir)
    seconds = time.perf_counter() - start
    print(
        f"data: {sum(sizes.values())} images, {replayed} text replay records in {seconds:.1f} s", flush=True
    )


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
    parser.add_argument(
        "--profile",
        choices=("auto", *PROFILES),
        default="auto",
        help="recipe: auto picks gpu on a CUDA device",
    )
    parser.add_argument("--config", help="a recipe of your own (instead of the profile's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    parser.add_argument("--train-images", type=int, default=SPLITS["train"])
    parser.add_argument("--test-images", type=int, default=SPLITS["test"], help="images per scored split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    parser.add_argument("--eval-limit", type=int, default=500, help="VQA questions per split (0: all)")
    parser.add_argument(
        "--extra-limit", type=int, default=150,
        help="relation and binding questions per split (0: all)",
    )  # fmt: skip
    parser.add_argument(
        "--describe-limit", type=int, default=TEST_ONLY["detailed"],
        help="detailed descriptions scored on the test split (0: all); captions: half as many",
    )  # fmt: skip
    parser.add_argument(
        "--base",
        default="smollm2",
        help="the base LLM: it writes the text replay and is compared on plain text",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    started = time.perf_counter()
    sizes = SPLITS | {"train": args.train_images} | {split: args.test_images for split in EVAL_SPLITS}
    make_data(out / "data", sizes, args.seed, args.base)
    data_time = time.perf_counter() - started
    profile = "custom" if args.config else pick_profile(args.profile)
    recipe = Path(args.config) if args.config else PROFILES[profile]
    print(f"profile: {profile} ({recipe}; {device_name()})", flush=True)
    cfg = load_config(recipe, [f"data_root={out / 'data'}", f"out={out}", *args.set])
    model_dir = train(cfg, resume=True)
    train_time = time.perf_counter() - started - data_time
    limits = {
        "vqa": args.eval_limit or None,
        "relations": args.extra_limit or None,
        "detailed": args.describe_limit or None,
        "caption": (args.describe_limit + 1) // 2 or None,
        "multiturn": TEST_ONLY["multiturn"],
    }
    results = evaluate(model_dir, out / "data", out / "eval", args.batch_size, limits, args.base)
    summary = {
        "seconds": {"data": round(data_time, 1), "train": round(train_time, 1),
                    "eval": round(time.perf_counter() - started - data_time - train_time, 1),
                    "total": round(time.perf_counter() - started, 1)},
        "profile": profile,
        "device": device_name(),
        "vqa": {split: results[split]["vqa"] for split in EVAL_SPLITS},
        "relations": {split: results[split].get("relations") for split in EVAL_SPLITS},
        "describe": {name: results["test"].get(name) for name in TEST_ONLY},
        "pope": results["pope"],
        "text": results["text"],
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


def pick_profile(asked: str) -> str:
    """The profile to run: as asked, or for `auto` gpu where CUDA is available and cpu elsewhere."""
    if asked != "auto":
        return asked
    return "gpu" if torch.cuda.is_available() else "cpu"


def device_name() -> str:
    """What the run trains on, for the report."""
    if torch.cuda.is_available():
        return f"CUDA: {torch.cuda.get_device_name(0)}"
    return f"CPU: {os.cpu_count()} cores"


def evaluate(
    model_dir: Path, data_dir: Path, eval_dir: Path, batch_size: int, limits: dict, base_llm: str
) -> dict:
    """The shapes suite's VQA entries on EVAL_SPLITS (`limits[name]` records each: vqa, relations), and on
    the test split POPE (`limits["vqa"]` probes), captions, detailed descriptions and follow-up
    conversations (TEST_ONLY), with reports; and the built-in text questions, asked of the model and
    of its base LLM (what visual instruction tuning kept of the LLM's plain-text skills)."""
    predictor = load_generator(str(model_dir), batch_size=batch_size)
    results = run_suite(
        predictor, data_dir, eval_dir, EVAL_SPLITS, tasks=("vqa", "relations"), batch_size=batch_size,
        limits=limits,
    )  # fmt: skip
    for name in TEST_ONLY:  # METEOR (a Java start-up) is left to `vistune eval --suite shapes`
        results["test"][name] = run_entry(
            predictor, data_dir, eval_dir, "test", name, limits[name], batch_size=batch_size, meteor=False
        )
    info = {"data": str(data_dir), "splits": ", ".join(EVAL_SPLITS)}
    write_suite_report(eval_dir, results, "shapes", info=info)
    probes = load_llava(data_dir / "test" / SHAPES_FILES["pope"])[: limits["vqa"]]
    results["pope"] = run_eval(
        predictor, probes, "pope", eval_dir / "test" / "pope", image_root=data_dir / "images",
        info={"split": "test"}, batch_size=batch_size,
    )  # fmt: skip
    questions = text_records()
    text = run_eval(predictor, questions, "text", eval_dir / "text", batch_size=batch_size)
    del predictor
    base = load_generator(base_llm, batch_size=batch_size)
    base_text = run_eval(base, questions, "text", eval_dir / "text" / "base", info={"model": base_llm},
                         batch_size=batch_size)  # fmt: skip
    results["text"] = retention(text, base_text) | {"base": base_llm}
    return results


def print_summary(summary: dict, out: Path) -> None:
    """The accuracy table by question type, descriptions and follow-ups, and a few example answers."""
    vqa, relations = summary["vqa"], summary.get("relations") or {}
    widths = [max(8, len(split) + 2) for split in EVAL_SPLITS]

    def row(label: str, cells: list) -> None:
        print(f"{label:<16}" + "".join(_cell(c, w) for c, w in zip(cells, widths, strict=True)))

    print("\nexact-match accuracy on held-out single-turn VQA")
    print(f"{'question type':<16}" + "".join(f"{s:>{w}}" for s, w in zip(EVAL_SPLITS, widths, strict=True)))
    for qtype in sorted(vqa["test"].get("by_question_type", {})):
        row(qtype, [vqa[s]["by_question_type"].get(qtype, {}).get("accuracy") for s in EVAL_SPLITS])
    row("all", [vqa[s]["exact_match"] for s in EVAL_SPLITS])
    if relations.get("test"):
        print("relating objects and binding colour to shape:")
        for qtype in sorted(relations["test"].get("by_question_type", {})):
            groups = [(relations.get(s) or {}).get("by_question_type") or {} for s in EVAL_SPLITS]
            row(qtype, [g.get(qtype, {}).get("accuracy") for g in groups])
        row("all relations", [(relations.get(s) or {}).get("exact_match") for s in EVAL_SPLITS])
    pope, text = summary["pope"]["overall"], summary["text"]
    print(
        f"\nPOPE (test, {pope['n']} probes): F1 {pope['f1']:.3f}, precision {pope['precision']:.3f}, "
        f"recall {pope['recall']:.3f}, yes ratio {pope['yes_ratio']:.2f}"
    )
    _print_describe(summary.get("describe") or {})
    print(
        f"plain-text questions: model {text['model_accuracy']:.3f}, "
        f"base {text['base']} {text['base_accuracy']:.3f} (retained {_ratio(text['retention'])})"
    )
    print("\nexamples (test split):")
    for example in examples(out / "eval"):
        question = example["prompt"].replace("<image>", "").strip().splitlines()[0]
        print(f"  [{'ok ' if example.get('correct') else 'bad'}] {question}")
        print(f"        model: {example['answer']!r}   reference: {example['references'][0]!r}")
    print(f"\ntimes (s): {summary['seconds']}; peak memory {summary['peak_memory_gb']} GB; run dir: {out}")


def _print_describe(describe: dict) -> None:
    """The test split's captions, detailed descriptions and follow-up conversations, one line each."""
    caption, detailed, follow = (describe.get(k) for k in ("caption", "detailed", "multiturn"))
    if caption:
        print(
            f"captions (test, {caption['n_records']}): CIDEr {caption['CIDEr']:.3f}, "
            f"BLEU-4 {caption['BLEU-4']:.3f}"
        )
    if detailed:
        print(
            f"detailed descriptions (test, {detailed['n_records']}): scene-graph recall "
            f"{detailed['graph_recall']:.3f}, named objects that do not exist "
            f"{detailed['graph_hallucination']:.3f}, "
            f"right size too {detailed['graph_size_recall']:.3f}, CIDEr {detailed['CIDEr']:.3f}, "
            f"BLEU-4 {detailed['BLEU-4']:.3f}"
        )
    if follow:
        kinds = ", ".join(f"{k} {m['accuracy']:.3f}" for k, m in follow["by_question_type"].items())
        print(f"follow-up turns (test, {follow['n_records']}): {follow['exact_match']:.3f} ({kinds})")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _cell(value: float | None, width: int) -> str:
    return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"
