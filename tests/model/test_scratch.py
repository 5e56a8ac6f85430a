"""vistune's own Transformer: the decoder is LlamaForCausalLM (same weights, same logits), generates with
its cache like it, saves and loads as safetensors, builds from `llm.from_config`; the encoder sees both
ways, and a layout Llama cannot hold is refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, LlamaForCausalLM

from vistune.model.llm import llm_from_config
from vistune.model.scratch import (
    ScratchConfig,
    ScratchForCausalLM,
    ScratchForPreTraining,
    build_mask,
    llama_config,
    register_scratch,
)

SHAPE = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 64, "initializer_range": 0.3}  # fmt: skip


def pair(**fields) -> tuple[ScratchForCausalLM, LlamaForCausalLM]:
    """A random decoder and the Llama that holds its weights, both fp32 and in eval mode."""
    torch.manual_seed(0)
    ours = ScratchForCausalLM(ScratchConfig(**(SHAPE | fields))).eval()
    llama = LlamaForCausalLM(llama_config(ours.config)).eval()
    missing, unexpected = llama.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: the embeddings hold it
    return ours, llama


@pytest.mark.parametrize("fields", [{}, {"num_key_value_heads": 2}, {"tie_word_embeddings": False}])
def test_decoder_logits_equal_llamas(fields):
    ours, llama = pair(**fields)
    ids = torch.randint(SHAPE["vocab_size"], (3, 19))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, llama(ids).logits, atol=1e-5, rtol=0)
        # left padding: the real tokens' logits agree
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        a, b = ours(ids, attention_mask=mask).logits, llama(ids, attention_mask=mask).logits
        assert torch.allclose(a[0, 5:], b[0, 5:], atol=1e-5, rtol=0)
        assert torch.allclose(a[1:], b[1:], atol=1e-5, rtol=0)


def test_decoder_generates_what_llama_generates_with_its_cache():
    ours, llama = pair()
    prompt = torch.randint(SHAPE["vocab_size"], (2, 6))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    kwargs = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(ours.generate(prompt, **kwargs), llama.generate(prompt, **kwargs))


def test_saved_decoder_loads_through_the_auto_classes(tmp_path):
    ours, _ = pair()
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    register_scratch()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ScratchForCausalLM)
    ids = torch.randint(SHAPE["vocab_size"], (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ours(ids).logits)
    assert type(AutoModel.from_pretrained(tmp_path)).__name__ == "ScratchModel"  # a text tower's body


def test_llm_from_config_builds_the_scratch_decoder(smollm2_tokenizer):
    fields = {"model_type": "vistune_scratch", "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 1, "num_attention_heads": 2}  # fmt: skip
    llm = llm_from_config(fields, smollm2_tokenizer, torch.float32)
    assert isinstance(llm, ScratchForCausalLM)
    assert llm.config.vocab_size == len(smollm2_tokenizer)
    assert llm.config.eos_token_id == smollm2_tokenizer.eos_token_id


def test_packed_rows_attend_within_each_record():
    ours, _ = pair()
    a, b = torch.randint(SHAPE["vocab_size"], (1, 5)), torch.randint(SHAPE["vocab_size"], (1, 7))
    packed = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        together = ours(packed, position_ids=positions).logits
        assert torch.allclose(together[:, :5], ours(a).logits, atol=1e-5)
        assert torch.allclose(together[:, 5:], ours(b).logits, atol=1e-5)


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_the_encoder_sees_both_ways(positions):
    torch.manual_seed(0)
    encoder = ScratchForPreTraining(ScratchConfig(**SHAPE, causal=False, positions=positions)).eval()
    ids = torch.randint(5, SHAPE["vocab_size"], (1, 8))
    changed = ids.clone()
    changed[0, -1] = 4
    with torch.no_grad():
        first, again = encoder(ids)[0, 0], encoder(changed)[0, 0]
    assert not torch.allclose(first, again)  # the first token's state reads the last token


def test_padding_keys_are_hidden_and_a_query_with_nothing_to_see_is_not_nan():
    padding = torch.tensor([[0, 0, 1, 1]])
    mask = build_mask(padding, queries=4, past=0, causal=True, packed=None, device=padding.device)
    assert mask.shape == (1, 1, 4, 4)
    assert not mask[0, 0, 3, :2].any() and mask[0, 0, 3, 2:].all()
    assert mask[0, 0, 0].all()  # a padding query with no key to see looks everywhere (never used)
    assert build_mask(None, 4, 0, True, None, padding.device) is None  # SDPA's own causal kernel


def test_segment_embeddings_tell_sentence_a_from_b():
    torch.manual_seed(0)
    encoder = ScratchForPreTraining(ScratchConfig(**SHAPE, causal=False, type_vocab_size=2)).eval()
    ids = torch.randint(5, SHAPE["vocab_size"], (1, 8))
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        assert torch.equal(encoder(ids), encoder(ids, token_type_ids=torch.zeros_like(ids)))  # A by default
        assert not torch.allclose(encoder(ids), encoder(ids, token_type_ids=types))


@pytest.mark.parametrize("fields", [{"causal": False}, {"positions": "learned"}, {"type_vocab_size": 2}])
def test_a_layout_llama_cannot_hold_is_refused(fields):
    with pytest.raises(ValueError, match="no Llama equivalent"):
        llama_config(ScratchConfig(**SHAPE, **fields))
