"""Every GPU claim in one run within a time budget; `--smoke` runs the same code on a CPU in a minute.

    python benchmarks/gpu_suite.py --budget-s 480 --out DIR        # on one CUDA device
    python benchmarks/gpu_suite.py --smoke [--out DIR]             # tiny models and data, any machine

In order, each part skipped (and said so) when its estimated time no longer fits the budget left:

1. quickstart: `vistune quickstart --profile gpu` (configs/quickstart_gpu.yaml) into DIR/quickstart
   (its data kept between runs, everything else trained afresh): seconds of the data, of each stage and
   of the evaluation; accuracy by question type on the test split.
2. throughput: the instruct stage of `benchmarks/train_throughput.py --baseline` (a CLIP tower, the
   `mlp2x_gelu` projector and SmolLM2-135M on the quickstart's instruct data), as a full fine-tune and
   with LoRA, through vistune's loop, plain and with each step option: `pack`, `workers: 2`,
   `compile` (torch.compile), `loss_chunk` (the LM head and cross-entropy in chunks), then all of them.
   Tokens/s over steps 1.. (step 0 warms up), MFU against the matmul peak measured here (bf16 on CUDA,
   fp32 on a CPU), the peak memory; and, for the plain full fine-tune, the ratio against transformers'
   `LlavaForConditionalGeneration` trained from the same weights on the same batches (and whether their
   losses agree).
3. generation: vistune's generator against `transformers.generate` on the LLaVA export of the same
   (untrained) model, greedy, on the test split's VQA questions (`benchmarks/export_parity.py`):
   records/s of each side and how many answers are identical.
4. serve: 16 streaming clients for 20 s against `vistune serve` of the quickstart's model
   (`benchmarks/serve_load.py`): requests/s, tokens/s, p50/p95 latency and time to first token.
5. syncs: host synchronisations inside a training step (`vistune.train.syncs`): on CUDA, the calls that
   `torch.cuda.set_sync_debug_mode("warn")` reports; on a CPU, the torch calls that would wait for a GPU.

It writes DIR/gpu_suite.md (the table) and DIR/gpu_suite.json (every figure), and prints the table. A
part that fails is reported as failed (with the error) and the others still run; the exit status is 1
if any failed. The goals are those of docs/performance.md; on a CPU (`--smoke`) they are not judged.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benchmarks, reused by import

import export_parity  # noqa: E402
import serve_load  # noqa: E402
import torch  # noqa: E402
import train_throughput as throughput  # noqa: E402

from vistune.config import ModelConfig, Stage, VisionConfig  # noqa: E402
from vistune.eval.loaders import load_llava  # noqa: E402
from vistune.interop.export import export_llava  # noqa: E402
from vistune.interop.llava import to_hf_llava  # noqa: E402
from vistune.model.vlm import build_vlm, save_vlm  # noqa: E402
from vistune.shapes import quickstart  # noqa: E402
from vistune.train.kinds import build_objective  # noqa: E402
from vistune.train.loop import make_accelerator, step_batches, train_step  # noqa: E402
from vistune.train.objective import StageContext  # noqa: E402
from vistune.train.syncs import sync_counter  # noqa: E402
from vistune.train.trainable import set_trainable  # noqa: E402

PARTS = ("quickstart", "throughput", "generation", "serve", "syncs")
# Rough seconds each unit takes on one H100 (the budget's guesses, not measurements); `--smoke` scales
# them by SMOKE_SCALE (its units take seconds), so its budget skips nothing unless set near 0.
ESTIMATE_S = {
    "quickstart": 150.0,
    "variant": 20.0,
    "compile": 90.0,
    "baseline": 40.0,
    "generation": 40.0,
    "serve": 45.0,
    "syncs": 20.0,
}
TRAIN = {"full": ["projector", "llm"], "lora": ["lora"]}
# (name, options, workers) of the throughput runs; "all" takes every option at once
LOSS_CHUNK = 1024  # answer rows per chunk of the LM head and cross-entropy
VARIANTS = [
    ("plain", {}, 0),
    ("pack", {"pack": True}, 0),
    ("workers", {}, 2),
    ("compile", {"compile": True}, 0),
    ("loss_chunk", {"loss_chunk": LOSS_CHUNK}, 0),
    ("all", {"pack": True, "compile": True, "loss_chunk": LOSS_CHUNK}, 2),
]
SMOKE_SCALE = 0.01
GOALS = {"quickstart_s": 60.0, "accuracy": 0.97, "mfu": 0.35, "baseline": 2.0, "generation": 1.5, "syncs": 0}


@dataclass
class Settings:
    """What differs between a GPU run and `--smoke`."""

    smoke: bool
    llm: str = "smollm2"  # the LLM of every part (`--smoke`: a tiny random Llama with SmolLM2's tokenizer)
    tower: VisionConfig = field(
        default_factory=lambda: VisionConfig(kind="clip", image_size=64, patch_size=8)
    )
    steps: int = 40  # throughput: optimizer steps per run (step 0 warms up)
    batch_size: int = 64
    compile_backend: str = "inductor"
    # compiled runs time from this step: a graph is compiled for each kind of batch the first time one
    # comes (with and without images), and the first steps may not hold every kind
    compile_warmup: int = 10
    quickstart_args: list[str] = field(default_factory=list)
    quickstart_set: list[str] = field(default_factory=list)
    generation: tuple[int, int, int] = (64, 8, 16)  # records, batch size, max new tokens
    serve: tuple[int, float, int] = (16, 20.0, 32)  # clients, seconds, max tokens
    sync_steps: int = 3
    variants: dict[str, list[str]] = field(
        default_factory=lambda: {m: [v[0] for v in VARIANTS] for m in TRAIN}
    )
    records: int | None = None  # throughput: at most this many records of each instruct dataset
    loss_chunk: int = LOSS_CHUNK


def smoke_settings(out: Path) -> Settings:
    """Tiny models and data: the same code paths in about a minute on a CPU."""
    llm = tiny_llm(out / "tiny-llm")
    tower = VisionConfig(
        kind="clip",
        image_size=16,
        patch_size=4,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        intermediate_size=32,
    )
    return Settings(
        smoke=True,
        llm=str(llm),
        tower=tower,
        steps=3,
        batch_size=4,
        compile_backend="eager",  # dynamo captures the graphs; no AOT tracing or code generation (seconds)
        quickstart_args=["--base", str(llm), "--eval-limit", "4", "--batch-size", "64"],
        quickstart_set=[
            f"model.llm.name_or_path={llm}",
            "model.vision.resnet_widths=[8,16]",
            "stages.0.max_steps=2",
            "stages.0.batch_size=8",
            "stages.0.workers=1",
            "stages.1.max_steps=2",
            "stages.1.batch_size=4",
            "stages.1.workers=1",
            *(f"stages.1.data.{k}.limit=16" for k in range(3)),
            "stages.1.data.2.repeat=1",
        ],
        generation=(4, 2, 4),
        serve=(2, 2.0, 4),
        sync_steps=1,
        # "all" takes every option's code path at once (compiling takes most of the smoke's time: once);
        # LoRA with each option: tests/train/test_step_options.py
        variants={"full": ["plain", "all"], "lora": ["plain"]},
        records=16,
        loss_chunk=8,  # a few chunks per micro-batch of tiny records
    )


def tiny_llm(out: Path) -> Path:
    """A random 2-layer, width-32 Llama with SmolLM2's tokenizer, saved at `out` (kept between runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vistune.model.llm import load_tokenizer

    if (out / "config.json").is_file():
        return out
    tokenizer = load_tokenizer("smollm2")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


class Budget:
    """Seconds left of the run's budget; `fits` says whether a unit estimated at `seconds` (times
    `scale`) does."""

    def __init__(self, seconds: float, scale: float = 1.0) -> None:
        self.end, self.scale = time.monotonic() + seconds, scale

    def left(self) -> float:
        return self.end - time.monotonic()

    def fits(self, seconds: float) -> bool:
        return seconds * self.scale <= self.left()

    def skip_reason(self, seconds: float) -> str:
        return f"skipped: needs ~{seconds * self.scale:.0f} s, {max(self.left(), 0):.0f} s of the budget left"


@dataclass
class Report:
    """The table's rows and the JSON's figures, part by part."""

    rows: list[dict] = field(default_factory=list)
    parts: dict[str, dict] = field(default_factory=dict)
    judged: bool = True  # goals are judged on CUDA only

    def row(self, part: str, measure: str, value: str, goal: str = "", ok: bool | None = None) -> None:
        verdict = "" if ok is None or not self.judged else ("met" if ok else "not met")
        self.rows.append({"part": part, "measure": measure, "value": value, "goal": goal, "verdict": verdict})

    def table(self) -> str:
        lines = ["| part | measure | value | goal | |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['part']} | {r['measure']} | {r['value']} | {r['goal']} | {r['verdict']} |"
            for r in self.rows
        ]
        return "\n".join(lines)


@dataclass
class Suite:
    """The run's shared state: where it writes, its settings, budget and report, and the data it made."""

    out: Path
    settings: Settings
    budget: Budget
    report: Report
    device: torch.device
    data: Path | None = None  # a shapes world (the quickstart's)
    served_model: Path | None = None
    later: list[str] = field(default_factory=list)  # the parts still to run after this one

    def world(self) -> Path:
        """The quickstart's shapes world, or (when the quickstart did not run) a small one made here."""
        if self.data is None:
            self.data = self.out / "data"
            sizes = {
                "train": 12 if self.settings.smoke else 2000,
                "val": 0,
                "test": 8 if self.settings.smoke else 200,
                "compositional": 0,
                "shifted": 0,
            }
            quickstart.make_data(self.data, sizes, 0, self.settings.llm)
        return self.data

    def model_setup(self, train: list[str], options: dict, workers: int) -> tuple[ModelConfig, Stage]:
        """The throughput model and its instruct stage (`train_throughput.baseline_setup`) with the
        suite's LLM, tower, batch size and steps, and these trainable parts, options and workers."""
        model_cfg, stage = throughput.baseline_setup(
            str(self.world()), self.settings.batch_size, self.settings.steps, False
        )
        llm = replace(model_cfg.llm, name_or_path=self.settings.llm)
        options = options | (
            {"compile_backend": self.settings.compile_backend} if options.get("compile") else {}
        )
        options |= {"loss_chunk": self.settings.loss_chunk} if "loss_chunk" in options else {}
        data = (
            [replace(spec, limit=self.settings.records, repeat=1) for spec in stage.data]
            if self.settings.records
            else stage.data
        )
        return replace(model_cfg, llm=llm, vision=self.settings.tower), replace(
            stage, train=train, workers=workers, options=options, data=data
        )


# 1. the quickstart


def part_quickstart(suite: Suite) -> dict:
    """`vistune quickstart --profile gpu` into OUT/quickstart: seconds per phase and stage, accuracy."""
    out = suite.out / "quickstart"
    for child in out.glob("*") if out.is_dir() else []:  # a fresh run; the generated data is kept
        if child.name != "data":
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    args = ["--out", str(out), "--profile", "gpu", *suite.settings.quickstart_args]
    args += [x for s in suite.settings.quickstart_set for x in ("--set", s)]
    started = time.perf_counter()
    if suite.settings.smoke:  # a tiny world, made by the quickstart's own function (it reuses it)
        sizes = {"train": 12, "val": 2, "test": 4, "compositional": 4, "shifted": 4}
        quickstart.make_data(out / "data", sizes, 0, suite.settings.llm)
    data_s = time.perf_counter() - started
    quickstart.main_quickstart(args)
    summary = json.loads((out / "quickstart.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    stages: dict[str, float] = {}
    for r in rows:
        if "step" in r:
            stages[r["stage"]] = stages.get(r["stage"], 0.0) + r["seconds"]
    seconds = summary["seconds"] | {"data": round(summary["seconds"]["data"] + data_s, 1)}
    total = seconds["total"] + data_s
    suite.data, suite.served_model = out / "data", Path(summary["model"])
    r = suite.report
    r.row(
        "quickstart",
        "total seconds (data, train, eval)",
        f"{total:.1f}",
        f"<= {GOALS['quickstart_s']:.0f}",
        total <= GOALS["quickstart_s"],
    )
    r.row(
        "quickstart",
        "seconds: data / train / eval",
        f"{seconds['data']} / {seconds['train']} / {seconds['eval']}",
    )
    for name, s in stages.items():
        r.row("quickstart", f"seconds: stage {name} (its steps)", f"{s:.1f}")
    by_type = summary["vqa"]["test"].get("by_question_type", {})
    for qtype in sorted(by_type):
        accuracy = by_type[qtype]["accuracy"]
        r.row(
            "quickstart",
            f"accuracy (test): {qtype}",
            f"{accuracy:.3f}",
            f">= {GOALS['accuracy']}",
            accuracy >= GOALS["accuracy"],
        )
    for split, result in summary["vqa"].items():
        r.row("quickstart", f"exact match: {split}", f"{result['exact_match']:.3f}")
    return {"seconds": seconds, "stage_seconds": stages, "total_s": total, "summary": summary}


# 2. training throughput


def matmul_peak(device: torch.device, smoke: bool) -> tuple[float, str]:
    """The measured matmul FLOP/s of `device` and its precision: bf16 on CUDA, fp32 on a CPU
    (`train_throughput.matmul_peak`)."""
    if device.type != "cuda":
        return throughput.matmul_peak(512 if smoke else 2048), "fp32"
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    return 2 * n**3 / best, "bf16"


def peak_memory_gb(device: torch.device) -> float:
    """The device's peak allocated memory since the last reset (CUDA), or this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def run_variant(
    suite: Suite, train: list[str], options: dict, workers: int, peak: float, baseline: bool
) -> dict:
    """One instruct-stage run through vistune's loop (`train_throughput.run_vistune`): its tokens/s,
    MFU and peak memory; with `baseline`, transformers' LLaVA on the same batches after it."""
    model_cfg, stage = suite.model_setup(train, options, workers)
    torch.manual_seed(0)  # the same initial weights in every run
    model = build_vlm(model_cfg)
    hf = None
    if baseline:
        hf = to_hf_llava(model)  # before training: the same initial weights
        for t in [*hf.parameters(), *hf.buffers()]:
            t.data = t.data.clone()  # its own copies: vistune trains the tensors they share in place
    # compiled runs start timing later (`Settings.compile_warmup`), the others after step 0
    warm = min(suite.settings.compile_warmup, stage.max_steps - 1) if options.get("compile") else 1
    if suite.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(suite.device)
    with tempfile.TemporaryDirectory(prefix="vistune-suite-") as tmp:
        objective, steps, seconds = throughput.run_vistune(model, stage, 0, Path(tmp), warm)
    memory = peak_memory_gb(suite.device)
    order = throughput.step_indices(objective, stage, 0)
    lengths, samples = objective.lengths(), objective.data.samples
    tokens = sum(lengths[i] for ids in order[warm:] for i in ids)
    seen, flops = {p for ids in order[:warm] for i in ids for p in samples[i].images}, 0.0
    for ids in order[warm:]:
        new = {p for i in ids for p in samples[i].images} - seen
        seen |= new
        labelled = sum(label >= 0 for i in ids for label in samples[i].labels[1:])
        flops += throughput.stage_flops(
            model, stage, {"new_images": new}, labelled, sum(lengths[i] for i in ids)
        )
    figures = {
        "steps": len(order),
        "timed_from_step": warm,
        "batch_size": stage.batch_size,
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "samples_per_s": stage.batch_size * (len(order) - warm) / seconds,
        "mfu": flops / seconds / peak,
        "peak_memory_gb": memory,
    }
    if hf is not None:
        bf16 = suite.device.type == "cuda" and torch.cuda.is_bf16_supported()
        theirs = throughput.run_baseline(hf, objective, stage, order, bf16)
        their_s = sum(s for _, s in theirs[1:])
        pairs = list(zip(steps[: throughput.COMPARED], theirs[: throughput.COMPARED], strict=False))
        rel = max(abs(a - b) / abs(b) for (a, _), (b, _) in pairs)
        rtol = throughput.BF16_RTOL if bf16 else throughput.LOSS_RTOL
        figures["baseline"] = {
            "seconds": their_s,
            "ratio": their_s / seconds,
            "loss_max_rel_diff": rel,
            "loss_rtol": rtol,
            "losses_agree": rel <= rtol,
        }
        del hf
    del objective, model
    if suite.device.type == "cuda":
        torch.cuda.empty_cache()
    return figures


def part_throughput(suite: Suite) -> dict:
    """The instruct stage, full and LoRA, plain and with each step option (see the module docstring)."""
    peak, precision = matmul_peak(suite.device, suite.settings.smoke)
    r, out = suite.report, {"matmul_peak_flops": peak, "precision": precision, "runs": {}}
    r.row("throughput", f"{precision} matmul peak (measured)", f"{peak / 1e12:.2f} TFLOP/s")
    # the runs leave the later parts their estimated time; most telling first: plain full (with the
    # baseline), plain LoRA, then each option
    reserve = sum(ESTIMATE_S[part] for part in suite.later)
    for name, options, workers in VARIANTS:
        for mode, train in ((m, t) for m, t in TRAIN.items() if name in suite.settings.variants[m]):
            label = f"{mode} {name}"
            baseline = mode == "full" and name == "plain"
            estimate = ESTIMATE_S["compile" if options.get("compile") else "variant"]
            estimate += ESTIMATE_S["baseline"] if baseline else 0
            if not suite.budget.fits(estimate + reserve):
                out["runs"][label] = {"status": suite.budget.skip_reason(estimate + reserve)}
                out["runs"][label]["status"] += (
                    f" (the later parts' ~{reserve * suite.budget.scale:.0f} s included)"
                )
                r.row("throughput", label, out["runs"][label]["status"])
                continue
            try:
                f = run_variant(suite, train, options, workers, peak, baseline)
            except Exception as err:  # one option failing leaves the others to measure
                out["runs"][label] = {"status": f"failed: {type(err).__name__}: {err}"}
                r.row("throughput", label, out["runs"][label]["status"], ok=False)
                traceback.print_exc()
                continue
            out["runs"][label] = f | {"status": "ran"}
            goal = mode == "full" and name == "plain"
            r.row(
                "throughput",
                f"{label}: tokens/s, MFU, peak memory",
                f"{f['tokens_per_s']:.0f}, {f['mfu']:.1%}, {f['peak_memory_gb']:.2f} GB",
                f">= {GOALS['mfu']:.0%} MFU" if goal else "",
                f["mfu"] >= GOALS["mfu"] if goal else None,
            )
            if "baseline" in f:
                b = f["baseline"]
                r.row(
                    "throughput",
                    "full plain / transformers LLaVA (same batches)",
                    f"{b['ratio']:.2f}x",
                    f">= {GOALS['baseline']:.0f}x",
                    b["ratio"] >= GOALS["baseline"],
                )
                r.row(
                    "throughput",
                    "losses vs transformers LLaVA: max relative difference",
                    f"{b['loss_max_rel_diff']:.1e}",
                    f"<= {b['loss_rtol']:g}",
                    b["losses_agree"],
                )
    failed = [k for k, v in out["runs"].items() if v["status"].startswith("failed")]
    if failed:
        raise PartialFailure(out, f"throughput runs failed: {', '.join(failed)}")
    return out


class PartialFailure(Exception):
    """A part that measured some things and failed at others: its figures so far, and what failed."""

    def __init__(self, figures: dict, message: str) -> None:
        super().__init__(message)
        self.figures = figures


# 3. generation


def part_generation(suite: Suite) -> dict:
    """vistune's generator against `transformers.generate` on the export of the throughput model."""
    model_cfg, _ = suite.model_setup(TRAIN["full"], {}, 0)
    torch.manual_seed(0)
    model_dir, export_dir = suite.out / "generation" / "model", suite.out / "generation" / "export"
    shutil.rmtree(suite.out / "generation", ignore_errors=True)
    save_vlm(build_vlm(model_cfg), model_dir)
    export_llava(model_dir, export_dir)
    n, batch, max_new = suite.settings.generation
    data = suite.world()
    records = load_llava(data / "test" / "vqa.json")[:n]  # `compare` runs the first batch once untimed
    f = export_parity.compare(model_dir, export_dir, records, data / "images", batch, max_new)
    r = suite.report
    r.row(
        "generation",
        "records/s: vistune, transformers.generate",
        f"{f['vistune_records_per_s']:.2f}, {f['transformers_records_per_s']:.2f}",
    )
    r.row(
        "generation",
        "vistune / transformers.generate",
        f"{f['ratio']:.2f}x",
        f">= {GOALS['generation']}x",
        f["ratio"] >= GOALS["generation"],
    )
    r.row(
        "generation",
        "identical greedy answers",
        f"{f['identical']}/{f['records']}",
        "all",
        f["identical"] == f["records"],
    )
    return f | {"batch_size": batch, "max_new_tokens": max_new}


# 4. serving


def part_serve(suite: Suite) -> dict:
    """`benchmarks/serve_load.py`: N streaming clients for T seconds against `vistune serve`."""
    model = suite.served_model
    if model is None or not model.is_dir():
        model = suite.out / "generation" / "model"
        if not model.is_dir():
            raise ValueError("nothing to serve: neither the quickstart nor generation made a model")
    clients, seconds, max_tokens = suite.settings.serve
    args = serve_load._parser().parse_args(
        [
            str(model),
            "--clients",
            str(clients),
            "--seconds",
            str(seconds),
            "--max-tokens",
            str(max_tokens),
            "--follow-ups",
            "0",
        ]
    )
    jpeg = serve_load.photo_jpeg(640, 480)
    with serve_load.started_server(args, args.max_batch) as (url, pid):
        f = serve_load.measure(args, url, pid, jpeg, f"{clients} clients x {seconds:g} s")
    ms = lambda d: " / ".join("-" if v is None else f"{v * 1000:.0f}" for v in (d[50], d[95]))  # noqa: E731
    r = suite.report
    r.row(
        "serve",
        f"{clients} clients x {seconds:g} s: requests/s, tokens/s",
        f"{f['requests_per_s']:.2f}, {f['tokens_per_s']:.1f}",
    )
    r.row("serve", "latency p50 / p95 (ms)", ms(f["latency"]))
    r.row("serve", "time to first token p50 / p95 (ms)", ms(f["ttft"]))
    r.row(
        "serve",
        "requests ok / errors",
        f"{f['ok']}/{f['requests']}, {f['errors'] or 'none'}",
        "no errors",
        not f["errors"] and f["ok"] > 0,
    )
    return f | {"model": str(model)}


# 5. host syncs


def count_syncs(suite: Suite, train: list[str], options: dict, steps: int) -> list[list[str]]:
    """The host syncs inside each of `steps` training steps (after one untimed step) of the instruct
    stage, as the loop runs them (accelerate, fused AdamW, batches built before the step)."""
    model_cfg, stage = suite.model_setup(train, options, 0)
    torch.manual_seed(0)
    model = build_vlm(model_cfg)
    accelerator = make_accelerator()
    with tempfile.TemporaryDirectory(prefix="vistune-suite-") as tmp:
        objective = build_objective(stage, model, StageContext(accelerator.device, Path(tmp)))
    optimizer = torch.optim.AdamW(set_trainable(objective, objective.parts(), stage), fused=True)
    wrapped, prepared = accelerator.prepare(objective, optimizer)
    counts = []
    for step in range(steps + 1):
        batches = step_batches(objective, accelerator, stage, 0, step)
        if suite.device.type == "cuda":
            torch.cuda.synchronize(suite.device)
        with sync_counter(accelerator.device) as counter:
            train_step(wrapped, objective, prepared, accelerator, stage, batches)
        if step:
            counts.append(counter.calls)
    return counts


def part_syncs(suite: Suite) -> dict:
    """Host syncs per training step: full and LoRA (goal 0), and packed (transformers reads back whether
    the position ids hold packed records: one per micro-batch, expected)."""
    out = {}
    kind = "CUDA sync debug mode" if suite.device.type == "cuda" else "host reads (CPU)"
    for label, train, options in (
        ("full", TRAIN["full"], {}),
        ("lora", TRAIN["lora"], {}),
        ("full, packed", TRAIN["full"], {"pack": True}),
    ):
        calls = count_syncs(suite, train, options, suite.settings.sync_steps)
        per_step = sum(map(len, calls)) / len(calls)
        out[label] = {"per_step": per_step, "calls": calls}
        goal = "packed" not in label
        suite.report.row(
            "syncs",
            f"{label}: syncs per step ({kind})",
            f"{per_step:g}",
            "0" if goal else "1 per micro-batch (known)",
            per_step == 0 if goal else None,
        )
    return out


RUNNERS: dict[str, Callable[[Suite], dict]] = {
    "quickstart": part_quickstart,
    "throughput": part_throughput,
    "generation": part_generation,
    "serve": part_serve,
    "syncs": part_syncs,
}


def run_suite(out: Path, budget_s: float, smoke: bool, parts: list[str]) -> Report:
    """Run `parts` in order within `budget_s` seconds; write OUT/gpu_suite.md and .json."""
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not smoke:
        raise SystemExit("no CUDA device here: run with --smoke for the CPU check of the same code paths")
    started = time.monotonic()
    settings = smoke_settings(out) if smoke else Settings(smoke=False)
    suite = Suite(
        out,
        settings,
        Budget(budget_s, SMOKE_SCALE if smoke else 1.0),
        Report(judged=device.type == "cuda"),
        device,
    )
    for k, part in enumerate(parts):
        suite.later = parts[k + 1 :]
        # throughput budgets each of its runs: it starts when the first one fits
        estimate = ESTIMATE_S["variant" if part == "throughput" else part]
        if not suite.budget.fits(estimate):
            reason = suite.budget.skip_reason(estimate)
            suite.report.parts[part] = {"status": reason}
            suite.report.row(part, "(all)", reason)
            print(f"[{part}] {reason}", flush=True)
            continue
        print(f"[{part}] starting, {suite.budget.left():.0f} s of the budget left", flush=True)
        start = time.monotonic()
        try:
            figures, status = RUNNERS[part](suite), "ran"
        except Exception as err:  # the other parts still run; the exit status says it failed
            traceback.print_exc()
            figures = getattr(err, "figures", {})
            status = f"failed: {type(err).__name__}: {err}"
            suite.report.row(part, "(part)", status, ok=False)
        suite.report.parts[part] = figures | {"status": status, "seconds": round(time.monotonic() - start, 1)}
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    )
    smoke_note = " (--smoke: tiny models and data; goals not judged)" if smoke else ""
    header = (
        f"gpu_suite on {device_name}{smoke_note}, "
        f"budget {budget_s:g} s, took {time.monotonic() - started:.0f} s"
    )
    (out / "gpu_suite.md").write_text(f"{header}\n\n{suite.report.table()}\n", encoding="utf-8")
    summary = {
        "device": device_name,
        "smoke": smoke,
        "budget_s": budget_s,
        "seconds": time.monotonic() - started,
        "torch": torch.__version__,
        "parts": suite.report.parts,
        "rows": suite.report.rows,
    }
    (out / "gpu_suite.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\n{header}\n\n{suite.report.table()}")
    return suite.report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out", help="where the report and the runs go (default runs/gpu_suite, --smoke: a temp dir)"
    )
    p.add_argument("--budget-s", type=float, default=480.0, help="seconds for the whole run")
    p.add_argument("--smoke", action="store_true", help="tiny models and data, on any device")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    a = p.parse_args(argv)
    parts = [x for x in a.parts.split(",") if x]
    if unknown := [x for x in parts if x not in PARTS]:
        p.error(f"--parts: unknown {', '.join(unknown)} (known: {', '.join(PARTS)})")
    if a.smoke and not a.out:
        with tempfile.TemporaryDirectory(prefix="vistune-smoke-") as tmp:
            report = run_suite(Path(tmp), a.budget_s, True, parts)
    else:
        report = run_suite(Path(a.out or "runs/gpu_suite"), a.budget_s, a.smoke, parts)
    failed = [name for name, part in report.parts.items() if part["status"].startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
