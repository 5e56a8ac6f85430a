"""`vistune data inspect CONFIG --n 3`: print records token by token with their labels.

Shows exactly what a stage trains on: each token, its id, and whether it carries loss (answer tokens
are marked with `*`). Image tokens are collapsed into one `<image x N>` line.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from transformers import PreTrainedTokenizerBase

from vistune.commands.start import start_config
from vistune.config import ModelConfig, load_config
from vistune.model.llm import image_token_id, load_tokenizer
from vistune.model.projector import ProjectorContext, build_projector
from vistune.model.template import IGNORE
from vistune.model.vision import build_vision_tower
from vistune.train.conversations import ConversationData, Sample


def format_sample(sample: Sample, tokenizer: PreTrainedTokenizerBase) -> str:
    """One line per token: `*` marks tokens with loss; runs of image tokens are collapsed."""
    image_id = image_token_id(tokenizer)
    lines, i = [sample.where], 0
    while i < len(sample.input_ids):
        tid, label = sample.input_ids[i], sample.labels[i]
        if tid == image_id:
            j = i
            while j < len(sample.input_ids) and sample.input_ids[j] == image_id:
                j += 1
            lines.append(f"   {'':>6}  <image x {j - i}>")
            i = j
            continue
        mark = "*" if label != IGNORE else " "
        lines.append(f" {mark} {tid:>6}  {tokenizer.decode([tid])!r}")
        i += 1
    n_loss = sum(label != IGNORE for label in sample.labels)
    lines.append(
        f"   {len(sample.input_ids)} tokens, {n_loss} with loss, images: {[str(p) for p in sample.images]}"
    )
    return "\n".join(lines)


def main_inspect(argv: list[str] | None = None) -> int:
    """Render the first records of each `vlm` stage of a config and print them token by token."""
    parser = argparse.ArgumentParser(prog="vistune data inspect", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--n", type=int, default=3, help="records per stage")
    parser.add_argument("--stage", help="only this stage (by name)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    model_cfg, arch = start_config(cfg.model)  # the parts may come from a trained model
    tokenizer = load_tokenizer(model_cfg.llm.name_or_path, model_cfg.llm.chat_template)
    image_tokens = _image_tokens(model_cfg, arch, tokenizer)
    for stage in cfg.stages:
        if stage.kind != "vlm" or (args.stage and stage.name != args.stage):
            continue
        specs = [dataclasses.replace(s, limit=args.n) for s in stage.data]
        data = ConversationData(specs, tokenizer, image_tokens, stage.max_length, stage.on_bad_record)
        print(f"== stage {stage.name}: {dict(data.counts)}")
        for sample in data.samples:
            print(format_sample(sample, tokenizer) + "\n")
    return 0


def _image_tokens(cfg: ModelConfig, arch: dict | None, tokenizer: PreTrainedTokenizerBase) -> int:
    """Image tokens per image for this model, from the tower and projector (built without the LLM:
    stand-in word embeddings of width 8 are enough to count tokens)."""
    tower = build_vision_tower(cfg.vision, arch)
    words = torch.zeros(len(tokenizer), 8)
    context = ProjectorContext(tower.hidden_size, 8, tower.grid, words, tokenizer)
    return build_projector(cfg.projector, context).num_tokens(tower.num_tokens)
