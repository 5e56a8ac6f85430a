"""FSDP2-sharded checkpoints: 2 CPU processes (gloo) save full weights once, and resume bit for bit.

The worker (`_fsdp_worker.py`, run by torchrun) shards a tiny tied-embedding Llama with `fully_shard`,
checkpoints it after 3 steps and trains 2 more; a fresh sharded model from another seed, restored with
`load_training_state`, trains the same 2 steps. Here, one unsharded process reads that checkpoint back.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _fsdp_worker import CONFIG, SAVED_AT
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

from vistune.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_fsdp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, dict]:
    """The worker's output folder and its results, after one torchrun of 2 processes."""
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(WORKER), str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return out, json.loads((out / "results.json").read_text(encoding="utf-8"))


def _path(out: Path) -> Path:
    return out / "checkpoints" / f"stage0-step{SAVED_AT:08d}"


@pytest.mark.slow  # torchrun with 2 processes: about 20 s on 2 cores
def test_weights_were_sharded_and_saved_full_and_once(fsdp_run):
    out, results = fsdp_run
    declared = {k: tuple(v.shape) for k, v in LlamaForCausalLM(LlamaConfig(**CONFIG)).state_dict().items()}
    # The workers really trained sharded weights: DTensors, each rank holding half of every parameter.
    assert results["world_size"] == 2 and results["all_dtensor"] and results["tied_in_model"]
    assert results["local_shapes"]["model.embed_tokens.weight"] == [32, 32]
    assert results["gathered_sizes"] == [len(declared), 0]  # the full state is gathered on rank 0 only
    path = _path(out)
    assert Path(results["checkpoint"]) == path and (path / ckpt.COMPLETE).is_file()
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    # Full (unsharded) shapes; the tied lm_head is stored once, as an alias of the embedding.
    assert ckpt.read_info(path)["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert stored == {k: s for k, s in declared.items() if k != "lm_head.weight"}
    assert stored["model.embed_tokens.weight"] == (64, 32)


@pytest.mark.slow
def test_sharded_resume_is_bit_identical(fsdp_run):
    _, results = fsdp_run
    assert results["info_step"] == SAVED_AT and results["still_dtensor"]
    assert results["fresh_equal"] == []  # the fresh model (another seed) agreed with nothing beforehand
    # The restored state is the saved one: weights, AdamW moments and steps, hyper-parameters, schedule.
    assert results["loaded_vs_saved"]["equal"], results["loaded_vs_saved"]
    assert results["moved_after_checkpoint"]  # the 2 further steps changed the state ...
    resumed = results["resumed_vs_straight"]  # ... and the resumed run took exactly the same ones
    assert resumed["equal"] and resumed["max_abs_diff"] == 0.0, resumed
    assert resumed["n_tensors"] == 21 + 3 * 20  # 21 weight names (one tied), AdamW's 3 tensors for 20


@pytest.mark.slow
def test_sharded_checkpoint_loads_into_one_unsharded_process(fsdp_run):
    out, _ = fsdp_run
    gathered = load_file(str(out / "gathered.safetensors"))  # what rank 0 gathered and saved
    torch.manual_seed(7)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01, betas=(0.8, 0.95))
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=10)
    ckpt.load_weights(_path(out), model)
    state = model.state_dict()
    assert state.keys() == {k.removeprefix("model/") for k in gathered if k.startswith("model/")}
    for name, tensor in state.items():
        assert torch.equal(tensor, gathered[f"model/{name}"]), name
    assert model.lm_head.weight is model.model.embed_tokens.weight

    rng = ckpt.rng_state()  # load_training_state restores the workers' RNG; keep this process's own
    try:
        info = ckpt.load_training_state(_path(out), model, optimizer, scheduler)
    finally:
        ckpt.set_rng_state(rng)
    assert info["step"] == SAVED_AT and scheduler.last_epoch == SAVED_AT
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.95)  # a tuple again, as AdamW was built
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    for param, entry in optim["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, gathered[f"optim/{param}/{key}"]), (param, key)
