"""Small tokenizers trained on a corpus with the `tokenizers` library, for models trained from scratch.

`train_bpe`: byte-level BPE for decoders (any text encodes; no unknown token), with ChatML's tokens
and template and the image placeholder, so a decoder pretrained on raw text can be instruction-tuned on
conversations about images with the same vocabulary. Its end token is `<|im_end|>` (documents and
turns end with it) and `<|endoftext|>` pads.

`train_wordpiece`: a WordPiece vocabulary for encoders, BERT's layout: lower-cased text, [PAD] [UNK]
[CLS] [SEP] [MASK], and `[CLS] A [SEP]` / `[CLS] A [SEP] B [SEP]` added around texts and pairs. Its
vocabulary is built here rather than by the library's WordPiece trainer, whose result changes from run to
run: every character (alone, and as a `##` continuation, so any word can be spelled) and the corpus's
words by count, ties by spelling, up to `vocab_size`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from vistune.data.records import CHATML, IMAGE_PLACEHOLDER

BPE_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_PLACEHOLDER)
WORDPIECE_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_bpe(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of at most `vocab_size` tokens learned from `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(BPE_SPECIAL), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", IMAGE_PLACEHOLDER], chat_template=CHATML,
    )  # fmt: skip


def wordpiece_vocab(texts: Sequence[str], vocab_size: int) -> list[str]:
    """The special tokens, every character alone and as `##c`, then words by count (ties by spelling)."""
    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(w for text in texts for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab = [*WORDPIECE_SPECIAL, *chars, *(f"##{c}" for c in chars)]
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for the corpus's {len(chars)} characters")
    known = set(vocab)
    words = sorted((w for w in counts if w not in known), key=lambda w: (-counts[w], w))
    return vocab + words[: vocab_size - len(vocab)]


def train_wordpiece(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer on `wordpiece_vocab(texts, vocab_size)`."""
    vocab = {token: i for i, token in enumerate(wordpiece_vocab(texts, vocab_size))}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )  # fmt: skip
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )  # fmt: skip
