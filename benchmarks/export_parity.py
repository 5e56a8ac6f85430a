"""Greedy answers of a vistune model and of its transformers LLaVA export on the same VQA questions.

    python benchmarks/export_parity.py MODEL_DIR EXPORT_DIR DATA_FILE [--image-root DIR] [--n 50]

MODEL_DIR is a vistune model dir, EXPORT_DIR what `vistune export` wrote from it, DATA_FILE a LLaVA
JSON of single-turn questions (e.g. a shapes world's test/vqa.json). Prints how many answers are
identical, the records/s of each side (vistune's generator against `LlavaForConditionalGeneration.
generate` with the processor, left-padded, in batches of `--batch-size`; preprocessing included on both
sides) and their ratio.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: E402

from vistune.data.images import load_image  # noqa: E402
from vistune.data.records import IMAGE_PLACEHOLDER  # noqa: E402
from vistune.eval.loaders import load_llava  # noqa: E402
from vistune.infer.generate import load_generator  # noqa: E402


def compare(
    model_dir: str | Path,
    export_dir: str | Path,
    records: list,
    image_root: Path,
    batch_size: int = 1,
    max_new_tokens: int = 8,
) -> dict:
    """Greedy answers of vistune's generator and of `LlavaForConditionalGeneration.generate` on the
    export, in batches of `batch_size` (preprocessing included on both sides): how many are identical,
    and each side's records/s (a first batch on each side warms up, untimed)."""
    ours_model = load_generator(str(model_dir), batch_size=batch_size)
    theirs_model = LlavaForConditionalGeneration.from_pretrained(export_dir).eval()
    device = ours_model.device
    theirs_model.to(device)
    # as vistune loads it: the LLM in its dtype (bf16 on a GPU), the tower and projector in fp32
    theirs_model.model.language_model.to(next(ours_model.llm.parameters()).dtype)
    theirs_model.lm_head.to(next(ours_model.llm.parameters()).dtype)
    processor = AutoProcessor.from_pretrained(export_dir)
    processor.tokenizer.padding_side = "left"  # batched generation continues every row at its end
    same, seconds = 0, [0.0, 0.0]
    chunks = [records[first : first + batch_size] for first in range(0, len(records), batch_size)]
    for k, chunk in enumerate([chunks[0], *chunks]):  # chunk 0 twice: once to warm up
        images = [load_image(image_root / r.images[0]) for r in chunk]
        questions = [r.turns[0] for r in chunk]
        _sync(device)
        start = time.perf_counter()
        ours = ours_model.generate([[q] for q in questions], [[im] for im in images], max_new_tokens)
        _sync(device)
        mid = time.perf_counter()
        prompts = []
        for question in questions:
            text = question.content.replace(f"{IMAGE_PLACEHOLDER}\n", "")
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt").to(device)
        with torch.no_grad():
            out = theirs_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        width = inputs["input_ids"].shape[1]
        theirs = [processor.decode(row[width:], skip_special_tokens=True).strip() for row in out]
        end = time.perf_counter()
        if k:
            seconds[0] += mid - start
            seconds[1] += end - mid
            same += sum(x == y for x, y in zip(ours, theirs, strict=True))
    n = len(records)
    return {"records": n, "identical": same, "vistune_records_per_s": n / seconds[0],
            "transformers_records_per_s": n / seconds[1], "ratio": seconds[1] / seconds[0]}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("export_dir")
    p.add_argument("data_file")
    p.add_argument("--image-root", help="default: DATA_FILE's folder/../images (the shapes world layout)")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=1, help="records per generate call, both sides")
    p.add_argument("--max-new-tokens", type=int, default=8)
    a = p.parse_args()
    root = Path(a.image_root or Path(a.data_file).parent.parent / "images")
    records = load_llava(a.data_file)[: a.n]
    r = compare(a.model_dir, a.export_dir, records, root, a.batch_size, a.max_new_tokens)
    n = r["records"]
    print(
        f"{r['identical']}/{n} identical greedy answers "
        f"(batch {a.batch_size}, at most {a.max_new_tokens} tokens)"
    )
    print(f"records/s: vistune {r['vistune_records_per_s']:.2f}, "
          f"transformers generate {r['transformers_records_per_s']:.2f}")  # fmt: skip
    print(f"generate ratio: {r['ratio']:.2f}x")


if __name__ == "__main__":
    main()
