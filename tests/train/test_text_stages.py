"""The text pretraining kinds through the one training loop: each reports its figure, hands its encoder on
(to a later encoder stage, and to a contrastive stage as its text tower), and every one of them resumes
exactly after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TOWERS
from helpers import write_pairs
from safetensors.torch import load_file
from test_loop import kill_and_resume
from text_corpus import write_tiny_corpus

from vistune.commands.train import train
from vistune.config import config_from_dict
from vistune.model.contrastive import load_contrastive
from vistune.model.scratch import ScratchModel

ENCODER = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"))


def text_cfg(corpus: Path, out: Path, steps: int = 3) -> dict:
    """clm on a tiny scratch decoder, then mlm, nsp (on the mlm encoder) and plm (a new encoder)."""
    common = {"data": [{"path": "train.jsonl"}], "train": ["llm"], "batch_size": 4, "max_steps": steps,
              "max_length": 32, "lr": 0.01}  # fmt: skip
    new = {"tokenizer": str(corpus / "wordpiece"), "encoder": ENCODER}
    return {
        "data_root": str(corpus),
        "out": str(out),
        "save_every": 2,
        "keep_last": 2,
        "log_every": 1,
        "model": {
            "vision": TOWERS["clip"],
            "llm": {
                "name_or_path": str(corpus / "bpe"),
                "from_config": {"model_type": "vistune_scratch", **ENCODER},
            },
        },  # fmt: skip
        "stages": [
            {"name": "clm", "kind": "clm", **common},
            {"name": "mlm", "kind": "mlm", **common, "options": new},
            {"name": "nsp", "kind": "nsp", **common, "options": {"start": "stage:mlm"}},
            {"name": "plm", "kind": "plm", **common, "options": {**new, "predict": 0.25}},
        ],
    }


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The run's LLM and every encoder its stages wrote."""
    out = {f"llm.{k}": v for k, v in load_file(model_dir / "llm" / "model.safetensors").items()}
    for stage in ("mlm", "nsp", "plm"):
        encoder = load_file(model_dir.parent / "stages" / stage / "model.safetensors")
        out |= {f"{stage}.{k}": v for k, v in encoder.items()}
    return out


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("full")
    model_dir = train(config_from_dict(text_cfg(corpus, out)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"weights": weights(model_dir), "rows": rows}


def test_each_kind_reports_its_figure_and_writes_its_encoder(uninterrupted):
    figures = {row["stage"]: set(row) for row in uninterrupted["rows"] if "stage" in row}
    assert "ppl" in figures["clm"] and "masked_acc" in figures["mlm"]
    assert "nsp_acc" in figures["nsp"] and "ppl" in figures["plm"]
    w = uninterrupted["weights"]
    # nsp went on from the mlm encoder: same shape, new weights
    assert w["mlm.nsp_head.weight"].shape == w["nsp.nsp_head.weight"].shape
    assert not torch.equal(
        w["mlm.model.layers.0.mlp.up_proj.weight"], w["nsp.model.layers.0.mlp.up_proj.weight"]
    )


# Optimizer steps over the run: 3 clm, 3 mlm, 3 nsp, 3 plm. Killed at the n-th: inside clm after its
# step-2 checkpoint (3), at the start of mlm (4), inside mlm (6), at the start of nsp (7: it loads the mlm
# encoder), inside nsp (9) and inside plm (12).
@pytest.mark.parametrize("kill_at", [3, 4, 6, 7, 9, 12])
def test_each_text_kind_resumes_exactly_after_a_kill(corpus, tmp_path, monkeypatch, uninterrupted, kill_at):
    cfg = text_cfg(corpus, tmp_path / "run")
    resumed = kill_and_resume(cfg, monkeypatch, kill_at, read=weights)
    expected = uninterrupted["weights"]
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key


def test_a_contrastive_stage_takes_the_mlm_encoder_as_its_text_tower(corpus, tmp_path):
    pairs, images = write_pairs(tmp_path / "pairs")
    cfg = text_cfg(corpus, tmp_path / "run", steps=2)
    contrastive = {"name": "clip", "kind": "contrastive", "train": ["vision"],
                   "data": [{"path": pairs, "image_root": images}], "batch_size": 4, "max_steps": 2,
                   "max_length": 16, "lr": 0.01,
                   "options": {"text_tower": "stage:mlm", "embed_dim": 8}}  # fmt: skip
    cfg["stages"] = [cfg["stages"][1], contrastive]
    train(config_from_dict(cfg))
    clip = load_contrastive(tmp_path / "run" / "stages" / "clip")  # rebuilt offline, weights loaded
    assert isinstance(clip.text.model, ScratchModel)
    encoder = load_file(tmp_path / "run" / "stages" / "mlm" / "model.safetensors")
    # the tower started from the mlm encoder (the vision-only stage leaves the text tower as it was)
    assert torch.equal(
        clip.text.model.layers[0].mlp.up_proj.weight, encoder["model.layers.0.mlp.up_proj.weight"]
    )
