"""Key/value prefix reuse (issue 16): the same greedy answers with and without it, only the new tokens
computed, no reuse across a different image or an edited turn, batches with mixed prefixes, the LRU's
byte cap, and the server reusing a conversation's prefix for its follow-up request."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from PIL import Image
from serving import BLUE, GREEN, RED, image_part, running, user
from transformers import DynamicCache, LlamaConfig

from vistune.data.records import Turn
from vistune.infer.engine import ServeConfig
from vistune.infer.generate import Generator, load_generator
from vistune.infer.prefix import MIN_REUSE, ImageTokens, Prefix, PrefixCache, common_prefix, image_key
from vistune.infer.session import Session
from vistune.model.vlm import save_vlm

IMG = 99  # the image token id of the unit tests, 3 tokens per image
IMAGES = ImageTokens(IMG, 3)
CONFIG = LlamaConfig(num_hidden_layers=2, hidden_size=8, num_attention_heads=1, num_key_value_heads=1)
TOKEN_BYTES = 2 * 2 * 8 * 4  # layers x (keys, values) x head_dim x float32


def fake(ids: list[int], keys: tuple[str, ...] = ()) -> Prefix:
    """A prefix of `ids` whose keys and values are the positions' numbers (to see what was kept)."""
    t = torch.arange(len(ids), dtype=torch.float32).view(1, 1, -1, 1).expand(1, 1, -1, 8).contiguous()
    return Prefix(list(ids), keys, DynamicCache(ddp_cache_data=[(t, t), (t, t)], config=CONFIG))


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix([1, 2, 3, 4], [1, 2, 5, 4]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([7], [8]) == 0
    long = list(range(1000))
    assert common_prefix(long, [*long[:613], -1, *long[614:]]) == 613


def test_reusable_stops_at_a_different_image_an_edit_or_a_split_image():
    held = fake([1, 2, IMG, IMG, IMG, 5, IMG, IMG, IMG, 6, 7], ("a", "b"))
    follow = [*held.ids, 8, 9]
    assert held.reusable(follow, ["a", "b"], IMAGES) == 11  # all of it
    assert held.reusable(follow, ["a", "c"], IMAGES) == 6  # up to the second image, which differs
    assert held.reusable(follow, ["x", "b"], IMAGES) == 2  # up to the first
    assert held.reusable([1, 2, IMG, IMG, IMG, 4, *follow[6:]], ["a", "b"], IMAGES) == 5  # an edited turn
    assert held.reusable(held.ids, ["a", "b"], IMAGES) == 10  # the last prompt token is always computed
    assert (
        held.reusable([1, 2, IMG, IMG, IMG, 5, IMG, IMG, 9], ["a", "b"], IMAGES) == 6
    )  # never half an image
    assert held.reusable([3, 2], [], IMAGES) == 0
    text_only = fake([1, 2, 3, 4])
    assert text_only.reusable([1, 2, 3, 4, 5], [], ImageTokens()) == 4


def test_image_keys_name_the_pixels():
    red = Image.new("RGB", (16, 16), RED)
    assert image_key(red) == image_key(Image.new("RGB", (16, 16), RED))
    others = [Image.new("RGB", (16, 16), BLUE), Image.new("RGB", (8, 32), RED), red.convert("RGBA")]
    assert len({image_key(im) for im in [red, *others]}) == 4


def test_a_prefix_must_hold_as_many_positions_as_ids():
    with pytest.raises(ValueError, match="holds 3 positions"):
        Prefix([1, 2], (), fake([1, 2, 3]).cache)


def test_the_lru_respects_its_byte_cap():
    cache = PrefixCache(max_bytes=25 * TOKEN_BYTES, config=CONFIG, images=IMAGES, min_reuse=1)
    for first in (10, 20, 30):
        cache.put(fake([first, *range(9)]))  # 10 tokens each: two fit
    assert len(cache) == 2 and cache.bytes == 20 * TOKEN_BYTES
    assert cache.find([10, *range(9), 5], []) is None  # the oldest went
    assert cache.find([20, *range(9), 5], []) is not None  # 20 is now the most recently used ...
    cache.put(fake([40, *range(9)]))
    assert cache.find([30, *range(9), 5], []) is None  # ... so 30 went, not 20
    assert cache.find([20, *range(9), 5], [])[1] == 10
    cache.put(fake(list(range(26))))  # bigger than the whole cache: not kept, nothing evicted
    assert len(cache) == 2 and cache.bytes == 20 * TOKEN_BYTES
    cache.put(fake([20, *range(12)]))  # extends the held [20, 0..8]: that one is dropped
    assert len(cache) == 2 and cache.bytes == 23 * TOKEN_BYTES
    assert cache.find([20, *range(9), 0], [])[1] == 10


def test_a_few_shared_tokens_are_not_worth_reusing():
    cache = PrefixCache(max_bytes=10**6, config=CONFIG, images=IMAGES)
    cache.put(fake(list(range(40))))
    assert cache.find([*range(MIN_REUSE - 1), 500, 501], []) is None  # a shared template opening, say
    assert cache.find([*range(MIN_REUSE), 500], [])[1] == MIN_REUSE


def test_a_batch_shares_one_start_padding_and_prefixes_side_by_side():
    cache = PrefixCache(max_bytes=10**6, config=CONFIG, images=IMAGES, min_reuse=1)
    cache.put(fake([1, 2, 3, 4, 5, 6]))
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9]]  # a follow-up, and a new 3-token prompt
    plan = cache.plan(prompts, [[], []])
    assert plan.start == 5 and plan.tokens_reused == [5, 0]  # the new prompt's padding limits the start
    keys = plan.cache.layers[0].keys
    assert keys.shape == (2, 1, 5, 8)
    assert keys[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4] and not keys[1].any()  # the second row: padding
    assert len(cache) == 1  # a batch copies: the prefix stays
    alone = cache.plan([prompts[0]], [[]])
    assert alone.start == 6 and len(cache) == 0  # one row takes its prefix and crops it in place


@pytest.fixture(scope="module")
def gen(tiny_vlm) -> Generator:
    vlm = tiny_vlm("clip", "mlp2x_gelu", seed=3)
    return Generator(vlm.llm, vlm.tokenizer, vlm, batch_size=8)


@pytest.fixture
def computed(gen):
    """The number of tokens each forward pass of the language model computes."""
    counts: list[int] = []

    def hook(module, args, kwargs):
        given = kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
        counts.append(given.shape[1])

    handle = gen.llm.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    yield counts
    handle.remove()


def _pictures() -> tuple[Image.Image, Image.Image]:
    return Image.new("RGB", (16, 16), RED), Image.new("RGB", (20, 12), BLUE)


def test_a_chat_gives_the_same_answers_with_and_without_reuse(gen, computed):
    red, blue = _pictures()
    script = [("What is this?", [red]), ("Are you sure?", []), ("And this one?", [blue]), ("Thanks.", [])]
    answers = {}
    for reuse in (True, False):
        session = Session(gen, system="Be brief.", prefix_cache_bytes=2**30 if reuse else 0)
        answers[reuse] = [session.ask(text, images, max_new_tokens=6) for text, images in script]
    assert answers[True] == answers[False]
    assert len(set(answers[True])) > 1


def test_a_follow_up_computes_only_its_new_tokens(gen, computed, monkeypatch):
    encoded: list[int] = []
    encode = gen.encode_images
    monkeypatch.setattr(gen, "encode_images", lambda images: encoded.append(len(images)) or encode(images))
    red, blue = _pictures()
    session = Session(gen)
    session.ask("What is this?", [red], max_new_tokens=4)
    first = gen.prompt_ids(session.turns[:1], 1)
    assert computed[0] == len(first) and encoded == [1]
    [held] = session.prefixes  # what the first turn left: its prompt and answer
    assert held.ids[: len(first)] == first and held.image_keys == tuple(session.image_keys)
    computed.clear()
    session.ask("And this one?", [blue], max_new_tokens=4)
    follow = gen.prompt_ids(session.turns[:3], 2)
    reused = session.prefixes.reused_tokens
    assert reused == common_prefix(held.ids, follow) > len(first)  # the answer too, as far as it re-renders
    assert computed[0] == len(follow) - reused  # the prefill read only the rest
    assert encoded == [1, 1]  # the red picture was not encoded again; the blue one was
    assert all(n == 1 for n in computed[1:])  # then one token per step, as always


def test_a_different_image_or_an_edited_turn_does_not_reuse_a_wrong_prefix(gen, computed):
    red, blue = _pictures()
    first = [Turn("user", "<image>\nWhat is this?", 1)]
    answer = gen.generate([first], [[red]], max_new_tokens=4)[0]
    follow = [*first, Turn("assistant", answer), Turn("user", "Are you sure?", 0)]
    edited = [Turn("user", "<image>\nWhat colour is it?", 1), *follow[1:]]
    for conversation, image in ((follow, blue), (edited, red), (follow, red)):
        prefixes = gen.prefix_cache(2**30)
        gen.generate([first], [[red]], max_new_tokens=4, prefixes=prefixes)
        computed.clear()
        reply = gen.generate([conversation], [[image]], max_new_tokens=4, prefixes=prefixes)
        assert reply == gen.generate([conversation], [[image]], max_new_tokens=4)  # as if computed afresh
        ids = gen.prompt_ids(conversation, 1)
        image_start = ids.index(gen.vlm.image_token_id)
        if conversation is follow and image is red:  # the right prefix: reused past the image
            assert prefixes.reused_tokens > image_start + gen.vlm.image_tokens
        elif conversation is edited:  # reused up to the edit, no further
            edit = common_prefix(ids, gen.prompt_ids(first, 1))
            assert 0 < prefixes.reused_tokens <= edit
        else:  # another picture: nothing of it or after it
            assert prefixes.reused_tokens <= image_start


def test_a_batch_with_mixed_prefixes_gives_the_same_answers(gen, computed):
    red, blue = _pictures()
    firsts = [[Turn("user", "<image>\nWhat is this?", 1)], [Turn("user", "Hello there.", 0)]]
    images = [[red], []]
    prefixes = gen.prefix_cache(2**30)
    answers = gen.generate(firsts, images, max_new_tokens=4, prefixes=prefixes)
    assert len(prefixes) == 2
    follows = [
        [*firsts[0], Turn("assistant", answers[0]), Turn("user", "Tell me more about its colour.", 0)],
        [*firsts[1], Turn("assistant", answers[1]), Turn("user", "<image>\nAnd this?", 1)],
        [Turn("user", "<image>\nA new one.", 1)],  # no prefix, shorter: its padding bounds the reuse
    ]
    follow_images = [[red], [blue], [blue]]
    computed.clear()
    reused = gen.generate(follows, follow_images, max_new_tokens=5, prefixes=prefixes)
    assert prefixes.reused_tokens > 0 and computed[0] < max(len(gen.prompt_ids(c, 1)) for c in follows)
    assert reused == gen.generate(follows, follow_images, max_new_tokens=5)  # batched, afresh
    alone = [
        gen.generate([c], [im], max_new_tokens=5)[0] for c, im in zip(follows, follow_images, strict=True)
    ]
    assert reused == alone


def _conversation(url: str) -> list[str]:
    """A first turn, its follow-up alone, then a third turn batched with two new conversations."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

    def ask(messages: list[dict]) -> str:
        reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=5)
        return reply.choices[0].message.content

    history = [user("What colour?", image_part(BLUE))]
    answers = []
    for question in ("Are you sure?", None):
        answers.append(ask(history))
        history += [{"role": "assistant", "content": answers[-1]}, user(question or "Why?")]
    others = [[user("What is it?", image_part(RED))], [user("Two?", image_part(GREEN), image_part(RED))]]
    with ThreadPoolExecutor(3) as pool:
        return answers + list(pool.map(ask, [history, *others]))


def test_the_server_reuses_a_conversation_for_its_follow_up(tiny_vlm, tmp_path):
    from vistune.infer.server import create_app

    save_vlm(tiny_vlm("clip", "mlp2x_gelu", seed=3), tmp_path / "model")
    served = load_generator(str(tmp_path / "model"), device="cpu")
    answers = {}
    for mb in (256, 0):
        app = create_app(
            served, ServeConfig(model_name="tiny", prefix_cache_bytes=mb * 2**20, max_wait_s=0.3)
        )
        engine = app.state.engine
        with running(app) as url:
            answers[mb] = _conversation(url)
        assert engine.scheduler.stats["largest_batch"] == 3
        if mb:  # the second turn reused at least the whole first prompt (image included)
            assert engine.prefixes.hits >= 1 and engine.scheduler.stats["reused_tokens"] > 16
        else:
            assert engine.prefixes is None and engine.scheduler.stats["reused_tokens"] == 0
    assert answers[256] == answers[0]
