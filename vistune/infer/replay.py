"""Text replay: plain-text prompts answered by the base LLM, mixed into an instruct stage.

`vistune data replay --base smollm2 --out FILE` writes them; a recipe trains on the file beside its
image conversations (`{path: train/text_replay.json, repeat: 10}`). Tuned only on short answers about
images, the LLM learns to answer everything in a word ("What is the
capital of Japan?" -> "capital"), and forgets how it answered plain text. Replaying its own answers to
plain-text prompts (self-distillation) while it learns the images keeps that: the loss on these
records pulls the adapters back towards what the base model says when no image is shown.

The prompts are general knowledge, arithmetic, instructions and open requests; none is a question of
the built-in text-retention set (`vistune.eval.text_bench`, a test checks), which measures what is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vistune.data.records import Turn
from vistune.infer.generate import load_generator

PROMPTS = (
    # general knowledge
    "What is the tallest mountain in the world?",
    "Who painted the Mona Lisa?",
    "What is the boiling point of water in degrees Fahrenheit?",
    "How many players does a soccer team have on the field?",
    "What is the longest river in Africa?",
    "Which ocean is the largest?",
    "What language is spoken in Brazil?",
    "What is the main ingredient of guacamole?",
    "How many wheels does a bicycle have?",
    "What do caterpillars turn into?",
    "Which metal is liquid at room temperature?",
    "What is the currency of Japan?",
    "Who was the first person to walk on the Moon?",
    "How many strings does a standard guitar have?",
    "What organ pumps blood through the body?",
    "What is the hardest natural substance?",
    "Which instrument has 88 keys?",
    "In which season do many trees lose their leaves?",
    "What is the plural of mouse?",
    "How many minutes are there in an hour?",
    "What is the name of our galaxy?",
    "What do you call a baby dog?",
    "What is the past tense of run?",
    "Which animal is the largest mammal?",
    "Which gas makes up most of the air we breathe?",
    "How many sides does a hexagon have?",
    "What is the smallest prime number?",
    "Which country is home to the kangaroo?",
    # arithmetic
    "Add 11 and 4.",
    "What do you get when you multiply 4 by 9?",
    "Subtract 8 from 20.",
    "What is half of 50?",
    "What is 13 plus 29?",
    "Compute 7 multiplied by 8.",
    "What is the square root of 81?",
    "If I have 3 apples and buy 6 more, how many apples do I have?",
    # instructions
    "Write the word river and nothing more.",
    "Respond only with the number 12.",
    "Give me one word that rhymes with cat.",
    "Answer yes or no: is fire hot?",
    "Write the word sun in capital letters.",
    "List three fruits, separated by commas.",
    "How do you say good morning in French?",
    "Reply in one word: what is the opposite of up?",
    "Name one vegetable. Just the name.",
    "Count from one to five in words.",
    # open requests
    "Describe the ocean in one sentence.",
    "Give me a tip for staying focused while studying.",
    "Write a short greeting for a birthday card.",
    "Explain what a rainbow is in one sentence.",
    "Suggest a name for a pet goldfish.",
    "Suggest a healthy breakfast.",
    "Why do people need sleep? Answer briefly.",
    "Write a haiku about autumn.",
    "What is photosynthesis, in one sentence?",
    "How do you make a cup of tea?",
    "Tell me a fun fact about octopuses.",
    "What is the difference between weather and climate, briefly?",
    "Give me two ideas for a rainy afternoon.",
    "What should I pack for a day at the beach?",
    "Write one sentence about friendship.",
    "How can I save water at home?",
    "What makes a good password?",
    "Explain gravity to a child in one sentence.",
)


def write_replay(path: str | Path, base: str, batch_size: int = 32, max_new_tokens: int = 64) -> int:
    """Answer PROMPTS with the LLM `base` (greedy) and write them as a LLaVA JSON file of text-only
    records (`replay-NNN`), atomically; returns the number written."""
    generator = load_generator(base, batch_size=batch_size)
    answers = generator.generate(
        [[Turn("user", prompt)] for prompt in PROMPTS], [[] for _ in PROMPTS], max_new_tokens=max_new_tokens
    )
    records = [
        {
            "id": f"replay-{i:03d}",
            "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer.strip()}],
        }
        for i, (prompt, answer) in enumerate(zip(PROMPTS, answers, strict=True))
        if answer.strip()  # an empty answer teaches nothing
    ]
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return len(records)


def main_replay(argv: list[str] | None = None) -> int:
    """`vistune data replay --base LLM --out FILE`: the base LLM's answers to the replay prompts."""
    p = argparse.ArgumentParser(prog="vistune data replay", description=__doc__.splitlines()[0])
    p.add_argument("--base", default="smollm2", help="the LLM the recipe starts from (default smollm2)")
    p.add_argument("--out", required=True, help="the LLaVA JSON file to write (its folder must exist)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not out.parent.is_dir():
        p.error(f"--out {out}: folder {out.parent} does not exist")
    try:
        written = write_replay(out, args.base)
    except (OSError, ValueError) as e:
        print(f"vistune data replay: error: --base {args.base}: {e}", file=sys.stderr)
        return 2
    print(f"text replay: {written} records answered by {args.base} -> {out}")
    return 0
