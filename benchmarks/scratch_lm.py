"""Training throughput of vistune's own decoder against transformers' LlamaForCausalLM of the same shape.

    python benchmarks/scratch_lm.py [--steps 20] [--rounds 5] [--batch-size 8] [--length 128]
                                    [--hidden 128] [--layers 4] [--device cpu]

Both models start from the same weights (the decoder's state dict loads into the Llama as it is) and
train with AdamW on the same blocks of Python's documentation (`vistune.data.texts.python_docs`,
byte-level BPE of 8192 tokens learned from it), each through its own `forward(input_ids, labels)`. The
two take turns, `--steps` optimizer steps each per round, so drift on a shared machine hits both; the
figure per model is its median tokens/s over the rounds, and the ratio is ours over Llama's. The loss
after the last round is printed for each: the same weights and data, so they stay close.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaForCausalLM

from vistune.data.texts import python_docs
from vistune.data.vocab import train_bpe
from vistune.model.scratch import ScratchConfig, ScratchForCausalLM, llama_config
from vistune.train.text import blocks, token_stream


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rows: torch.Tensor,
                first: int, steps: int, batch: int) -> tuple[float, float]:  # fmt: skip
    """`steps` optimizer steps on batches of rows from `first`: (seconds, last loss)."""
    if rows.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(first, first + steps):
        index = torch.arange(step * batch, (step + 1) * batch) % len(rows)
        ids = rows[index]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if rows.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, loss.item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per model per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--length", type=int, default=128, help="tokens per block")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    texts = list(python_docs().values())
    tokenizer = train_bpe(texts, 8192)
    rows = blocks(token_stream(texts, tokenizer, tokenizer.eos_token_id), args.length).to(device)
    torch.manual_seed(0)
    width = args.hidden
    config = ScratchConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=3 * width,
                           num_hidden_layers=args.layers, num_attention_heads=max(1, width // 32),
                           max_position_embeddings=args.length)  # fmt: skip
    ours = ScratchForCausalLM(config).to(device).train()
    llama = LlamaForCausalLM(llama_config(config)).to(device).train()
    llama.load_state_dict(ours.state_dict())
    models = {"scratch": ours, "llama": llama}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    millions = sum(p.numel() for p in ours.parameters()) / 1e6
    print(f"{millions:.2f}M parameters, {len(rows)} blocks of {args.length} tokens, batch {args.batch_size}, "
          f"{args.steps} steps x {args.rounds} rounds each, {device}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    for name, model in models.items():  # warm-up: allocator, kernels
        train_steps(model, optimizers[name], rows, 0, 2, args.batch_size)
    rates: dict[str, list[float]] = {name: [] for name in models}
    losses: dict[str, float] = {}
    tokens = args.steps * args.batch_size * args.length
    for r in range(args.rounds):
        for name, model in models.items():
            seconds, losses[name] = train_steps(
                model, optimizers[name], rows, 2 + r * args.steps, args.steps, args.batch_size
            )
            rates[name].append(tokens / seconds)
    for name in models:
        shown = ", ".join(f"{x:.0f}" for x in rates[name])
        print(f"{name:8s} {statistics.median(rates[name]):9.0f} tokens/s (median of {args.rounds}; "
              f"rounds {shown}), last loss {losses[name]:.4f}")  # fmt: skip
    ratio = statistics.median(rates["scratch"]) / statistics.median(rates["llama"])
    print(f"ratio scratch / llama: {ratio:.3f}x")


if __name__ == "__main__":
    main()
