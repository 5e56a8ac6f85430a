"""`vistune export MODEL_DIR --format hf-llava --out DIR`: a dir transformers loads without vistune.

The export is `LlavaForConditionalGeneration.from_pretrained(DIR)` + `AutoProcessor.from_pretrained(DIR)`:
config, safetensors weights (sharded with an index above `--max-shard-size`), the tokenizer with the
image token, a chat template that renders what vistune trains on, an image processor that reproduces
vistune's preprocessing, and a model card (README.md) with the recipe, data and evaluation figures found
beside the model dir. Before anything is written, both models answer built-in probes in fp32 and the
export is refused if a token id or greedy answer differs or a logit differs by more than 1e-4
(`--no-check` skips this). The directory is written under a temporary name and renamed into place.

`--out` may not be, or hold, or lie inside the model dir; `--overwrite` replaces only a previous export
(a flat directory with a LLaVA `config.json`, its weights and the model card this command writes), never
any other directory.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch

from vistune.interop.llava import to_hf_llava, to_hf_processor
from vistune.interop.parity import Parity, check_parity
from vistune.model.vlm import MODEL_FILE, VLM, load_vlm

FORMATS = ("hf-llava",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = 1e-4  # largest logit difference allowed in fp32
CARD_TITLE = "# A vistune model in the transformers LLaVA format"


def export_llava(
    model_dir: str | Path,
    out: str | Path,
    dtype: str = "fp32",
    check: bool = True,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> Parity | None:
    """Write `model_dir` as a transformers LLaVA dir at `out`; return the parity (None if unchecked)."""
    out = Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    check_out(Path(model_dir), out, overwrite)
    model = load_vlm(model_dir)
    hf, processor = to_hf_llava(model), to_hf_processor(model)
    parity = check_parity(model, hf, processor) if check else None
    if parity is not None and not parity.ok(TOLERANCE):
        raise ValueError(
            f"{model_dir}: the export does not compute what vistune does (token ids equal: "
            f"{parity.ids_equal}, largest logit difference {parity.max_logit_diff:.3g} > {TOLERANCE}, "
            f"greedy answers {parity.answers}); nothing written (--no-check writes it anyway)"
        )
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf.to(DTYPES[dtype]).save_pretrained(tmp, max_shard_size=max_shard_size)
        processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(Path(model_dir), model, parity, dtype), encoding="utf-8")
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return parity


def check_out(model_dir: Path, out: Path, overwrite: bool) -> None:
    """Refuse an `--out` that would touch the model or a directory that is not a previous export."""
    source, target = model_dir.resolve(), out.resolve()
    if target == source or source.is_relative_to(target) or target.is_relative_to(source):
        raise ValueError(
            f"{out}: is, holds or lies inside the model dir {model_dir}; choose an --out outside it"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory; choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ValueError(f"{out}: exists and is not empty; choose another --out or pass --overwrite")
    why = not_an_export(out)
    if why:
        raise ValueError(
            f"{out}: --overwrite replaces only a previous export, and {why}; choose another --out"
        )


def not_an_export(path: Path) -> str | None:
    """Why `path` is not a directory this command wrote (None when it is one)."""
    folders = sorted(p.name for p in path.iterdir() if p.is_dir() or not p.is_file())
    if folders:
        return f"it holds {folders[0]!r}, which is not a file (an export holds files only)"
    config = _read_json(path / "config.json")
    if not isinstance(config, dict) or config.get("model_type") != "llava":
        return "it has no config.json of a LLaVA model"
    if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        return "it has no model.safetensors"
    try:
        card = (path / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        card = ""
    if CARD_TITLE not in card:
        return "its README.md is not the model card of a vistune export"
    return None


def _replace(new: Path, out: Path) -> None:
    """Move `new` to `out`; a previous `out` is moved aside first and removed only once `new` is in place."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    try:
        new.rename(out)
    except OSError:
        if old.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _recipe_lines(run_config: dict | None) -> list[str]:
    if not run_config:
        return ["No run config was found beside the model dir (`../config.json`)."]
    lines = [
        "| stage | kind | trains | data | steps or epochs | lr | batch |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in run_config.get("stages", []):
        data = ", ".join(Path(d["path"]).name for d in s.get("data", []))
        length = f"{s['max_steps']} steps" if s.get("max_steps") else f"{s.get('epochs')} epochs"
        lines.append(f"| {s['name']} | {s['kind']} | {', '.join(s['train'])} | {data} | {length} | {s['lr']} "
                     f"| {s['batch_size']} x {s['grad_accum']} |")  # fmt: skip
    return lines


def _eval_lines(summary: dict | None) -> list[str]:
    if not summary or "vqa" not in summary:
        return ["No evaluation figures were found beside the model dir (`../quickstart.json`)."]
    lines = ["| split | exact match | questions |", "| --- | --- | --- |"]
    for split, metrics in summary["vqa"].items():
        lines.append(f"| {split} | {metrics['exact_match']:.3f} | {metrics['n']} |")
    return lines


def model_card(model_dir: Path, model: VLM, parity: Parity | None, dtype: str) -> str:
    """README.md of the export: what the model is, how it was trained and measured, how to load it."""
    cfg = model.cfg
    millions = sum(p.numel() for p in model.llm.parameters()) / 1e6
    tower = (
        cfg.vision.name_or_path
        or f"from scratch ({cfg.vision.hidden_size}-d, {cfg.vision.num_layers} layers)"
    )
    checked = (
        f"token ids equal: {parity.ids_equal}; largest logit difference {parity.max_logit_diff:.3g}; greedy "
        f"answers equal: {parity.answers_equal}"
        if parity
        else "not checked (--no-check)"
    )
    return "\n".join([
        "---", "library_name: transformers", "pipeline_tag: image-text-to-text",
        "tags: [vistune, llava]", "---",
        "", CARD_TITLE, "",
        f"- vision tower: {cfg.vision.kind}, {tower}, {cfg.vision.image_size} px, feature layer "
        f"{cfg.vision.feature_layer}, images made square by `{cfg.vision.preprocess}`",
        f"- projector: {cfg.projector.name}; {model.image_tokens} image tokens per image",
        f"- language model: {model.llm.config.model_type}, {millions:.1f}M parameters; weights as {dtype}",
        f"- parity with vistune on built-in probes (fp32): {checked}",
        "", "## Training recipe", "", *_recipe_lines(_read_json(model_dir.parent / "config.json")),
        "", "## Evaluation", "", *_eval_lines(_read_json(model_dir.parent / "quickstart.json")),
        "", "## Use", "", "```python",
        "from transformers import AutoProcessor, LlavaForConditionalGeneration",
        "model = LlavaForConditionalGeneration.from_pretrained(DIR)",
        "processor = AutoProcessor.from_pretrained(DIR)",
        'parts = [{"type": "image"}, {"type": "text", "text": "What is here?"}]',
        'messages = [{"role": "user", "content": parts}]',
        "text = processor.apply_chat_template(messages, add_generation_prompt=True)",
        'inputs = processor(text=text, images=[image], return_tensors="pt")',
        "print(processor.decode(model.generate(**inputs, max_new_tokens=32)[0], skip_special_tokens=True))",
        "```", "",
    ])  # fmt: skip


def shard_size(text: str) -> str:
    """argparse type: a size above 0 with its unit, as transformers reads it (5GB, 500MB; KB, MB, GB, TB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 5GB or 500MB (KB, MB, GB, TB), got {text!r}"
        )
    return text.strip()


def main_export(argv: list[str] | None = None) -> int:
    """`vistune export`: write a trained model dir in the transformers LLaVA format."""
    p = argparse.ArgumentParser(prog="vistune export", description=__doc__.splitlines()[0])
    p.add_argument("model_dir", help="a vistune model dir (OUT/model of a training run)")
    p.add_argument("--format", choices=FORMATS, default="hf-llava")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="weights as stored (checked in fp32)"
    )
    p.add_argument(
        "--max-shard-size", type=shard_size, default="5GB", help="weights above this are split into shards"
    )
    p.add_argument("--no-check", action="store_true", help="skip the parity check against vistune")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export at --out (only that)")
    args = p.parse_args(argv)
    if not (Path(args.model_dir) / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{args.model_dir}: not a vistune model dir (no {MODEL_FILE})")
    parity = export_llava(
        args.model_dir, args.out, args.dtype, not args.no_check, args.max_shard_size, args.overwrite
    )
    detail = f"largest logit difference {parity.max_logit_diff:.3g}" if parity else "not checked"
    print(f"wrote {args.out} (transformers LLaVA, {args.dtype}); parity: {detail}")
    return 0
