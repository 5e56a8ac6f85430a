"""How long the records of a recipe's instruct mix are: mean rendered tokens per record, per dataset.

    python benchmarks/mix_tokens.py CONFIG DATA_DIR [--stage instruct] [--every 5]

Each dataset of the stage is read as training reads it (`where`, then the first `limit`, `repeat` times),
and every `--every`-th record is rendered with the config's LLM tokenizer and chat template, each image as
the projector's number of tokens (31 for the quickstart's object_words). A step of a fixed number of
records costs about in proportion to the mix's mean, so two mixes of one recipe compare by it (e.g. the
quickstart's before a change: `git show REV:configs/quickstart.yaml > old.yaml`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from vistune.config import load_config
from vistune.data.readers import load_records
from vistune.model.llm import smollm2_dir
from vistune.model.template import CHATML, render, set_chat_template

IMAGE_TOKENS = 31  # the quickstart's object_words: the count, then six objects of five tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config")
    parser.add_argument("data_dir")
    parser.add_argument("--stage", default="instruct")
    parser.add_argument("--every", type=int, default=5, help="render one record in this many")
    parser.add_argument("--image-tokens", type=int, default=IMAGE_TOKENS)
    args = parser.parse_args()
    cfg = load_config(args.config, [f"data_root={args.data_dir}"])
    stage = next(s for s in cfg.stages if s.name == args.stage)
    if cfg.model.llm.name_or_path != "smollm2" or cfg.model.llm.chat_template != "chatml":
        raise SystemExit(f"{args.config}: this benchmark renders with SmolLM2's chatml template only")
    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    set_chat_template(tok, CHATML)
    total = count = 0
    for spec in stage.data:
        records = [r for r in load_records(Path(args.data_dir) / spec.path) if spec.selects(r.meta)]
        records = records[: spec.limit] if spec.limit else records
        lengths = [
            len(render(r.turns, tok, image_tokens=args.image_tokens if r.images else 0,
                       num_images=len(r.images)).input_ids)
            for r in records[:: args.every]
        ]  # fmt: skip
        n = len(records) * spec.repeat
        where = f" {spec.where}" if spec.where else ""
        print(f"{spec.path}{where}: {n} records, mean {np.mean(lengths):.1f} tokens")
        total, count = total + np.mean(lengths) * n, count + n
    print(f"mix: {count} records, mean {total / count:.1f} tokens per record")


if __name__ == "__main__":
    main()
