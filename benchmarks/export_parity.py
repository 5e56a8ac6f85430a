"""Greedy answers of a vistune model and of its transformers LLaVA export on the same VQA questions.

    python benchmarks/export_parity.py MODEL_DIR EXPORT_DIR DATA_FILE [--image-root DIR] [--n 50]

MODEL_DIR is a vistune model dir, EXPORT_DIR what `vistune export` wrote from it, DATA_FILE a LLaVA
JSON of single-turn questions (e.g. a shapes world's test/vqa.json). Prints how many answers are
identical and the time each side took.
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
    p.add_argument("--max-new-tokens", type=int, default=8)
    a = p.parse_args()
    root = Path(a.image_root or Path(a.data_file).parent.parent / "images")
    records = load_llava(a.data_file)[: a.n]
    ours_model = load_generator(a.model_dir, batch_size=1)
    theirs_model = LlavaForConditionalGeneration.from_pretrained(a.export_dir).eval()
    processor = AutoProcessor.from_pretrained(a.export_dir)
    same, seconds = 0, [0.0, 0.0]
    for record in records:
        image, question = load_image(root / record.images[0]), record.turns[0]
        start = time.perf_counter()
        ours = ours_model.generate([[question]], [[image]], max_new_tokens=a.max_new_tokens)[0]
        seconds[0] += time.perf_counter() - start
        text = question.content.replace(f"{IMAGE_PLACEHOLDER}\n", "")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=prompt, images=[image], return_tensors="pt")
        start = time.perf_counter()
        with torch.no_grad():
            out = theirs_model.generate(**inputs, max_new_tokens=a.max_new_tokens, do_sample=False)
        seconds[1] += time.perf_counter() - start
        theirs = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        same += ours == theirs
    print(f"{same}/{len(records)} identical greedy answers")
    print(f"seconds: vistune {seconds[0]:.1f}, export {seconds[1]:.1f}")


if __name__ == "__main__":
    main()
