"""The text replay: the base LLM's own answers to plain-text prompts that the retention set never asks."""

from __future__ import annotations

import json

import pytest

from vistune.data.readers import load_records
from vistune.eval.text_bench import QUESTIONS
from vistune.infer.replay import PROMPTS, write_replay


def test_no_prompt_is_a_question_of_the_retention_set():
    asked = {question.lower() for _, question, _, _ in QUESTIONS}
    assert len(set(PROMPTS)) == len(PROMPTS) and not asked & {p.lower() for p in PROMPTS}
    # nor a topic it checks by name: its capitals, and the facts it asks about
    answers = {a.lower() for _, _, accepted, _ in QUESTIONS for a in accepted if len(a) > 3}
    assert not any("capital of" in p.lower() for p in PROMPTS)
    assert not [p for p in PROMPTS if any(a in p.lower().split() for a in answers)]


def test_write_replay_writes_the_base_models_answers_as_text_records(tmp_path, tiny_llm_dir):
    path = tmp_path / "train" / "text_replay.json"
    path.parent.mkdir()
    n = write_replay(path, str(tiny_llm_dir), batch_size=16, max_new_tokens=4)
    rows = json.loads(path.read_text())
    assert 0 < n == len(rows) <= len(PROMPTS) and not list(tmp_path.glob("train/*.tmp"))
    records = list(load_records(path))
    assert all(not r.images and [t.role for t in r.turns] == ["user", "assistant"] for r in records)
    assert {r.turns[0].content for r in records} <= set(PROMPTS)
    assert all(r.turns[1].content for r in records)


def test_the_replay_command_writes_the_file_and_names_a_missing_folder(tmp_path, tiny_llm_dir, capsys):
    from vistune.infer.replay import main_replay

    out = tmp_path / "replay.json"
    assert main_replay(["--base", str(tiny_llm_dir), "--out", str(out)]) == 0
    assert "text replay:" in capsys.readouterr().out and json.loads(out.read_text())
    with pytest.raises(SystemExit) as stop:
        main_replay(["--base", str(tiny_llm_dir), "--out", str(tmp_path / "nowhere" / "r.json")])
    assert stop.value.code == 2 and "does not exist" in capsys.readouterr().err
