"""The text pretraining objectives: BERT's masking (shapes, 15% chosen, 80/10/10, specials never),
next-sentence pairs (exactly half random, from another document), XLNet's two-stream attention (a target's
query stream never sees its own token), the corpus split by document, and the held-out scores."""

from __future__ import annotations

import json
import math

import pytest
import torch
from text_corpus import write_tiny_corpus
from transformers import AutoTokenizer

from vistune.config import DataSpec
from vistune.data.texts import read_texts, sentences, split_documents, write_corpus
from vistune.eval.lm import main_eval_lm, overlap_accuracy, unigram_perplexity
from vistune.model.scratch import ScratchConfig, ScratchForPreTraining
from vistune.train.masked import NSPObjective, SentencePairs, mask_tokens, mlm_blocks
from vistune.train.objective import build_batch
from vistune.train.permuted import permutation_masks


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def texts(corpus):
    return read_texts(DataSpec(path=str(corpus / "train.jsonl")))


def test_mlm_masks_15_percent_of_non_special_tokens_80_10_10():
    torch.manual_seed(0)
    rows, length, chosen, mask_id, vocab = 400, 128, 19, 4, 1000
    ids = torch.randint(5, vocab, (rows, length))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True  # [CLS] ... [SEP]
    inputs, positions = mask_tokens(ids, special, chosen, mask_id, vocab)
    assert inputs.shape == ids.shape and positions.shape == (rows, chosen)
    assert not special.gather(1, positions).any()  # specials are never chosen
    assert all(len(set(row.tolist())) == chosen for row in positions)  # distinct positions
    unchosen = torch.ones_like(special).scatter(1, positions, False)
    assert torch.equal(inputs[unchosen], ids[unchosen])  # only chosen positions change
    got, original = inputs.gather(1, positions), ids.gather(1, positions)
    n = got.numel()
    masked = (got == mask_id).float().sum() / n
    kept = (got == original).float().sum() / n
    randomised = ((got != mask_id) & (got != original)).float().sum() / n
    # 7600 draws: each share within ~4 standard deviations of 0.8, 0.1 (+1/vocab of random draws
    # that land on the original), 0.1
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.015 and abs(randomised - 0.1) < 0.015


def test_mlm_blocks_are_cls_body_sep(corpus, texts):
    tokenizer = AutoTokenizer.from_pretrained(corpus / "wordpiece")
    rows = mlm_blocks(texts, tokenizer, 32)
    assert rows.shape[1] == 32 and len(rows) > 10
    assert (rows[:, 0] == tokenizer.cls_token_id).all() and (rows[:, -1] == tokenizer.sep_token_id).all()


def test_nsp_pairs_are_half_random_and_random_ones_come_from_another_document(corpus, texts):
    tokenizer = AutoTokenizer.from_pretrained(corpus / "wordpiece")
    pairs = SentencePairs(texts, tokenizer, max_length=48, seed=7)
    batch = pairs.batch(list(range(len(pairs))))
    assert batch["labels"].sum().item() * 2 == len(pairs)
    for index in range(len(pairs)):
        a, b, follows = pairs.pair(index)
        assert follows == (index % 2 == 0)
        assert (b == a + 1 and pairs.doc[a] == pairs.doc[b]) if follows else pairs.doc[a] != pairs.doc[b]
    assert pairs.pair(5) == SentencePairs(texts, tokenizer, 48, seed=7).pair(5)  # the same every epoch
    ids, mask = batch["ids"], batch["attention_mask"]
    assert ids.shape[1] <= 48 and (ids[:, 0] == tokenizer.cls_token_id).all()
    assert ((ids == tokenizer.sep_token_id) & mask.bool()).sum(1).eq(2).all()  # [CLS] A [SEP] B [SEP]
    for row, types, real in zip(ids.tolist(), batch["token_type_ids"].tolist(), mask.tolist(), strict=True):
        b_starts, length = row.index(tokenizer.sep_token_id) + 1, sum(real)
        assert types == [0] * b_starts + [1] * (length - b_starts) + [0] * (len(row) - length)


def test_a_small_encoder_learns_to_tell_next_spans_from_random_ones(corpus, texts):
    tokenizer = AutoTokenizer.from_pretrained(corpus / "wordpiece")
    torch.manual_seed(0)
    config = ScratchConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, causal=False, type_vocab_size=2,
                           pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    encoder = ScratchForPreTraining(config)
    pairs = SentencePairs(texts, tokenizer, max_length=48, seed=0)
    objective = NSPObjective(encoder, tokenizer, pairs, torch.device("cpu"))
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=3e-3)
    batch = build_batch(objective, list(range(32)))
    for _ in range(60):
        (objective(batch) / 32).backward()
        optimizer.step()
        optimizer.zero_grad()
    objective.tally.read()
    objective(batch)
    assert objective.tally.read()["nsp_acc"] == 1.0  # the 32 pairs it saw, told apart


def test_word_overlap_baseline_is_at_least_half(corpus, texts):
    tokenizer = AutoTokenizer.from_pretrained(corpus / "wordpiece")
    pairs = SentencePairs(texts, tokenizer, max_length=48, seed=0)
    accuracy = overlap_accuracy(pairs)
    assert 0.5 <= accuracy <= 1.0  # never below calling every pair IsNext (exactly half)


def test_plm_masks_follow_one_order_and_a_query_never_sees_its_own_position():
    torch.manual_seed(0)
    targets, content, query = permutation_masks(rows=3, length=10, predict=4)
    assert targets.shape == (3, 4) and content.shape == (3, 1, 10, 10) and query.shape == (3, 1, 4, 10)
    for b in range(3):
        for p, t in enumerate(targets[b].tolist()):
            assert not query[b, 0, p, t]  # never its own token
            seen = query[b, 0, p].sum().item()
            assert seen == 10 - 4 + p  # every non-target, and the targets before it in the order
        assert content[b, 0].diagonal().all()  # the content stream sees itself


def test_plm_query_stream_output_does_not_depend_on_its_own_token():
    torch.manual_seed(0)
    config = ScratchConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, causal=False)  # fmt: skip
    model = ScratchForPreTraining(config).eval()
    ids = torch.randint(5, 50, (2, 12))
    targets, content, query = permutation_masks(2, 12, 3)
    with torch.no_grad():
        before = model.two_stream(ids, content, targets, query)
        for p in range(3):
            changed = ids.clone()
            changed[torch.arange(2), targets[:, p]] = 4  # each row's p-th target token
            after = model.two_stream(changed, content, targets, query)
            # the p-th prediction (and those before it in the order) are blind to that token
            assert torch.allclose(after[:, : p + 1], before[:, : p + 1], atol=1e-6)
            if p < 2:  # the targets after it see it, through the content stream
                assert not torch.allclose(after[:, p + 1 :], before[:, p + 1 :], atol=1e-6)


def test_sentences_split_prose_and_keep_code_whole():
    doc = "First one. Second one? Third!\n\n   x = 1. y = 2\n   z = 3\n\n======\n\nLast."
    assert sentences(doc) == ["First one.", "Second one?", "Third!", "   x = 1. y = 2\n   z = 3", "Last."]


def test_split_is_by_document_and_independent_of_order():
    docs = {f"topic{i}": "word " * (10 + i) for i in range(40)}
    train, held = split_documents(docs, 0.1)
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(docs)
    share = sum(len(docs[n]) for n in held) / sum(map(len, docs.values()))
    assert 0.1 <= share < 0.2
    assert split_documents(dict(reversed(docs.items())), 0.1) == (train, held)


def test_the_corpus_command_writes_python_docs_split_by_document(tmp_path):
    manifest = write_corpus(tmp_path / "corpus", vocab_size=512)
    files = manifest["files"]
    assert files["train.jsonl"]["documents"] > 40 and files["heldout.jsonl"]["documents"] > 3
    ids = {
        name: {json.loads(line)["id"] for line in (tmp_path / "corpus" / name).read_text().splitlines()}
        for name in ("train.jsonl", "heldout.jsonl")
    }
    assert ids["train.jsonl"].isdisjoint(ids["heldout.jsonl"])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "corpus" / "bpe")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template


def test_unigram_perplexity_is_exact_on_a_small_case():
    # counts: 0 -> 3, 1 -> 1 over a vocabulary of 4, add-one: p(0) = 4/8, p(1) = 2/8
    assert math.isclose(
        unigram_perplexity([0, 0, 0, 1], torch.tensor([0, 1]), 4), math.exp(-math.log(1 / 8) / 2)
    )


def test_heldout_scores_of_an_untrained_encoder_are_near_chance(corpus, tmp_path, capsys):
    tokenizer = AutoTokenizer.from_pretrained(corpus / "wordpiece")
    torch.manual_seed(0)
    config = ScratchConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                           num_hidden_layers=1, num_attention_heads=2, causal=False,
                           pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    ScratchForPreTraining(config).save_pretrained(tmp_path / "enc")
    tokenizer.save_pretrained(tmp_path / "enc")
    data = str(corpus / "train.jsonl")
    assert (
        main_eval_lm([str(tmp_path / "enc"), "--objective", "nsp", "--data", data, "--out", str(tmp_path)])
        == 0
    )
    nsp = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.3 < nsp["nsp_acc"] < 0.7 and nsp["examples"] % 2 == 0
    mlm_out = tmp_path / "mlm"
    argv = [
        str(tmp_path / "enc"),
        "--objective",
        "mlm",
        "--data",
        data,
        "--max-length",
        "32",
        "--out",
        str(mlm_out),
    ]
    assert main_eval_lm(argv) == 0
    mlm = json.loads((mlm_out / "metrics.json").read_text())
    # a random encoder over 388 tokens: near-uniform guesses, except that through the residual path and the
    # output layer tied to the embeddings it reads back the 10% of chosen tokens left as they were
    assert mlm["masked_acc"] < 0.2 and mlm["ppl"] > 200
    assert json.loads(capsys.readouterr().out.split("}\n", 1)[0] + "}")["objective"] == "nsp"
