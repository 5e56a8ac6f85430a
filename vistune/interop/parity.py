"""Parity between a vistune model and its transformers LLaVA export, measured rather than assumed.

Both models answer the same built-in probes (a conversation with one image, one with an image in each of
two user turns, one of text only): the exported processor's token ids must equal vistune's renderer's,
the largest logit difference over every position must stay under a tolerance, and greedy answers of a
few tokens must be the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vistune.data.records import IMAGE_PLACEHOLDER, Turn
from vistune.infer.generate import Generator
from vistune.model.template import render
from vistune.model.vlm import VLM

Part = dict[str, str]  # {"type": "image"} or {"type": "text", "text": ...}
Message = dict[str, object]  # {"role": ..., "content": [Part, ...]}


def probe_images() -> list[Image.Image]:
    """Two small non-square pictures, drawn the same way every time (no files, no randomness)."""
    wide = Image.new("RGB", (48, 30), (235, 235, 225))
    draw = ImageDraw.Draw(wide)
    draw.ellipse((4, 5, 22, 23), fill=(220, 30, 30))
    draw.rectangle((28, 8, 44, 24), fill=(30, 70, 220))
    ramp = np.linspace(0, 255, 30 * 40, dtype=np.float64).reshape(40, 30)
    tall = Image.fromarray(np.stack([ramp, 255 - ramp, np.full_like(ramp, 120)], -1).astype(np.uint8))
    return [wide, tall]


def probe_conversations() -> list[tuple[list[Message], list[Image.Image]]]:
    """(conversation ending with a user turn, its images) for each probe."""
    wide, tall = probe_images()
    image = {"type": "image"}
    return [
        ([{"role": "user", "content": [image, {"type": "text", "text": "What is in the image?"}]}], [wide]),
        (
            [
                {"role": "user", "content": [image, {"type": "text", "text": "Describe the picture."}]},
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "A red circle and a blue square."}],
                },
                {"role": "user", "content": [image, {"type": "text", "text": "And this one?"}]},
            ],
            [wide, tall],
        ),
        ([{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}], []),
    ]


def as_turns(conversation: list[Message]) -> list[Turn]:
    """The same conversation as vistune turns: an image part is `<image>\\n`, as in training data."""
    turns = []
    for message in conversation:
        text = "".join(
            f"{IMAGE_PLACEHOLDER}\n" if part["type"] == "image" else part["text"]
            for part in message["content"]
        )
        turns.append(Turn(str(message["role"]), text))
    return turns


@dataclass
class Parity:
    """What the probes showed."""

    max_logit_diff: float = 0.0
    ids_equal: bool = True
    answers_equal: bool = True
    answers: list[tuple[str, str]] = field(default_factory=list)  # (vistune, export) per probe

    def ok(self, tolerance: float) -> bool:
        """Same ids, logits within `tolerance`, same greedy answers."""
        return self.ids_equal and self.answers_equal and self.max_logit_diff <= tolerance


@torch.no_grad()
def check_parity(
    model: VLM, hf: LlavaForConditionalGeneration, processor: LlavaProcessor, max_new_tokens: int = 8
) -> Parity:
    """Run both models on the built-in probes and compare ids, logits and greedy answers."""
    result = Parity()
    generator = Generator(model.llm, model.tokenizer, model, batch_size=1)
    for conversation, images in probe_conversations():
        turns = as_turns(conversation)
        ids = render(turns, model.tokenizer, image_tokens=model.image_tokens, num_images=len(images),
                     generation=True).input_ids  # fmt: skip
        text = processor.apply_chat_template(conversation, add_generation_prompt=True)
        inputs = processor(text=text, images=images or None, return_tensors="pt")
        result.ids_equal &= inputs["input_ids"][0].tolist() == ids
        pixels = model.vision.preprocess(images) if images else None
        ours = model.llm(inputs_embeds=model.embed(torch.tensor([ids]), pixels)).logits
        theirs = hf(**inputs).logits
        if ours.shape == theirs.shape:
            result.max_logit_diff = max(result.max_logit_diff, float((ours - theirs).abs().max()))
        else:
            result.max_logit_diff = float("inf")
        answer = generator.generate([turns], [images], max_new_tokens=max_new_tokens)[0]
        out = hf.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        exported = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        result.answers.append((answer, exported))
        result.answers_equal &= answer == exported
    return result
