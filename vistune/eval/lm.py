"""Held-out scores of the text pretraining objectives: `vistune eval --task lm`.

The same objectives that trained the model (`vistune.train.text`, `masked`, `permuted`) score it on
held-out documents, in eval mode and without gradients, with their random draws (masks, random
sentences, permutation orders) seeded by `--seed`, so two models scored with the same seed see the same
masked positions and the same pairs:

    clm: perplexity of every next token of the held-out blocks (a run's OUT/model, or an LLM directory),
         with `--unigram TRAIN` also that of a unigram model of the training text (add-one smoothed
         token counts under the same tokenizer): the floor a language model must beat
    mlm: masked-token accuracy and perplexity of the masked tokens (an encoder an mlm stage wrote)
    nsp: next-sentence accuracy over pairs of which half are random, and beside it that of the best
         threshold on the word overlap of A and B (`overlap_accuracy`): how far words alone go
    plm: perplexity of the permutation targets
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vistune.config import DataSpec
from vistune.data.texts import read_texts
from vistune.eval.command import positive_int
from vistune.model.scratch import register_scratch
from vistune.train.masked import MLMObjective, NSPObjective, SentencePairs, mlm_blocks
from vistune.train.objective import build_batch
from vistune.train.permuted import PLMObjective
from vistune.train.text import CLMObjective, Tally, blocks, load_encoder, token_stream

OBJECTIVES = ("clm", "mlm", "nsp", "plm")


def run_objective(objective: torch.nn.Module, batch_size: int) -> dict[str, float]:
    """Every example of `objective` once, in order, without gradients: its tallied figures
    (`loss` is the mean per target)."""
    objective.eval()
    objective.tally = Tally()
    with torch.no_grad():
        for start in range(0, len(objective), batch_size):
            objective(build_batch(objective, list(range(start, min(start + batch_size, len(objective))))))
    return objective.tally.read()


def unigram_perplexity(train: list[int], targets: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of `targets` under add-one smoothed token frequencies of the `train` stream."""
    counts = Counter(train)
    total = len(train) + vocab_size
    nll = -sum(n * math.log((counts[t] + 1) / total) for t, n in Counter(targets.flatten().tolist()).items())
    return math.exp(nll / targets.numel())


def overlap_accuracy(pairs: SentencePairs) -> float:
    """The best accuracy of one rule on every pair: IsNext when the Jaccard overlap of A's and B's token
    sets exceeds a threshold, the threshold chosen on these same pairs (so an upper bound for the rule)."""
    scored = []
    for index in range(len(pairs)):
        a, b, follows = pairs.pair(index)
        row = pairs.encode(a, b)
        sep = row.index(pairs.sep)
        first, second = set(row[1:sep]), set(row[sep + 1 : -1])
        scored.append((len(first & second) / max(1, len(first | second)), follows))
    scored.sort()
    # threshold below the k-th smallest score: the k lowest say NotNext, the rest IsNext
    right = best = sum(f for _, f in scored)  # k = 0: every pair called IsNext
    for _, follows in scored:  # one more pair called NotNext
        right += -1 if follows else 1
        best = max(best, right)
    return best / len(scored)


def causal_scores(model_dir: Path, texts: list[str], max_length: int, batch_size: int,
                  unigram: Path | None) -> dict[str, float]:  # fmt: skip
    """Held-out perplexity of a causal LM (`model_dir`: a run's OUT/model or an LLM directory)."""
    llm_dir = model_dir / "llm" if (model_dir / "vistune.json").is_file() else model_dir
    register_scratch()
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    rows = blocks(token_stream(texts, tokenizer, tokenizer.eos_token_id), max_length + 1, overlap=1)
    figures = run_objective(CLMObjective(llm, rows, torch.device("cpu")), batch_size)
    out = {"ppl": math.exp(figures["loss"]), "loss": figures["loss"], "targets": rows[:, 1:].numel()}
    if unigram is not None:
        train = token_stream(read_texts(DataSpec(path=str(unigram))), tokenizer, tokenizer.eos_token_id)
        out["unigram_ppl"] = unigram_perplexity(train, rows[:, 1:], len(tokenizer))
    return out


def encoder_scores(objective: str, model_dir: Path, texts: list[str], max_length: int, batch_size: int,
                   seed: int, predict: float = 1 / 6) -> dict[str, float]:  # fmt: skip
    """Held-out figures of an encoder (`model_dir`: what an mlm, nsp or plm stage wrote)."""
    encoder, tokenizer = load_encoder(model_dir)
    device = torch.device("cpu")
    if objective == "mlm":
        built = MLMObjective(encoder, tokenizer, mlm_blocks(texts, tokenizer, max_length), 0.15, device)
    elif objective == "nsp":
        built = NSPObjective(encoder, tokenizer, SentencePairs(texts, tokenizer, max_length, seed), device)
        overlap = overlap_accuracy(built.pairs)
    else:
        rows = blocks(token_stream(texts, tokenizer, tokenizer.sep_token_id), max_length)
        built = PLMObjective(encoder, tokenizer, rows, predict, device)
    torch.manual_seed(seed)  # masks and permutation orders
    figures = run_objective(built, batch_size)
    if objective in ("mlm", "plm"):
        figures["ppl"] = math.exp(figures["loss"])
    else:
        figures["overlap_baseline_acc"] = overlap
    figures["examples"] = len(built)
    return figures


def main_eval_lm(argv: list[str] | None = None) -> int:
    """`vistune eval --task lm`: held-out scores of a text model for one pretraining objective."""
    p = argparse.ArgumentParser(prog="vistune eval --task lm", description=main_eval_lm.__doc__)
    p.add_argument(
        "model_dir", help="a run's OUT/model or LLM directory (clm), or an encoder (mlm, nsp, plm)"
    )
    p.add_argument("--objective", required=True, choices=OBJECTIVES)
    p.add_argument("--data", required=True, help="held-out text: .jsonl of {text: ...} or .txt")
    p.add_argument("--unigram", help="clm: the training text, for a unigram model's perplexity beside it")
    p.add_argument("--max-length", type=positive_int, default=128, help="tokens per block or pair")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--predict", type=float, default=1 / 6, help="plm: share of each block predicted")
    p.add_argument("--seed", type=int, default=0, help="masks, random sentences and orders")
    p.add_argument("--out", help="folder for metrics.json")
    args = p.parse_args(argv)
    texts = read_texts(DataSpec(path=args.data))
    model_dir = Path(args.model_dir)
    if args.objective == "clm":
        unigram = Path(args.unigram) if args.unigram else None
        figures = causal_scores(model_dir, texts, args.max_length, args.batch_size, unigram)
    else:
        if args.unigram:
            raise ValueError("--unigram is a causal LM's baseline (--objective clm)")
        figures = encoder_scores(
            args.objective, model_dir, texts, args.max_length, args.batch_size, args.seed, args.predict
        )
    result = {"objective": args.objective, "model": str(model_dir), "data": args.data, **figures}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "metrics.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0
