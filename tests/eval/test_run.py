"""The runner, reports and CLI with a fake predictor: batching, failures, files written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import FakePredictor
from PIL import Image

from vistune.data.records import Record, Turn
from vistune.eval import command, run, text_bench
from vistune.eval.report import read_predictions
from vistune.model.vlm import MODEL_FILE


def _image(root, name, color=(255, 0, 0)):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return name


def _rec(rid, question, image=None, **meta):
    text = f"<image>\n{question}" if image else question
    return Record(
        id=rid, images=[image] if image else [], turns=[Turn("user", text)], meta=meta, source="t.json"
    )


def _model_dir(tmp_path, name="m"):
    """A folder that passes the CLI's model check (the loader itself is monkeypatched)."""
    path = tmp_path / name
    path.mkdir(exist_ok=True)
    (path / MODEL_FILE).write_text("{}")
    return path


def _vqa_records(tmp_path):
    recs = [
        _rec(
            f"q{i}",
            f"What color is shape {i}?",
            _image(tmp_path, f"{i}.png"),
            answer="red",
            question_type="color",
        )
        for i in range(5)
    ]
    recs.append(_rec("missing", "What color is shape 9?", "nope.png", answer="red", question_type="color"))
    (tmp_path / "corrupt.png").write_bytes(b"not a png at all")
    recs.append(_rec("corrupt", "What color is shape 8?", "corrupt.png", answer="red", question_type="color"))
    # malformed: an image but no placeholder in the prompt
    recs.append(Record("noplace", ["0.png"], [Turn("user", "What?")], {"answer": "red"}, "t.json"))
    return recs


def test_evaluate_batches_and_scores_failures(tmp_path):
    pred = FakePredictor({"shape 0": "Red.", "shape 1": "red", "shape 2": "blue", "shape 9": "red"})
    rows, m = run.evaluate(pred, _vqa_records(tmp_path), "vqa", image_root=tmp_path, batch_size=2)
    assert len(rows) == 8  # every record gives a row, none dropped
    assert sum(pred.batches) == 5 and max(pred.batches) <= 2
    assert m["failures"] == 3 and set(m["failed_ids"]) == {"missing", "corrupt", "noplace"}
    by_id = {r["id"]: r for r in rows}
    assert "missing image" in by_id["missing"]["error"] and by_id["missing"]["score"] == 0.0
    assert "placeholder" in by_id["noplace"]["error"]
    # 'noplace' is malformed: listed as a failure but not scored; missing/corrupt images score 0
    assert m["accuracy"] == pytest.approx(2 / 7) and m["exact_match"] == pytest.approx(2 / 7)
    assert m["by_question_type"] == {"color": {"accuracy": pytest.approx(2 / 7), "n": 7}}
    assert m["n"] == 7 and m["n_records"] == 8 and m["timing"]["records_per_s"] > 0


def test_evaluate_batches_prompts_of_similar_length_and_keeps_record_order():
    questions = ["q" * n for n in (9, 1, 7, 3, 8, 2)]
    seen = []

    class Recorder(FakePredictor):
        def answer(self, conversations, images, max_new_tokens=32):
            seen.append([len(c[-1].content) for c in conversations])
            return [c[-1].content for c in conversations]

    records = [_rec(f"r{i}", q, answer=q) for i, q in enumerate(questions)]
    rows, m = run.evaluate(Recorder(), records, "vqa", batch_size=2)
    assert seen == [[1, 2], [3, 7], [8, 9]]  # shortest first: padding only within close lengths
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(6)] and m["accuracy"] == 1.0


def test_run_eval_writes_predictions_report_and_grid(tmp_path):
    out = tmp_path / "out"
    pred = FakePredictor({"shape 0": "red"})
    metrics = run.run_eval(pred, _vqa_records(tmp_path), "vqa", out, image_root=tmp_path, batch_size=3)
    rows = read_predictions(out / "predictions.jsonl")
    assert len(rows) == 8 and {"id", "prompt", "answer", "references", "correct", "score"} <= set(rows[0])
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == pytest.approx(metrics["accuracy"])
    md = (out / "report.md").read_text()
    assert "![samples" in md and "(grid.png)" in md and "## Failures (3)" in md and "`corrupt`" in md
    with Image.open(out / "grid.png") as im:
        assert im.size[0] > 200


def test_pope_task_per_setting(tmp_path):
    img = _image(tmp_path, "a.png")
    recs = [
        _rec("1", "Is there a circle?", img, answer="yes", pope_setting="random"),
        _rec("2", "Is there a star?", img, answer="no", pope_setting="random"),
        _rec("3", "Is there a square?", img, answer="yes", pope_setting="adversarial"),
        _rec("4", "Is there a moon?", img, answer="no", pope_setting="adversarial"),
    ]
    pred = FakePredictor({"circle": "Yes, there is.", "star": "Yes", "square": "No.", "moon": "I think not"})
    rows, m = run.evaluate(pred, recs, "pope", image_root=tmp_path)
    assert [r["parsed"] for r in rows] == ["yes", "yes", "no", "invalid"]
    assert m["overall"]["accuracy"] == 0.25 and m["random"]["yes_ratio"] == 1.0
    assert m["adversarial"]["invalid"] == 1


def test_classify_generative_and_zero_shot_hook(tmp_path):
    labels = ["circle", "square", "triangle"]
    recs = [
        _rec(f"c{i}", "What shape is this?", _image(tmp_path, f"{lab}.png"), label=lab)
        for i, lab in enumerate(labels)
    ]
    recs.append(_rec("odd", "What shape is this?", _image(tmp_path, "x.png"), label="hexagon"))
    seen = []

    class Recorder(FakePredictor):
        def answer(self, conversations, images, max_new_tokens=32):
            seen.extend(c[-1].content for c in conversations)
            return ["It is a square."] * len(conversations)

    rows, m = run.evaluate(Recorder(), recs, "classify", image_root=tmp_path, labels=labels)
    assert all("Answer with one of: circle, square, triangle." in s for s in seen)
    assert m["accuracy"] == pytest.approx(1 / 3) and m["failures"] == 1  # 'odd' has an unknown label
    assert m["confusion"]["matrix"][0] == [0, 1, 0, 0]

    def zero_shot(records, images, labs):
        assert len(records) == len(images) and list(labs) == labels
        return [r.meta["label"] for r in records]

    rows, m = run.evaluate(
        None, recs[:3], "classify", image_root=tmp_path, labels=labels, classifier=zero_shot
    )
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0
    run.run_eval(
        None, recs[:3], "classify", tmp_path / "cls", image_root=tmp_path, labels=labels, classifier=zero_shot
    )
    assert (tmp_path / "cls" / "confusion.png").exists()
    with pytest.raises(ValueError, match="only applies"):
        run.evaluate(None, recs, "vqa", classifier=zero_shot)


def test_caption_task(tmp_path):
    recs = [
        Record(
            f"k{i}",
            [_image(tmp_path, f"k{i}.png")],
            [Turn("user", "<image>\nDescribe."), Turn("assistant", cap)],
            {},
            "t.json",
        )
        for i, cap in enumerate(["a red circle", "two blue squares", "a green star"])
    ]
    pred = FakePredictor({"Describe": "a red circle"})
    rows, m = run.evaluate(pred, recs, "caption", image_root=tmp_path, meteor=False)
    assert rows[0]["score"] > rows[1]["score"] and rows[0]["correct"] is None
    assert 0 < m["BLEU-1"] <= 1 and m["failures"] == 0


def test_text_task_and_retention():
    records = text_bench.text_records()
    assert 40 <= len(records) <= 60 and len({r.id for r in records}) == len(records)
    oracle = FakePredictor({r.turns[0].content: r.meta["answers"][0] for r in records})
    _, good = run.evaluate(oracle, records, "text", batch_size=16)
    _, bad = run.evaluate(FakePredictor(default="Sorry."), records, "text", batch_size=16)
    assert good["accuracy"] == 1.0 and bad["accuracy"] == 0.0
    assert text_bench.retention(bad, good) == {"model_accuracy": 0.0, "base_accuracy": 1.0, "retention": 0.0}
    assert text_bench.retention(good, bad)["retention"] is None


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="valid tasks: vqa, caption, pope, classify, text"):
        run.evaluate(FakePredictor(), [], "ocr")


def _vqa_file(tmp_path) -> Path:
    """TMP/data/test/vqa.json: one colour question about TMP/data/images/test/0.png."""
    root = tmp_path / "data"
    _image(root / "images", "test/0.png")
    human = {"from": "human", "value": "<image>\nWhat color is the circle?"}
    record = {"id": "v0", "image": "test/0.png", "question_type": "color", "answer": "red",
              "conversations": [human, {"from": "gpt", "value": "red"}]}  # fmt: skip
    (root / "test").mkdir(parents=True, exist_ok=True)
    (root / "test" / "vqa.json").write_text(json.dumps([record]))
    return root / "test" / "vqa.json"


def test_cli_rescores_predictions_without_model(tmp_path, capsys):
    out = tmp_path / "first"
    recs = [
        _rec(f"q{i}", f"What color is shape {i}?", _image(tmp_path, f"{i}.png"), answer="red")
        for i in range(4)
    ]
    run.run_eval(FakePredictor({"shape 0": "red"}), recs, "vqa", out, image_root=tmp_path)
    lines = (out / "predictions.jsonl").read_text().splitlines()
    edited = [json.loads(line) for line in lines]
    edited[1]["answer"] = "red"
    (tmp_path / "edited.jsonl").write_text("\n".join(json.dumps(r) for r in edited))
    argv = ["--task", "vqa", "--predictions", str(tmp_path / "edited.jsonl"), "--out", str(tmp_path / "re")]
    assert command.main_eval(argv) == 0
    assert json.loads((tmp_path / "re" / "metrics.json").read_text())["accuracy"] == 0.5
    assert '"accuracy": 0.5' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        command.main_eval(["--task", "vqa"])  # neither a model nor predictions


def test_cli_with_model_and_base(tmp_path, monkeypatch, capsys):
    models = {
        "m": FakePredictor({"color": "red", "capital of France": "Paris"}),
        "smollm2": FakePredictor({"capital": "Paris", "2 + 2": "4"}),
    }
    monkeypatch.setattr(command, "load_generator", lambda name, batch_size: models[Path(name).name])
    model = _model_dir(tmp_path)
    data = _vqa_file(tmp_path)
    assert (
        command.main_eval(
            [
                str(model),
                "--task",
                "vqa",
                "--data",
                str(data),
                "--image-root",
                str(data.parents[1] / "images"),
                "--out",
                str(tmp_path / "v"),
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "v" / "metrics.json").read_text())["accuracy"] == 1.0
    assert (
        command.main_eval([str(model), "--task", "text", "--base", "smollm2", "--out", str(tmp_path / "t")])
        == 0
    )
    m = json.loads((tmp_path / "t" / "metrics.json").read_text())
    n = len(text_bench.QUESTIONS)
    assert m["retention"]["model_accuracy"] == pytest.approx(1 / n)
    assert m["retention"]["base_accuracy"] > m["retention"]["model_accuracy"]
    assert "Retention vs. base LLM smollm2" in (tmp_path / "t" / "report.md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        command.main_eval([str(model), "--task", "vqa", "--format", "coco", "--data", str(data)])
    assert exit_info.value.code == 2 and "'llava', 'vqav2'" in capsys.readouterr().err


def test_the_sample_grid_draws_answers_with_dollar_signs_as_text(tmp_path):
    from PIL import Image

    from vistune.eval.report import sample_grid

    Image.new("RGB", (8, 8), "white").save(tmp_path / "a.png")
    rows = [{"id": "r$1", "images": ["a.png"], "prompt": "<image>\nCost?", "answer": "A: poster$$ x^2$",
             "references": ["$5"], "correct": False}]  # fmt: skip
    assert sample_grid(rows, tmp_path, tmp_path / "grid.png").is_file()  # matplotlib maths would raise


def test_scores_by_any_field_the_records_carry(tmp_path):
    records = [
        _rec(f"q{i}", f"What color is shape {i}?", _image(tmp_path, f"{i}.png"), answer="red",
             question_type="color", source=["digits", "photos"][i % 2], level=i % 3)
        for i in range(6)
    ]  # fmt: skip
    pred = FakePredictor({f"shape {i}": "red" for i in (0, 2, 3)})
    rows, m = run.evaluate(pred, records, "vqa", image_root=tmp_path, group_by=["source", "level"])
    assert m["by_source"] == {"digits": {"accuracy": pytest.approx(2 / 3), "n": 3},
                              "photos": {"accuracy": pytest.approx(1 / 3), "n": 3}}  # fmt: skip
    assert m["by_level"]["0"] == {"accuracy": 1.0, "n": 2}  # values that are not strings, as JSON
    assert rows[0]["meta"]["source"] == "digits"
    out = tmp_path / "out"
    run.run_eval(pred, records, "vqa", out, image_root=tmp_path, group_by=["source"])
    assert "## By source" in (out / "report.md").read_text()
    _, again = run.rescore(out / "predictions.jsonl", "vqa", group_by=["source"])  # kept in the rows
    assert again["by_source"] == m["by_source"]
