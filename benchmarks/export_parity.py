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
    ours_model = load_generator(a.model_dir, batch_size=a.batch_size)
    theirs_model = LlavaForConditionalGeneration.from_pretrained(a.export_dir).eval()
    processor = AutoProcessor.from_pretrained(a.export_dir)
    processor.tokenizer.padding_side = "left"  # batched generation continues every row at its end
    same, seconds = 0, [0.0, 0.0]
    for first in range(0, len(records), a.batch_size):
        chunk = records[first : first + a.batch_size]
        images = [load_image(root / r.images[0]) for r in chunk]
        questions = [r.turns[0] for r in chunk]
        start = time.perf_counter()
        ours = ours_model.generate([[q] for q in questions], [[im] for im in images], a.max_new_tokens)
        seconds[0] += time.perf_counter() - start
        prompts = []
        for question in questions:
            text = question.content.replace(f"{IMAGE_PLACEHOLDER}\n", "")
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        start = time.perf_counter()
        inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = theirs_model.generate(**inputs, max_new_tokens=a.max_new_tokens, do_sample=False)
        seconds[1] += time.perf_counter() - start
        width = inputs["input_ids"].shape[1]
        theirs = [processor.decode(row[width:], skip_special_tokens=True).strip() for row in out]
        same += sum(x == y for x, y in zip(ours, theirs, strict=True))
    n = len(records)
    print(f"{same}/{n} identical greedy answers (batch {a.batch_size}, at most {a.max_new_tokens} tokens)")
    print(f"records/s: vistune {n / seconds[0]:.2f}, transformers generate {n / seconds[1]:.2f}")
    print(f"generate ratio: {seconds[1] / seconds[0]:.2f}x")


if __name__ == "__main__":
    main()
