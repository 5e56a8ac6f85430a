"""Generator: batched greedy = one by one, seeded sampling, max_new_tokens, streaming, text-only use."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import TextStreamer
from transformers.generation.streamers import BaseStreamer

from vistune.data.records import Turn
from vistune.infer.generate import Generator, load_generator
from vistune.model.vlm import save_vlm

COLOURS = [(220, 30, 30), (30, 160, 50), (30, 70, 220), (230, 190, 0)]
CONVS = [
    [Turn("user", "<image>\nWhat is this?")],
    [
        Turn(
            "user", "Describe the <image> picture in many more words, please, with as much detail as you can."
        )
    ],
    [Turn("user", "hi")],
    [Turn("user", "Left: <image> right: <image>. Which is bigger?")],
    [
        Turn("user", "Hello."),
        Turn("assistant", "Hi! What can I do?"),
        Turn("user", "<image> count the shapes"),
    ],
]
IMAGES = [
    [Image.new("RGB", (20, 20), COLOURS[0])],
    [Image.new("RGB", (30, 20), COLOURS[1])],
    [],
    [Image.new("RGB", (16, 16), COLOURS[2]), Image.new("L", (40, 10), 200)],
    [Image.new("RGB", (24, 24), COLOURS[3])],
]


class Collect(BaseStreamer):
    """Records the token ids `generate` streams (the prompt first, which is empty for inputs_embeds)."""

    def __init__(self) -> None:
        self.chunks: list[list[int]] = []

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.flatten().tolist())

    def end(self) -> None:
        pass

    @property
    def new_ids(self) -> list[int]:
        return [i for chunk in self.chunks[1:] for i in chunk]


@pytest.fixture(scope="module")
def vlm(tiny_vlm):
    return tiny_vlm("clip", "pixel_shuffle", seed=3)


@pytest.fixture(scope="module")
def gen(vlm) -> Generator:
    return Generator(vlm.llm, vlm.tokenizer, vlm, batch_size=8)


def test_batched_greedy_equals_one_by_one(gen):
    batched = gen.generate(CONVS, IMAGES, max_new_tokens=6)
    alone = [gen.generate([c], [im], max_new_tokens=6)[0] for c, im in zip(CONVS, IMAGES, strict=True)]
    assert batched == alone
    assert len(set(batched)) == len(batched)  # the answers depend on the prompts and images
    small = Generator(gen.llm, gen.tokenizer, gen.vlm, batch_size=2)  # chunks of 2, 2, 1
    assert small.generate(CONVS, IMAGES, max_new_tokens=6) == batched


def test_answers_depend_on_the_image(gen):
    conv = [CONVS[0]] * len(COLOURS)
    answers = gen.generate(conv, [[Image.new("RGB", (20, 20), c)] for c in COLOURS], max_new_tokens=4)
    assert len(set(answers)) > 1


def test_max_new_tokens_is_respected(gen):
    eos = set(gen.eos)
    for n in (1, 5):
        streamer = Collect()
        text = gen.generate([CONVS[0]], [IMAGES[0]], max_new_tokens=n, streamer=streamer)[0]
        ids = streamer.new_ids
        assert 1 <= len(ids) <= n and (len(ids) == n or ids[-1] in eos)
        assert text == gen.tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_sampling_is_reproducible_under_a_seed(gen):
    def sample(seed: int, **kw) -> list[str]:
        torch.manual_seed(seed)
        return gen.generate(CONVS[:3], IMAGES[:3], max_new_tokens=6, **kw)

    first = sample(0, temperature=1.0, top_p=0.9)
    assert sample(0, temperature=1.0, top_p=0.9) == first
    greedy = gen.generate(CONVS[:3], IMAGES[:3], max_new_tokens=6)
    others = [sample(seed, temperature=1.5) for seed in (1, 2)]
    assert any(o != first for o in others) and any(o != greedy for o in [first, *others])
    # top_p near 0 keeps only the most likely token: sampling collapses to greedy
    assert sample(5, temperature=1.0, top_p=1e-6) == greedy


def test_streaming_with_text_streamer(gen, capsys):
    streamer = TextStreamer(gen.tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = gen.generate([CONVS[1]], [IMAGES[1]], max_new_tokens=6, streamer=streamer)
    printed = capsys.readouterr().out
    assert out[0] and printed.strip() == out[0]
    with pytest.raises(ValueError, match="batch size 1"):
        gen.generate(CONVS[:2], IMAGES[:2], max_new_tokens=2, streamer=TextStreamer(gen.tokenizer))


def test_input_errors(gen):
    with pytest.raises(ValueError, match="2 conversations but 1 image lists"):
        gen.generate(CONVS[:2], IMAGES[:1])
    with pytest.raises(ValueError, match="image"):  # an image but no placeholder for it
        gen.generate([[Turn("user", "no placeholder")]], [[IMAGES[0][0]]], max_new_tokens=1)
    with pytest.raises(ValueError, match="end with a user turn"):
        gen.generate([[Turn("user", "q"), Turn("assistant", "a")]], max_new_tokens=1)


def test_text_only_generator(vlm):
    from vistune.model.llm import load_llm, load_tokenizer

    path = vlm.cfg.llm.name_or_path
    tokenizer = load_tokenizer(path)
    llm = load_llm(path, tokenizer, torch.float32).eval()
    text = Generator(llm, tokenizer, None, batch_size=4)
    convs = [CONVS[2], [Turn("user", "Tell me a longer story about a cat and a dog, please.")]]
    batched = text.generate(convs, max_new_tokens=5)
    assert batched == [text.generate([c], max_new_tokens=5)[0] for c in convs]
    assert all(batched)
    with pytest.raises(ValueError, match="plain LLM: it cannot take images"):
        text.generate([CONVS[0]], [IMAGES[0]], max_new_tokens=2)


def test_load_generator_from_saved_model_dir(vlm, gen, tmp_path):
    save_vlm(vlm, tmp_path / "m")
    loaded = load_generator(str(tmp_path / "m"), batch_size=2, device="cpu")
    assert loaded.vlm is not None
    assert loaded.generate(CONVS, IMAGES, max_new_tokens=4) == gen.generate(CONVS, IMAGES, max_new_tokens=4)
    plain = load_generator(vlm.cfg.llm.name_or_path, device="cpu")
    assert plain.vlm is None and plain.generate([CONVS[2]], max_new_tokens=2)[0] is not None
