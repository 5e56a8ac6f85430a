"""Worker for tests/train/test_fsdp_vlm.py, run by torchrun on 2 CPU processes (gloo): a sharded `vlm` stage.

Builds the tiny VLM (same seed on both ranks: the same weights), its `VLMObjective` for a stage that trains
the projector and the LLM (the tower is frozen), and shards it as accelerate's TRANSFORMER_BASED_WRAP would:
each decoder layer, then the objective as the root (the tower and the projector stay in the root's group).
Trains 3 steps, each rank on micro-batches of its own, once with the feature cache and once without; then
gathers the full state (a collective) and saves the model dir with `save_vlm` on rank 0.

Usage: `_fsdp_vlm_worker.py OUT LLM_DIR DATA_JSON IMAGE_ROOT`. Rank 0 writes `OUT/results.json`, and per
mode (`cache`, `nocache`): `model-<mode>/` (the saved model dir), `gathered-<mode>.safetensors` (the state
it was saved from) and `init-<mode>.safetensors` (the weights before training).
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
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from vistune.config import DataSpec, LLMConfig, ModelConfig, ProjectorConfig, Stage, VisionConfig
from vistune.model.vlm import build_vlm, save_vlm
from vistune.train.checkpoint import gather_state
from vistune.train.objective import StageContext, build_batch
from vistune.train.trainable import set_trainable
from vistune.train.vlm import VLMObjective

SEED = 0
STEPS = 3
MODES = {"cache": True, "nocache": False}  # stage.options.cache_features
TOWER = dict(kind="clip", image_size=16, patch_size=4, hidden_size=16, num_layers=1, num_heads=2,
             intermediate_size=32)  # fmt: skip


def model_config(llm_dir: str | Path) -> ModelConfig:
    """The tiny VLM: a 16 px CLIP tower (4x4 patches), mlp2x_gelu, the tiny Llama with ChatML."""
    return ModelConfig(
        vision=VisionConfig(**TOWER),
        projector=ProjectorConfig(name="mlp2x_gelu"),
        llm=LLMConfig(name_or_path=str(llm_dir), chat_template="chatml"),
    )


def make_stage(data: str | Path, image_root: str | Path, cache: bool | None = None) -> Stage:
    """The instruct stage: projector and LLM learn, the tower is frozen."""
    return Stage(
        name="instruct",
        kind="vlm",
        train=["projector", "llm"],
        data=[DataSpec(path=str(data), image_root=str(image_root))],
        batch_size=2,
        max_length=128,
        options={"cache_features": cache},
    )


def micro_batch(step: int, rank: int) -> list[int]:
    """Dataset indices of a rank's micro-batch at a step: every rank and step takes records of its own."""
    first = 4 * step + 2 * rank
    return [first, first + 1]


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # clone: tied weights share a tensor, which safetensors refuses to write twice
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(path))


def run(mode: str, out: Path, llm_dir: str, data: str, image_root: str) -> dict:
    """Build, shard and train one model; save it on rank 0; return what this rank saw."""
    rank = dist.get_rank()
    torch.manual_seed(SEED)
    model = build_vlm(model_config(llm_dir))
    stage = make_stage(data, image_root, MODES[mode])
    objective = VLMObjective(stage, model, StageContext(torch.device("cpu"), out, rank == 0))
    if rank == 0:
        _save(model.state_dict(), out / f"init-{mode}.safetensors")
    seen: dict = {"cache": objective.cache}

    # Freeze the tower before sharding, so that every FSDP group knows which of its parameters learn ...
    early = set_trainable(objective, objective.parts(), stage)
    for layer in model.llm.model.layers:
        fully_shard(layer)
    fully_shard(objective)
    # ... but take AdamW's groups after it: fully_shard replaces every parameter with a sharded one, so
    # groups taken before hold parameters the model no longer has (AdamW would then silently not step).
    groups = set_trainable(objective, objective.parts(), stage)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)

    params = dict(objective.named_parameters())
    current = {id(p) for p in params.values()}
    trainable = {id(p) for p in params.values() if p.requires_grad}
    in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
    optimized = {id(p) for p in in_optimizer}
    seen |= {
        "fsdp_modules": [isinstance(m, FSDPModule) for m in (objective, *model.llm.model.layers)],
        "all_dtensor": all(isinstance(p, DTensor) for p in params.values()),
        "early_params_in_model": sum(id(p) in current for g in early for p in g["params"]),
        "optimizer_is_trainable": len(in_optimizer) == len(trainable) == len(optimized & trainable),
        "frozen_tower": not any(p.requires_grad for p in model.vision.parameters()),
        "trainable_projector": all(p.requires_grad for p in model.projector.parameters()),
        "tied_in_model": model.llm.lm_head.weight is model.llm.model.embed_tokens.weight,
        "losses": [],
        "batch_keys": [],
        "new_images": [],
    }
    for step in range(STEPS):
        batch = build_batch(objective, micro_batch(step, rank))
        seen["batch_keys"].append(sorted(batch))
        seen["new_images"].append(len(batch.get("new_images", {})))
        loss = objective(batch) / objective.count(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seen["losses"].append(loss.item())
    seen["cached_features"] = len(objective._features)

    state = gather_state(model).model  # collective: every rank; full tensors on rank 0 only
    seen["gathered_size"] = len(state)
    if rank == 0:
        seen["gathered_tied"] = state["llm.lm_head.weight"] is state["llm.model.embed_tokens.weight"]
        seen["gathered_dtensor"] = any(isinstance(v, DTensor) for v in state.values())
        save_vlm(model, out / f"model-{mode}", state)
        _save(state, out / f"gathered-{mode}.safetensors")
    dist.barrier()
    return seen


TEXT_ONLY = [12, 13]  # records without an image (the test writes them after the image records)


def run_text_only(out: Path, llm_dir: str, data: str, image_root: str) -> dict:
    """Two steps in which rank 1's micro-batch holds no image at step 1 while rank 0's does: the
    projector's gradients must still be reduced on both (before, FSDP's collective broke on it)."""
    rank = dist.get_rank()
    torch.manual_seed(SEED)
    model = build_vlm(model_config(llm_dir))
    stage = make_stage(data, image_root)
    objective = VLMObjective(stage, model, StageContext(torch.device("cpu"), out, rank == 0))
    set_trainable(objective, objective.parts(), stage)
    for layer in model.llm.model.layers:
        fully_shard(layer)
    fully_shard(objective)
    optimizer = torch.optim.AdamW(set_trainable(objective, objective.parts(), stage), lr=1e-3)
    before = model.projector.net[0].weight.to_local().clone()
    losses = []
    for step in range(2):
        indices = TEXT_ONLY if (rank, step) == (1, 1) else micro_batch(step, rank)
        batch = build_batch(objective, indices)
        loss = objective(batch) / objective.count(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    changed = not torch.equal(before, model.projector.net[0].weight.to_local())
    return {"losses": losses, "projector_changed": changed, "text_only_batch": rank == 1}


def main(out: Path, llm_dir: str, data: str, image_root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    results: dict = {"world_size": dist.get_world_size()}
    for mode in MODES:
        seen = run(mode, out, llm_dir, data, image_root)
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, seen)
        results[mode] = per_rank
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, run_text_only(out, llm_dir, data, image_root))
    results["text_only"] = per_rank
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    dist.barrier()


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]), *sys.argv[2:5])
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's teardown at interpreter exit sometimes aborts on this torch build
