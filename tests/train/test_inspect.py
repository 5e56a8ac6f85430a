"""`vistune data inspect`: records printed token by token, image runs collapsed, answer tokens starred."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from conftest import TOWERS
from helpers import shape_image

from vistune.commands.inspect import main_inspect
from vistune.data.records import Turn
from vistune.model.llm import load_tokenizer
from vistune.model.template import CHATML, render

RECORDS = [
    {"id": "r1", "image": "red.png", "split": "keep", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A red circle."}]},
    {"id": "r2", "image": "green.png", "split": "drop", "conversations": [
        {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "Green square."}]},
    {"id": "r3", "image": "blue.png", "split": "keep", "conversations": [
        {"from": "human", "value": "Colour?\n<image>"}, {"from": "gpt", "value": "Blue."},
        {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "A square, small."}]},
]  # fmt: skip
TOKEN_LINE = re.compile(r"^ ([* ]) +(\d+)  (.*)$")
IMAGE_LINE = re.compile(r"^ +<image x (\d+)>$")


@pytest.fixture
def write_config(tmp_path, tiny_llm_dir):
    """Write the dataset, its images and a config; `where` (optional) filters the stage's data."""
    for colour, shape in (("red", "circle"), ("green", "square"), ("blue", "square")):
        shape_image(colour, shape, 24).save(tmp_path / f"{colour}.png")
    (tmp_path / "data.json").write_text(json.dumps(RECORDS), encoding="utf-8")

    def write(where: dict | None = None) -> str:
        data = {"path": str(tmp_path / "data.json")} | ({"where": where} if where else {})
        config = {
            "model": {
                "vision": dict(TOWERS["clip"]),
                "projector": {"name": "mlp2x_gelu"},
                "llm": {"name_or_path": str(tiny_llm_dir), "chat_template": "chatml"},
            },
            "stages": [{"name": "sft", "kind": "vlm", "data": [data], "train": ["projector"]}],
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return str(path)

    return write


def _blocks(out: str) -> dict[str, list[str]]:
    """Printed records by id: the lines after each `... record 'ID'` header."""
    blocks: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.splitlines():
        header = re.search(r"record '([^']+)'$", line)
        if header:
            current = blocks.setdefault(header.group(1), [])
        elif line.strip():
            current.append(line)
    return blocks


def _expected(tokenizer, record: dict, image_tokens: int) -> tuple[list[int], list[int]]:
    """(all ids, labelled ids) that rendering the record gives."""
    roles = {"human": "user", "gpt": "assistant"}
    turns = [Turn(roles[m["from"]], m["value"]) for m in record["conversations"]]
    out = render(turns, tokenizer, image_tokens=image_tokens, num_images=1)
    return out.input_ids, [t for t, label in zip(out.input_ids, out.labels, strict=True) if label != -100]


@pytest.fixture(scope="module")
def tokenizer(tiny_llm_dir):
    tok = load_tokenizer(str(tiny_llm_dir))
    tok.chat_template = CHATML
    return tok


def test_inspect_prints_records_images_and_answer_marks(write_config, tokenizer, capsys):
    assert main_inspect([write_config(), "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "== stage sft: {'kept': 2}" in out
    blocks = _blocks(out)
    assert list(blocks) == ["r1", "r2"]  # the first two records
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    end_of_turn = tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    for record in RECORDS[:2]:
        lines = blocks[record["id"]]
        images = [int(m.group(1)) for m in map(IMAGE_LINE.match, lines) if m]
        assert images == [16]  # one line for the 4x4 patch tokens of the 16 px / 4 px tower
        tokens = [m.groups() for m in map(TOKEN_LINE.match, lines) if m]
        ids, labelled = _expected(tokenizer, record, 16)
        assert [int(t) for _, t, _ in tokens] == [t for t in ids if t != image_id]
        starred = [int(t) for mark, t, _ in tokens if mark == "*"]
        answer = tokenizer(record["conversations"][1]["value"], add_special_tokens=False)["input_ids"]
        assert starred == labelled == answer + end_of_turn  # the answer and the end of its turn, nothing else
        assert lines[-1].strip().startswith(f"{len(ids)} tokens, {len(labelled)} with loss, images: [")


def test_where_filter_is_respected(write_config, tokenizer, capsys):
    assert main_inspect([write_config(where={"split": "keep"}), "--n", "2"]) == 0
    out = capsys.readouterr().out
    blocks = _blocks(out)
    assert list(blocks) == ["r1", "r3"]  # r2 (split: drop) is not printed; --n counts kept records
    assert "Describe it" not in out and "green.png" not in out
    # both answers of the two-turn record are starred, and the questions are not
    lines = blocks["r3"]
    starred = [int(m.group(2)) for m in map(TOKEN_LINE.match, lines) if m and m.group(1) == "*"]
    _, labelled = _expected(tokenizer, RECORDS[2], 16)
    end_of_turn = tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    answers = [
        tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("Blue.", "A square, small.")
    ]
    assert starred == labelled == answers[0] + end_of_turn + answers[1] + end_of_turn
    assert [m.group(1) for m in map(IMAGE_LINE.match, lines) if m] == ["16"]


def test_image_count_follows_the_projector(write_config, capsys):
    """pixel_shuffle merges 2x2 patches: 4 image tokens per image (set on the command line)."""
    assert main_inspect([write_config(), "--n", "1", "--set", "model.projector.name=pixel_shuffle"]) == 0
    lines = _blocks(capsys.readouterr().out)["r1"]
    assert [m.group(1) for m in map(IMAGE_LINE.match, lines) if m] == ["4"]


def test_where_matching_nothing_is_an_error(write_config):
    with pytest.raises(ValueError, match="no record matches where"):
        main_inspect([write_config(where={"split": "nope"})])
