"""Worker for tests/train/test_fsdp.py, run by torchrun on 2 CPU processes (gloo): FSDP2 save and resume.

Trains a tiny tied-embedding Llama, sharded with `fully_shard`, for 3 steps; checkpoints it with
`gather_state` + `save_checkpoint`; trains 2 more steps. Then a fresh, identically sharded model built
from another seed is restored with `load_training_state` and trains the same 2 steps. Rank 0 writes what
it saw to `<out>/results.json`, and the states it gathered at the checkpoint to `<out>/gathered.safetensors`.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

from vistune.train import checkpoint as ckpt

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)  # fmt: skip
GLOBAL_BATCH, SEQ = 4, 12
SAVED_AT, MORE = 3, 2


def build(seed: int):
    """The sharded model (each decoder layer, then the root), its AdamW and cosine schedule."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01, betas=(0.8, 0.95))
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=10)
    return model, optimizer, scheduler


def step(model, optimizer, scheduler, n: int) -> None:
    """Training step `n` on a fixed global batch of its own; each rank takes its slice."""
    gen = torch.Generator().manual_seed(1000 + n)
    ids = torch.randint(0, CONFIG["vocab_size"], (GLOBAL_BATCH, SEQ), generator=gen)
    per_rank = GLOBAL_BATCH // dist.get_world_size()
    mine = ids[dist.get_rank() * per_rank : (dist.get_rank() + 1) * per_rank]
    model(input_ids=mine, labels=mine).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def tensors(state: ckpt.TrainingState) -> dict[str, torch.Tensor]:
    """All tensors of a gathered state, flat: model weights and optimizer moments/steps."""
    flat = {f"model/{k}": v for k, v in state.model.items()}
    for param, entry in state.optimizer["state"].items():
        flat |= {f"optim/{param}/{k}": v for k, v in entry.items() if torch.is_tensor(v)}
    return flat


def compare(a: ckpt.TrainingState, b: ckpt.TrainingState) -> dict:
    """Bit-for-bit comparison of two gathered states (rank 0, where they are full)."""
    ta, tb = tensors(a), tensors(b)
    same_keys = ta.keys() == tb.keys()
    unequal = sorted(k for k in ta if k in tb and not torch.equal(ta[k], tb[k]))
    max_diff = max(((ta[k].double() - tb[k].double()).abs().max().item() for k in ta if k in tb), default=0.0)
    groups_a = [{k: v for k, v in g.items() if k != "params"} for g in a.optimizer["param_groups"]]
    groups_b = [{k: v for k, v in g.items() if k != "params"} for g in b.optimizer["param_groups"]]
    return {
        "n_tensors": len(ta),
        "same_keys": same_keys,
        "unequal": unequal,
        "max_abs_diff": max_diff,
        "param_groups_equal": groups_a == groups_b,
        "param_group_diffs": [
            {k: [repr(ga.get(k)), repr(gb.get(k))] for k in ga.keys() | gb.keys() if ga.get(k) != gb.get(k)}
            for ga, gb in zip(groups_a, groups_b, strict=False)
        ],
        "scheduler_equal": a.scheduler == b.scheduler,
        "equal": same_keys and not unequal and groups_a == groups_b and a.scheduler == b.scheduler,
    }


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    results: dict = {"world_size": dist.get_world_size()}

    model, optimizer, scheduler = build(seed=0)
    params = dict(model.named_parameters())
    results["all_dtensor"] = all(isinstance(p, DTensor) for p in params.values())
    results["local_shapes"] = {k: list(p.to_local().shape) for k, p in params.items()}
    results["tied_in_model"] = model.lm_head.weight is model.model.embed_tokens.weight
    for n in range(SAVED_AT):
        step(model, optimizer, scheduler, n)
    saved = ckpt.gather_state(model, optimizer, scheduler)  # collective: every rank
    if rank == 0:
        path = ckpt.save_checkpoint(out, f"stage0-step{SAVED_AT:08d}", saved, {"step": SAVED_AT}, keep_last=2)
        results["checkpoint"] = str(path)
        save_file(
            {k: v.clone().contiguous() for k, v in tensors(saved).items()}, str(out / "gathered.safetensors")
        )
    sizes = [None] * dist.get_world_size()
    dist.all_gather_object(sizes, len(saved.model))  # with cpu_offload only rank 0 holds the full state
    results["gathered_sizes"] = sizes
    dist.barrier()
    path = out / "checkpoints" / f"stage0-step{SAVED_AT:08d}"
    for n in range(SAVED_AT, SAVED_AT + MORE):
        step(model, optimizer, scheduler, n)
    straight = ckpt.gather_state(model, optimizer, scheduler)

    model, optimizer, scheduler = build(seed=1)
    before = ckpt.gather_state(model, optimizer)
    info = ckpt.load_training_state(path, model, optimizer, scheduler)
    results["info_step"] = info["step"]
    results["still_dtensor"] = all(isinstance(p, DTensor) for p in model.parameters())
    loaded = ckpt.gather_state(model, optimizer, scheduler)
    for n in range(SAVED_AT, SAVED_AT + MORE):
        step(model, optimizer, scheduler, n)
    resumed = ckpt.gather_state(model, optimizer, scheduler)

    if rank == 0:
        # Names whose fresh weights equal the checkpoint's (none should: nothing agrees by accident).
        results["fresh_equal"] = sorted(
            k for k in saved.model if torch.equal(before.model[k], saved.model[k])
        )
        results["loaded_vs_saved"] = compare(loaded, saved)
        results["resumed_vs_straight"] = compare(resumed, straight)
        results["moved_after_checkpoint"] = not compare(straight, saved)["equal"]
        (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    dist.barrier()


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's teardown at interpreter exit sometimes aborts on this torch build
