"""`vistune eval` on wrong input: no silent wrong score, no traceback; one message naming the file,
record, field or flag, and exit 2. Also: scoring another tool's predictions against a benchmark file,
official VQAv2 scoring from the command line, and image paths that leave the image root."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from vistune.data.records import Record, Turn
from vistune.eval import command, run
from vistune.model.vlm import MODEL_FILE

main_eval = command.main_eval


class EchoPredictor:
    """Answers 'red' to everything; records the images it was handed."""

    def __init__(self):
        self.seen = 0

    def answer(self, conversations, images, max_new_tokens=32):
        self.seen += len(conversations)
        return ["red"] * len(conversations)


def _png(path, color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def _llava(path, n=3, answer="red", image=True, ids=None):
    """A LLaVA-format eval file of n VQA records (images 0.png.. beside it)."""
    records = []
    for i in range(n):
        rid = ids[i] if ids else f"q{i}"
        if image:
            _png(path.parent / f"{i}.png")
        human = {"from": "human", "value": ("<image>\n" if image else "") + f"What color is {i}?"}
        record = {"id": rid, "answer": answer, "conversations": [human, {"from": "gpt", "value": "red"}]}
        records.append({**record, "image": f"{i}.png"} if image else record)
    path.write_text(json.dumps(records))
    return path


def _model(tmp_path, monkeypatch):
    """A model dir the CLI accepts, loaded as an EchoPredictor."""
    model = tmp_path / "model"
    model.mkdir()
    (model / MODEL_FILE).write_text("{}")
    predictor = EchoPredictor()
    monkeypatch.setattr(command, "load_generator", lambda name, batch_size: predictor)
    return model, predictor


def _err(capsys) -> str:
    return capsys.readouterr().err


# --- item 5: wrong scores without a word ----------------------------------------------------------------
def _predictions(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_string_references_are_one_reference_not_letters(tmp_path):
    # Before: "above" was read as the references a, b, o, v, e: "above" scored 0.0 and "a" 0.27.
    rows = [
        {"id": "1", "answer": "above", "references": "above"},
        {"id": "2", "answer": "a", "references": "above"},
    ]
    out, metrics = run.rescore(_predictions(tmp_path / "p.jsonl", rows), "vqa")
    assert [r["score"] for r in out] == [1.0, 0.0] and metrics["accuracy"] == 0.5
    assert out[0]["references"] == ["above"]


def test_string_and_null_references_in_records(tmp_path):
    # A llava record with "answers": "above" is one reference; "answer": null is refused (it used to be
    # skipped silently in favour of the assistant turn).
    rec = Record("s", [], [Turn("user", "Where?")], {"answers": "above"}, "d.json")
    bad = Record("n", [], [Turn("user", "Where?"), Turn("assistant", "below")], {"answer": None}, "d.json")
    rows, m = run.evaluate(EchoPredictor(), [rec, bad], "vqa")
    assert rows[0]["references"] == ["above"]
    assert "field 'answer': a reference must be a string, got null" in rows[1]["error"]
    assert m["failures"] == 1


def test_limit_must_be_positive(tmp_path, capsys, monkeypatch):
    # Before: --limit -1 sliced off the last record and exited 0.
    model, predictor = _model(tmp_path, monkeypatch)
    data = _llava(tmp_path / "d.json")
    for bad in ("-1", "0", "x"):
        with pytest.raises(SystemExit) as e:
            main_eval([str(model), "--task", "vqa", "--data", str(data), "--limit", bad])
        assert e.value.code == 2 and "--limit: expected an integer >= 1" in _err(capsys)
    out = tmp_path / "o"
    assert (
        main_eval([str(model), "--task", "vqa", "--data", str(data), "--limit", "2", "--out", str(out)]) == 0
    )
    assert json.loads((out / "metrics.json").read_text())["n_records"] == 2 and predictor.seen == 2


def test_empty_data_file_is_an_error_not_accuracy_zero(tmp_path, capsys, monkeypatch):
    model, predictor = _model(tmp_path, monkeypatch)
    data = tmp_path / "empty.json"
    data.write_text("[]")
    assert main_eval([str(model), "--task", "vqa", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert f"{data}: no records to evaluate" in _err(capsys) and not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="no records"):
        run.evaluate(EchoPredictor(), [], "vqa")


def test_duplicate_ids_are_refused(tmp_path, capsys, monkeypatch):
    model, predictor = _model(tmp_path, monkeypatch)
    data = _llava(tmp_path / "d.json", ids=["a", "b", "a"])
    assert main_eval([str(model), "--task", "vqa", "--data", str(data)]) == 2
    assert "record 'a': id 'a' repeated" in _err(capsys) and predictor.seen == 0  # refused before the model
    preds = _predictions(tmp_path / "p.jsonl", [{"id": "x", "answer": "", "references": ["y"]}] * 2)
    with pytest.raises(ValueError, match=r"line 2 \(id 'x'\): id repeated \(first at .*line 1"):
        run.rescore(preds, "vqa")


def test_every_record_failing_exits_2(tmp_path, capsys, monkeypatch):
    # Before: 7,332 of 7,332 POPE records failed (wrong --image-root) and the exit status was 0.
    model, predictor = _model(tmp_path, monkeypatch)
    data = _llava(tmp_path / "d.json")
    wrong_root = tmp_path / "elsewhere"
    wrong_root.mkdir()
    out = tmp_path / "o"
    argv = [
        str(model),
        "--task",
        "vqa",
        "--data",
        str(data),
        "--image-root",
        str(wrong_root),
        "--out",
        str(out),
    ]
    assert main_eval(argv) == 2
    err = _err(capsys)
    assert "all 3 records failed" in err and "--image-root" in err and predictor.seen == 0
    assert "## Failures (3)" in (out / "report.md").read_text()  # the report is still written
    (wrong_root / "0.png").write_bytes((tmp_path / "0.png").read_bytes())
    assert main_eval(argv) == 0  # some failed: a warning, exit 0
    assert "warning: 2 of 3 records failed" in _err(capsys)


# --- item 5: another tool's predictions scored against --data --------------------------------------------
def test_predictions_with_data_take_references_from_data(tmp_path, capsys):
    data = _llava(tmp_path / "d.json", n=4)
    preds = tmp_path / "answers.jsonl"  # LLaVA's answer-file shape: question_id + text; no references
    lines = [{"question_id": "q0", "text": "Red"}, {"question_id": "q1", "text": "blue"}]
    lines += [{"question_id": "q2", "text": "red", "answer_id": "x"}, {"question_id": "zz", "text": "red"}]
    _predictions(preds, lines)
    out = tmp_path / "o"
    argv = ["--task", "vqa", "--predictions", str(preds), "--data", str(data), "--out", str(out)]
    assert main_eval(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    # q0 right, q1 wrong, q2 right, q3 has no prediction (a failure scored wrong); zz is not in the data
    assert m["accuracy"] == 0.5 and m["failures"] == 1 and m["failed_ids"] == ["q3"]
    assert m["unmatched_predictions"] == 1 and m["vqa_scoring"] == "lenient"
    err = _err(capsys)
    assert "1 prediction(s)" in err and "warning: 1 of 4 records failed" in err
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert rows[0]["references"] == ["red"] and "no prediction for id 'q3'" in rows[3]["error"]
    # a JSON list of {id, answer} (the official VQAv2 results shape) works too
    preds.write_text(json.dumps([{"id": f"q{i}", "answer": "red"} for i in range(4)]))
    assert main_eval(argv) == 0
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == 1.0


def test_predictions_without_references_or_data_say_what_to_give(tmp_path, capsys):
    preds = _predictions(tmp_path / "p.jsonl", [{"question_id": 1, "answer": "red"}])
    assert main_eval(["--task", "vqa", "--predictions", str(preds), "--out", str(tmp_path / "o")]) == 2
    assert "missing field(s) ['id', 'references']" in _err(capsys)
    preds = _predictions(tmp_path / "p.jsonl", [{"id": 1, "answer": "red"}])
    assert main_eval(["--task", "vqa", "--predictions", str(preds), "--out", str(tmp_path / "o")]) == 2
    assert "give --data FILE" in _err(capsys)


# --- item 6: official VQAv2 scoring from the command line --------------------------------------------
def _vqav2(tmp_path):
    q = tmp_path / "q.json"
    qs = [{"question_id": i, "image_id": i, "question": f"q{i}?"} for i in (1, 2, 3)]
    q.write_text(json.dumps({"data_subtype": "val2014", "questions": qs}))
    answers = {1: ["2"] * 10, 2: ["yes"] * 2 + ["no"] * 8, 3: ["red"] * 10}
    types = {1: "number", 2: "yes/no", 3: "other"}
    anns = [
        {
            "question_id": i,
            "question_type": "what",
            "answer_type": types[i],
            "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(answers[i])],
        }
        for i in (1, 2, 3)
    ]
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"annotations": anns}))
    preds = tmp_path / "results.json"  # the official results format
    preds.write_text(
        json.dumps(
            [
                {"question_id": 1, "answer": "Two"},
                {"question_id": 2, "answer": "yes"},
                {"question_id": 3, "answer": "red"},
            ]
        )
    )
    return q, a, preds


@pytest.mark.parametrize("scoring, q1", [(None, 0.0), ("official", 0.0), ("lenient", 1.0)])
def test_vqav2_is_scored_officially_by_default(tmp_path, scoring, q1):
    q, a, preds = _vqav2(tmp_path)
    out = tmp_path / "o"
    argv = ["--task", "vqa", "--predictions", str(preds), "--data", str(q), "--format", "vqav2"]
    argv += ["--annotations", str(a), "--out", str(out)] + (["--vqa-scoring", scoring] if scoring else [])
    assert main_eval(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["vqa_scoring"] == (scoring or "official")
    assert m["accuracy"] == pytest.approx((q1 + 0.6 + 1.0) / 3)  # ten "2" vs "Two"; 2 of 10 "yes"; exact
    assert (
        m["by_answer_type"]["number"]["accuracy"] == q1 and m["by_answer_type"]["yes/no"]["accuracy"] == 0.6
    )
    # exact match compares as the scoring does: "Two" equals none of ten "2" officially
    assert m["exact_match"] == pytest.approx((2 + (scoring == "lenient")) / 3)
    md = (out / "report.md").read_text()
    assert f"VQA scoring: {scoring or 'official'}" in md and "## By answer type" in md


def test_official_scoring_needs_several_answers_and_vqav2_needs_annotations(tmp_path, capsys):
    preds = _predictions(tmp_path / "p.jsonl", [{"id": "1", "answer": "red", "references": ["red"]}])
    argv = [
        "--task",
        "vqa",
        "--predictions",
        str(preds),
        "--vqa-scoring",
        "official",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main_eval(argv) == 2
    assert "record '1': official VQAv2 scoring needs the human answers" in _err(capsys)
    q, _, preds = _vqav2(tmp_path)
    with pytest.raises(SystemExit):
        main_eval(["--task", "vqa", "--predictions", str(preds), "--data", str(q), "--format", "vqav2"])
    assert "needs --annotations" in _err(capsys)


def test_rescoring_keeps_the_scoring_a_run_used(tmp_path):
    q, a, preds = _vqav2(tmp_path)
    first = tmp_path / "first"
    argv = ["--task", "vqa", "--predictions", str(preds), "--data", str(q), "--format", "vqav2"]
    assert main_eval(argv + ["--annotations", str(a), "--out", str(first)]) == 0
    again = tmp_path / "again"
    assert (
        main_eval(["--task", "vqa", "--predictions", str(first / "predictions.jsonl"), "--out", str(again)])
        == 0
    )
    m = json.loads((again / "metrics.json").read_text())
    assert m["vqa_scoring"] == "official" and m["accuracy"] == pytest.approx(1.6 / 3)


# --- Also: image paths that leave the image root, per record ------------------------------------------
def test_image_paths_escaping_the_root_fail_per_record(tmp_path):
    root = tmp_path / "root"
    _png(root / "in.png")
    _png(tmp_path / "secret.png", (0, 0, 255))
    os.symlink(tmp_path / "secret.png", root / "link.png")  # a link leading outside
    os.symlink(tmp_path, root / "up")  # a linked folder leading outside
    os.symlink(root / "in.png", root / "alias.png")  # a link that stays inside: fine
    images = {
        "ok": "in.png",
        "alias": "alias.png",
        "dotdot": "../secret.png",
        "absolute": str(tmp_path / "secret.png"),
        "link": "link.png",
        "linked_dir": "up/secret.png",
    }
    recs = [
        Record(k, [v], [Turn("user", "<image>\nColor?")], {"answer": "red"}, "d.json")
        for k, v in images.items()
    ]
    opened = []

    def loader(path):
        opened.append(path)
        return Image.open(path).convert("RGB")

    m = run.run_eval(EchoPredictor(), recs, "vqa", tmp_path / "o", image_root=root, image_loader=loader)
    rows = {
        r["id"]: r
        for r in (json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines())
    }
    assert rows["ok"]["score"] == 1.0 and rows["alias"]["score"] == 1.0
    for rid in ("dotdot", "absolute", "link", "linked_dir"):
        assert "path escapes image root" in rows[rid]["error"] and rows[rid]["score"] == 0.0
    assert m["failures"] == 4 and m["n"] == 6
    assert not any("secret" in p or "link" in p or "up/" in p for p in opened)  # neither scored nor drawn


# --- Also: no raw tracebacks ---------------------------------------------------------------------------
def test_null_answer_in_predictions_names_line_and_field(tmp_path, capsys):
    preds = _predictions(
        tmp_path / "p.jsonl",
        [
            {"id": "1", "answer": "red", "references": ["red"]},
            {"id": "2", "answer": None, "references": ["red"]},
        ],
    )
    assert main_eval(["--task", "vqa", "--predictions", str(preds), "--out", str(tmp_path / "o")]) == 2
    assert f"{preds} line 2 (id '2'): field 'answer': expected a string, got null" in _err(capsys)
    _predictions(preds, [{"question_id": 1, "text": None}])
    data = _llava(tmp_path / "d.json", n=1)
    argv = ["--task", "vqa", "--predictions", str(preds), "--data", str(data), "--out", str(tmp_path / "o")]
    assert main_eval(argv) == 2 and "field 'text': expected a string, got null" in _err(capsys)


@pytest.mark.parametrize("where", ["data", "data_jsonl", "predictions", "annotations"])
def test_json_nested_100k_deep_is_a_message(tmp_path, capsys, monkeypatch, where):
    deep = "[" * 100_000 + "]" * 100_000
    model, predictor = _model(tmp_path, monkeypatch)
    out = str(tmp_path / "o")
    if where.startswith("data"):
        path = tmp_path / ("d.jsonl" if where == "data_jsonl" else "d.json")
        path.write_text(deep)
        argv = [str(model), "--task", "vqa", "--data", str(path), "--out", out]
    elif where == "predictions":
        path = tmp_path / "p.jsonl"
        path.write_text(deep)
        argv = ["--task", "vqa", "--predictions", str(path), "--out", out]
    else:
        q, path, _ = _vqav2(tmp_path)
        path.write_text(deep)
        argv = [
            str(model),
            "--task",
            "vqa",
            "--data",
            str(q),
            "--format",
            "vqav2",
            "--annotations",
            str(path),
        ]
    assert main_eval(argv) == 2
    assert f"{path}" in (err := _err(capsys)) and "nested too deeply" in err and "Traceback" not in err


def test_missing_or_wrong_model_path_names_it(tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(command, "load_generator", never)
    data = _llava(tmp_path / "d.json")
    missing = tmp_path / "no" / "model"
    assert main_eval([str(missing), "--task", "vqa", "--data", str(data)]) == 2
    assert f"MODEL_DIR {missing}: no such directory" in _err(capsys)
    assert main_eval([str(missing), "--task", "text"]) == 2  # an absolute path is never a hub id
    assert "no such directory" in _err(capsys)
    assert main_eval([str(tmp_path), "--task", "vqa", "--data", str(data)]) == 2
    assert f"not a trained vistune model (no {MODEL_FILE} in it)" in _err(capsys)

    def damaged(name, batch_size):
        raise KeyError("model")  # what a vistune.json without its 'model' section gives

    monkeypatch.setattr(command, "load_generator", damaged)
    (tmp_path / MODEL_FILE).write_text("{}")
    assert main_eval([str(tmp_path), "--task", "vqa", "--data", str(data)]) == 2
    assert f"MODEL_DIR {tmp_path}: cannot load the model (KeyError: 'model')" in _err(capsys)


def test_unexpected_errors_are_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    model, _ = _model(tmp_path, monkeypatch)

    class Broken:
        def answer(self, conversations, images, max_new_tokens=32):
            raise KeyError("boom")

    monkeypatch.setattr(command, "load_generator", lambda name, batch_size: Broken())
    data = _llava(tmp_path / "d.json")
    argv = [str(model), "--task", "vqa", "--data", str(data), "--out", str(tmp_path / "o")]
    assert main_eval(argv) == 1
    assert "internal error: KeyError: 'boom' (--debug shows where)" in _err(capsys)
    with pytest.raises(KeyError):
        main_eval(argv + ["--debug"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["m", "--task", "vqa", "--predictions", "p.jsonl"], "not both"),
        (["--task", "vqa", "--predictions", "p.jsonl", "--format", "pope"], "give --data too"),
        (
            ["m", "--task", "pope", "--data", "d.json", "--vqa-scoring", "official"],
            "only applies to --task vqa",
        ),
        (
            ["m", "--task", "vqa", "--data", "d.json", "--image-root", "/no/such/dir"],
            "--image-root /no/such/dir",
        ),
        (
            ["m", "--task", "vqa", "--data", "d.json", "--batch-size", "0"],
            "--batch-size: expected an integer",
        ),
    ],
)
def test_flag_combinations_that_cannot_work(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main_eval(argv)
    assert e.value.code == 2 and message in _err(capsys)


def test_help_lists_retrieval(capsys):
    with pytest.raises(SystemExit):
        main_eval(["--help"])
    assert "retrieval" in capsys.readouterr().out.split("--task")[1]


def test_retrieval_refuses_bad_limit_empty_data_and_escaping_images(tmp_path, capsys, monkeypatch):
    from vistune.eval import retrieval

    monkeypatch.setattr(retrieval, "load_contrastive", lambda path: pytest.fail("model loaded"))
    data = tmp_path / "pairs.jsonl"
    data.write_text("")
    argv = ["model", "--data", str(data), "--out", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="no records to evaluate"):
        retrieval.main_eval_retrieval(argv)
    with pytest.raises(SystemExit):
        retrieval.main_eval_retrieval(argv + ["--limit", "-1"])
    assert "--limit: expected an integer >= 1" in _err(capsys)
    _png(tmp_path / "outside.png")
    (tmp_path / "root").mkdir()
    os.symlink(tmp_path / "outside.png", tmp_path / "root" / "x.png")
    data.write_text(json.dumps({"image": "x.png", "caption": "a red square"}) + "\n")
    with pytest.raises(ValueError, match="record .*field 'image'.*path escapes image root"):
        retrieval.main_eval_retrieval(argv + ["--image-root", str(tmp_path / "root")])
