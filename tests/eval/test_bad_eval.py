"""Bad inputs to `vistune eval`: each answered with a clear error naming what is wrong,
or a counted skip (the corpus and its runner: tests/bad_inputs.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from bad_inputs import (
    Case,
    World,
    _damaged,
    _deep,
    _json,
    _lines,
    _png,
    params,
    run_case,
)

# --- eval -------------------------------------------------------------------------------------------------


def _vqa_file(tmp: Path, n: int = 2, files: bool = True, name: str = "vqa.json", **per_record: dict) -> Path:
    """n VQA records q0.. of images 0.png.. (written beside the file unless not `files`); per_record[id]
    updates that record."""
    records = []
    for i in range(n):
        rid = f"q{i}"
        record = {
            "id": rid,
            "answer": "red",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour?"},
                {"from": "gpt", "value": "red"},
            ],
        }
        record["image"] = f"{i}.png"
        if files:
            _png(tmp / f"{i}.png")
        records.append(record | per_record.get(rid, {}))
    return _json(tmp / name, records)


def _eval(
    name: str, needles: tuple[str, ...], argv: Callable[[Path, World], list[str]], code: int = 2, **kw
) -> Case:
    def setup(tmp: Path, world: World) -> list[str]:
        return ["eval", *argv(tmp, world), "--out", str(tmp / "out")]

    return Case("eval", name, setup, code, needles, **kw)


def _on(data: Callable[[Path], Path], *args: str, model: bool = True) -> Callable[[Path, World], list[str]]:
    """`eval MODEL --task vqa --data FILE ARGS` (ARGS may hold {tmp}); without `model`, no MODEL."""
    return lambda tmp, world: [
        *([str(world.model)] if model else []),
        "--task",
        "vqa",
        "--data",
        str(data(tmp)),
        *(a.format(tmp=tmp) for a in args),
    ]


def _failures(n: int, total: int, words: str) -> Callable[[Path, str], None]:
    """A counted failure: metrics.json says n of total failed, and predictions.jsonl says why."""

    def check(tmp: Path, output: str) -> None:
        metrics = json.loads((tmp / "out" / "metrics.json").read_text())
        assert (metrics["failures"], metrics["n_records"]) == (n, total), metrics
        errors = [r["error"] for r in _lines(tmp / "out" / "predictions.jsonl") if r["error"]]
        assert len(errors) == n and words in errors[0], errors
        assert f"{n} of {total} records failed" in output

    return check


def _predictions(tmp: Path, rows: list | str, name: str = "p.jsonl") -> Path:
    path = tmp / name
    path.write_text(rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pred(*args: str, rows: list | str = "", data: bool = False) -> Callable[[Path, World], list[str]]:
    """`eval --task vqa --predictions P ARGS` (with `data`: --data with records q0, q1)."""

    def argv(tmp: Path, world: World) -> list[str]:
        extra = ["--data", str(_vqa_file(tmp))] if data else []
        return ["--task", "vqa", "--predictions", str(_predictions(tmp, rows)), *extra, *args]

    return argv


def _pope(tmp: Path) -> Path:
    _png(tmp / "0.png")
    entry = {"question_id": 1, "image": "0.png", "text": "Is there a cat?", "label": "maybe"}
    return _predictions(tmp, [entry], "pope.jsonl")


def _gqa_list(tmp: Path) -> Path:
    return _json(tmp / "gqa.json", [{"imageId": "x", "question": "q", "answer": "a"}])


def _gqa_surrogate(tmp: Path) -> Path:
    """Two GQA questions about 1.jpg; the second holds a lone surrogate (a JSON \\udc80 escape)."""
    _png(tmp / "1.jpg")
    questions = {
        q: {"imageId": "1", "answer": "red", "question": text} for q, text in (("q1", "What?"), ("q2", "@"))
    }
    (tmp / "gqa.json").write_text(json.dumps(questions).replace("@", "caf\\udc80"), encoding="utf-8")
    return tmp / "gqa.json"


def _vqav2(tmp: Path) -> tuple[Path, Path]:
    questions = _json(
        tmp / "questions.json", {"questions": [{"question_id": 1, "image_id": 1, "question": "q?"}]}
    )
    annotations = _json(tmp / "annotations.json", {"annotations": [{"question_id": 2, "answers": []}]})
    return questions, annotations


def eval_cases() -> list[Case]:
    """`vistune eval`: flags, benchmark files, models, predictions; failures counted, all failed refused."""
    E = _eval
    empty = lambda t: _json(t / "empty.json", [])  # noqa: E731
    return [
        E("no-task", ("give --task",), lambda t, w: [str(w.model), "--data", str(_vqa_file(t))]),
        E(
            "unknown-task",
            ("--task", "invalid choice: 'bleu'"),
            lambda t, w: [str(w.model), "--task", "bleu"],
        ),
        E("unknown-format", ("--format", "invalid choice: 'coco'"), _on(_vqa_file, "--format", "coco")),
        E("no-model-no-predictions", ("MODEL_DIR is required",), _on(_vqa_file, model=False)),
        E("model-and-predictions", ("not both",), _on(_vqa_file, "--predictions", "{tmp}/p.jsonl")),
        E("no-data", ("--data is required",), lambda t, w: [str(w.model), "--task", "vqa"]),
        E("data-missing", ("nothere.json", "no such file"), _on(lambda t: t / "nothere.json")),
        E("data-empty-list", ("empty.json", "no records to evaluate"), _on(empty)),
        E(
            "data-not-json",
            ("vqa.json", "not valid JSON"),
            _on(lambda t: _predictions(t, "nope", "vqa.json")),
        ),
        E(
            "data-nested-100k-deep",
            ("deep.json", "nested too deeply"),
            _on(lambda t: _predictions(t, _deep(), "deep.json")),
        ),
        E("duplicate-ids", ("id 'q0' repeated",), _on(lambda t: _vqa_file(t, q1={"id": "q0"}))),
        E("limit-negative", ("--limit", "expected an integer >= 1"), _on(_vqa_file, "--limit", "-1")),
        E(
            "batch-size-zero",
            ("--batch-size", "expected an integer >= 1"),
            _on(_vqa_file, "--batch-size", "0"),
        ),
        E("max-new-tokens-zero", ("--max-new-tokens",), _on(_vqa_file, "--max-new-tokens", "0")),
        E(
            "image-root-missing",
            ("--image-root", "no such directory"),
            _on(_vqa_file, "--image-root", "{tmp}/nowhere"),
        ),
        E("vqav2-without-annotations", ("--annotations",), _on(lambda t: _vqav2(t)[0], "--format", "vqav2")),
        E(
            "annotations-without-data",
            ("--annotations describe --data",),
            lambda t, w: [
                "--task",
                "vqa",
                "--predictions",
                str(_predictions(t, "")),
                "--annotations",
                "a.json",
            ],
        ),
        E(
            "vqav2-question-without-annotation",
            ("annotations.json", "no annotation for question_id 1"),
            lambda t, w: [
                str(w.model),
                "--task",
                "vqa",
                "--data",
                str(_vqav2(t)[0]),
                "--format",
                "vqav2",
                "--annotations",
                str(t / "annotations.json"),
            ],
        ),
        E("gqa-list-not-object", ("gqa.json", "expected a JSON object"), _on(_gqa_list, "--format", "gqa")),
        E(
            "gqa-question-not-unicode",
            (),
            _on(_gqa_surrogate, "--format", "gqa", "--image-root", "{tmp}"),
            code=0,
            expect="skip",
            check=_failures(1, 2, "'q2': the prompt is not valid Unicode"),
        ),
        E(
            "pope-label-maybe",
            ("pope.jsonl", "field 'label' must be yes/no", "'maybe'"),
            lambda t, w: [str(w.model), "--task", "pope", "--data", str(_pope(t)), "--format", "pope"],
        ),
        E(
            "textvqa-missing-field",
            ("textvqa.json", "missing field"),
            _on(lambda t: _json(t / "textvqa.json", {"data": [{"question_id": 1}]}), "--format", "textvqa"),
        ),
        E(
            "vqa-scoring-on-pope",
            ("--vqa-scoring only applies",),
            lambda t, w: [
                str(w.model),
                "--task",
                "pope",
                "--data",
                str(_vqa_file(t)),
                "--vqa-scoring",
                "official",
            ],
        ),
        E("base-on-vqa", ("--base only applies",), _on(_vqa_file, "--base", "smollm2")),
        E(
            "model-missing",
            ("MODEL_DIR", "no-model", "no such directory"),
            lambda t, w: [str(t / "no-model"), "--task", "vqa", "--data", str(_vqa_file(t))],
        ),
        E(
            "model-not-vistune",
            ("MODEL_DIR", "not a trained vistune model"),
            lambda t, w: [str(w.llm), "--task", "vqa", "--data", str(_vqa_file(t))],
        ),
        E(
            "model-json-corrupt",
            ("vistune.json",),
            lambda t, w: [
                *_damaged(lambda m: (m / "vistune.json").write_text("{"))(t, w),
                "--task",
                "vqa",
                "--data",
                str(_vqa_file(t)),
            ],
        ),
        E(
            "every-image-missing",
            ("all 2 records failed", "missing image"),
            _on(lambda t: _vqa_file(t, files=False)),
        ),
        E(
            "every-path-escapes",
            ("all 1 records failed", "path escapes image root"),
            _on(lambda t: _vqa_file(t, n=1, q0={"image": "../0.png"})),
        ),
        E(
            "one-image-missing",
            (),
            _on(lambda t: _vqa_file(t, q1={"image": "gone.png"})),
            code=0,
            expect="skip",
            check=_failures(1, 2, "gone.png"),
        ),
        E(
            "one-answer-null",
            (),
            _on(lambda t: _vqa_file(t, q1={"answer": None})),
            code=0,
            expect="skip",
            check=_failures(1, 2, "a reference must be a string, got null"),
        ),
        E(
            "classify-label-not-in-labels",
            (),
            lambda t, w: [
                str(w.model),
                "--task",
                "classify",
                "--labels",
                "red,blue",
                "--data",
                str(_vqa_file(t, q0={"label": "red"}, q1={"label": "green"})),
            ],
            code=0,
            expect="skip",
            check=_failures(1, 2, "label 'green' is not one of"),
        ),
        E(
            "classify-without-labels",
            ("--task classify needs class names", "--labels", "vqa.json"),
            lambda t, w: [str(w.model), "--task", "classify", "--data", str(_vqa_file(t))],
        ),
        E(
            "classify-every-label-unknown",
            ("all 2 records failed", "is not one of"),
            lambda t, w: [
                str(w.model),
                "--task",
                "classify",
                "--labels",
                "red,blue",
                "--data",
                str(_vqa_file(t, q0={"label": "pink"}, q1={"label": "green"})),
            ],
        ),
        E(
            "pope-every-answer-not-yes-no",
            ("all 2 records failed", "POPE reference must be yes/no"),
            lambda t, w: [str(w.model), "--task", "pope", "--data", str(_vqa_file(t))],
        ),
        E(
            "out-is-a-file",
            ("--out", "not a directory"),
            lambda t, w: (
                (t / "out").write_text("x") and [str(w.model), "--task", "vqa", "--data", str(_vqa_file(t))]
            ),
        ),
        E(
            "predictions-missing",
            ("nothere.jsonl",),
            lambda t, w: ["--task", "vqa", "--predictions", str(t / "nothere.jsonl")],
        ),
        E("predictions-not-json", ("p.jsonl", "not JSON"), _pred(rows="{oops\n")),
        E("predictions-empty", ("p.jsonl", "no predictions"), _pred(rows="")),
        E(
            "predictions-without-references",
            ("p.jsonl", "missing field(s)", "references"),
            _pred(rows=[{"id": "1", "answer": "a"}]),
        ),
        E(
            "predictions-answer-not-string",
            ("p.jsonl", "field 'answer'"),
            _pred(rows=[{"id": "1", "answer": 3, "references": ["a"]}]),
        ),
        E(
            "predictions-for-another-task",
            ("row is for task 'pope', not 'vqa'",),
            _pred(rows=[{"id": "1", "answer": "a", "references": ["a"], "task": "pope"}]),
        ),
        E(
            "predictions-of-other-ids",
            ("all 2 records failed", "no prediction for id"),
            _pred(rows=[{"id": "x", "answer": "red"}], data=True),
        ),
        E(
            "retrieval-on-a-vlm",
            ("model", "not a contrastive"),
            lambda t, w: [str(w.model), "--task", "retrieval", "--data", str(_vqa_file(t))],
        ),
        E(
            "suite-data-missing",
            ("nowhere",),
            lambda t, w: [str(w.model), "--suite", "shapes", "--data", str(t / "nowhere")],
        ),
    ]


CASES = eval_cases()


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case: Case, tmp_path, request, capsys, monkeypatch):
    run_case(case, tmp_path, request, capsys, monkeypatch)
