"""Bad inputs to `vistune train`: each answered with a clear error naming what is wrong,
or a counted skip (the corpus and its runner: tests/bad_inputs.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import broken_images
import pytest
from bad_inputs import (
    Case,
    World,
    _json,
    _lines,
    _png,
    _rec,
    params,
    run_case,
)

# --- train ------------------------------------------------------------------------------------------------

VISION = {
    "kind": "clip",
    "image_size": 16,
    "patch_size": 4,
    "hidden_size": 16,
    "num_layers": 1,
    "num_heads": 2,
    "intermediate_size": 32,
}


def _train_data(tmp: Path, *extra: dict, images: dict[str, Callable[[Path], Any]] | None = None) -> Path:
    """tmp/images/{0..3}.png, their records and `extra` records in tmp/train.json; `images` writes more."""
    root = tmp / "images"
    records = []
    for i in range(4):
        _png(root / f"{i}.png", colour=(60 * i, 100, 200 - 40 * i))
        records.append(
            _rec(f"ok{i}", f"{i}.png", [["human", "<image>\nWhat colour?"], ["gpt", f"colour {i}"]])
        )
    for name, make in (images or {}).items():
        make(root / name)
    return _json(tmp / "train.json", records + list(extra))


def _base_config(tmp: Path, world: World) -> dict:
    """One vlm stage of one step on tmp/train.json (written here), a tiny CLIP + mlp2x_gelu + the tiny LLM."""
    data = tmp / "train.json" if (tmp / "train.json").exists() else _train_data(tmp)
    stage = {
        "name": "instruct",
        "kind": "vlm",
        "train": ["projector"],
        "max_steps": 1,
        "batch_size": 2,
        "max_length": 128,
        "lr": 0.01,
        "data": [{"path": str(data), "image_root": str(tmp / "images")}],
    }
    return {
        "out": str(tmp / "run"),
        "seed": 0,
        "save_every": 100,
        "model": {
            "vision": dict(VISION),
            "projector": {"name": "mlp2x_gelu"},
            "llm": {"name_or_path": str(world.llm)},
        },
        "stages": [stage],
    }


def _train(
    name: str,
    needles: tuple[str, ...],
    change: Callable[[dict, Path], Any] | None = None,
    *args: str,
    prepare: Callable[[Path], Any] | None = None,
    **kw,
) -> Case:
    """`vistune train tmp/config.yaml ARGS` on the base config after `change(config, tmp)`; `prepare(tmp)`
    runs first (data with bad records, an old run dir)."""

    def setup(tmp: Path, world: World) -> list[str]:
        if prepare is not None:
            prepare(tmp)
        cfg = _base_config(tmp, world)
        if change is not None:
            change(cfg, tmp)
        path = tmp / "config.yaml"
        path.write_text(json.dumps(cfg, indent=1), encoding="utf-8")  # JSON is YAML
        return ["train", str(path), *args]

    return Case("train", name, setup, 0 if kw.get("expect") == "skip" else 2, needles, **kw)


def _stage(**fields: Any) -> Callable[[dict, Path], None]:
    return lambda cfg, tmp: cfg["stages"][0].update(fields)


def _section(section: str, **fields: Any) -> Callable[[dict, Path], None]:
    return lambda cfg, tmp: cfg["model"][section].update(fields)


def _top(**fields: Any) -> Callable[[dict, Path], None]:
    return lambda cfg, tmp: cfg.update(fields)


def _config_text(text: str, name: str = "config.yaml") -> Callable[[Path, World], list[str]]:
    def setup(tmp: Path, world: World) -> list[str]:
        (tmp / name).write_text(text, encoding="utf-8")
        return ["train", str(tmp / name)]

    return setup


def _config_bytes(data: bytes) -> Callable[[Path, World], list[str]]:
    def setup(tmp: Path, world: World) -> list[str]:
        (tmp / "c.yaml").write_bytes(data)
        return ["train", str(tmp / "c.yaml")]

    return setup


def _stage_row(tmp: Path) -> dict:
    return next(r for r in _lines(tmp / "run" / "metrics.jsonl") if r.get("event") == "stage")


def _skipped_bad(n: int) -> Callable[[Path, str], None]:
    def check(tmp: Path, output: str) -> None:
        records = _stage_row(tmp)["records"]
        assert records.get("skipped_bad") == n and records["kept"] == 4, records
        assert "'skipped_bad': 1" in output  # said on the terminal too

    return check


def _dropped_too_long(tmp: Path, output: str) -> None:
    records = _stage_row(tmp)["records"]
    assert records.get("dropped_too_long") == 1 and records["kept"] == 4, records


def _old_run(tmp: Path) -> None:
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    _json(tmp / "run" / "config.json", {"seed": 0})


def _corrupt_checkpoint(tmp: Path) -> None:
    """A run whose only checkpoint is marked complete but holds a state.json cut short (and no sums)."""
    ckpt = tmp / "run" / "checkpoints" / "stage0-step00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("ok\n")
    (ckpt / "state.json").write_text('{"stage": 0, "st')


def _resumed_fresh(tmp: Path, output: str) -> None:
    """The broken checkpoint was skipped, saying so, and the run trained from the start to its end."""
    assert "resume: skipping checkpoint stage0-step00000001" in output, output
    assert (tmp / "run" / "model" / "vistune.json").is_file()
    assert [r["step"] for r in _lines(tmp / "run" / "metrics.jsonl") if "step" in r] == [0]


def _recorded_as_is(cfg: dict, tmp: Path) -> None:
    """A run dir whose recorded config is this one."""
    from vistune.config import config_from_dict

    _json(tmp / "run" / "config.json", config_from_dict(cfg).to_dict())


def _recorded_with_other_lr(cfg: dict, tmp: Path) -> None:
    """A run dir whose recorded config is this one with lr 0.5."""
    from vistune.config import config_from_dict

    other = json.loads(json.dumps(cfg))
    other["stages"][0]["lr"] = 0.5
    _json(tmp / "run" / "config.json", config_from_dict(other).to_dict())


def _folder(tmp: Path) -> None:
    for label in ("a", "b"):
        _png(tmp / "folder" / label / "0.png")


def _classify(cfg: dict, tmp: Path, **fields: Any) -> None:
    fields = {"train": ["vision"], **fields}
    cfg["stages"][0].update(kind="classify", name="labels", data=[{"path": str(tmp / "folder")}], **fields)


def _pairs(cfg: dict, tmp: Path) -> None:
    _png(tmp / "images" / "p.png")
    (tmp / "pairs.jsonl").write_text(json.dumps({"image": "p.png", "caption": "a thing"}) + "\n")
    cfg["stages"][0].update(
        kind="contrastive",
        name="clip",
        train=["vision"],
        options={"text_tower": str(tmp / "no-tower")},
        data=[{"path": str(tmp / "pairs.jsonl"), "image_root": str(tmp / "images")}],
    )


def _long(tmp: Path) -> Path:
    question = "word " * 400
    return _train_data(tmp, _rec("long", None, [["human", question], ["gpt", "yes"]]))


def train_cases() -> list[Case]:
    """`vistune train CONFIG`: config errors before any work, data errors naming the record, run dirs."""
    T, S, M = _train, _stage, _section
    return [
        Case(
            "train", "missing-config", lambda t, w: ["train", str(t / "missing.yaml")], 2, ("missing.yaml",)
        ),
        Case("train", "config-is-a-directory", lambda t, w: ["train", str(t)], 2, ("cannot read config",)),
        Case(
            "train",
            "yaml-syntax-error",
            _config_text("stages: [\n  - {name: s\n"),
            2,
            ("config.yaml", "cannot read config"),
        ),
        Case(
            "train",
            "yaml-top-level-list",
            _config_text("- 1\n- 2\n"),
            2,
            ("config.yaml", "expected a mapping, got list"),
        ),
        Case(
            "train", "non-utf8-config", _config_bytes(b"out: caf\xe9\n"), 2, ("c.yaml", "cannot read config")
        ),
        Case("train", "empty-config", _config_text(""), 2, ("no stages",)),
        T("unknown-top-level-field", ("unknown field(s) ['sedd']",), _top(sedd=1)),
        T("unknown-stage-field", ("stages[0]", "unknown field(s) ['learning_rate']"), S(learning_rate=0.1)),
        T(
            "renamed-projector-field",
            ("model.projector.words was renamed", "options.words"),
            M("projector", words=8),
        ),
        T("stages-not-a-list", ("stages: expected a list",), _top(stages={"name": "x"})),
        T("stage-without-name", ("stages[0]", "name"), lambda c, t: c["stages"][0].pop("name")),
        T("model-null", ("model: expected a mapping",), _top(model=None)),
        T("lr-negative", ("lr must be above 0, got -1",), S(lr=-1)),
        T("lr-not-a-number", ("stages[0].lr: expected float, got 'fast'",), S(lr="fast")),
        T("lr-vision-zero", ("lr_vision must be above 0",), S(lr_vision=0)),
        T("max-steps-zero", ("max_steps must be at least 1, got 0",), S(max_steps=0)),
        T("max-steps-fraction", ("stages[0].max_steps: expected", "1.5"), S(max_steps=1.5)),
        T("batch-size-zero", ("batch_size must be at least 1",), S(batch_size=0)),
        T("grad-accum-negative", ("grad_accum must be at least 1",), S(grad_accum=-2)),
        T("epochs-zero", ("epochs must be above 0",), S(epochs=0)),
        T("warmup-ratio-one-and-a-half", ("warmup_ratio in [0, 1)",), S(warmup_ratio=1.5)),
        T("weight-decay-negative", ("weight_decay must be >= 0",), S(weight_decay=-0.1)),
        T("max-length-zero", ("max_length must be at least 1",), S(max_length=0)),
        T("lora-rank-zero", ("lora_rank must be at least 1",), S(lora_rank=0)),
        T("max-grad-norm-zero", ("max_grad_norm must be above 0",), S(max_grad_norm=0)),
        T("on-bad-record-ignore", ("on_bad_record must be raise or skip",), S(on_bad_record="ignore")),
        T("train-unknown-part", ("train has ['decoder']",), S(train=["decoder"])),
        T("train-llm-and-lora", ("choose llm (full) or lora",), S(train=["llm", "lora"])),
        T("train-nothing", ("train is empty",), S(train=[])),
        T("unknown-kind", ("kind 'vqa' is not one of",), S(kind="vqa")),
        T("moved-key", ("stages[0]: pack moved: use stages[0].options.pack",), S(pack=True)),
        T(
            "another-kinds-option",
            ("stages[0].options: unknown field(s) ['text_tower']",),
            S(options={"text_tower": "x"}),
        ),
        T(
            "option-of-the-wrong-type",
            ("stages[0].options.pack: expected bool", "'maybe'"),
            S(options={"pack": "maybe"}),
        ),
        T(
            "part-the-kind-does-not-train",
            ("'labels'", "train names ['lora']", "this kind trains"),
            lambda c, t: _classify(c, t, train=["lora"]),
            prepare=_folder,
        ),
        T(
            "classify-on-a-file",
            ("'labels'", "reads one ImageFolder directory"),
            lambda c, t: _classify(c, t) or c["stages"][0].update(data=[{"path": str(t / "train.json")}]),
        ),
        T("contrastive-text-tower-missing", ("no-tower",), _pairs),
        T(
            "contrastive-loss-unknown",
            ("stages[0].options: loss 'triplet' is not one of",),
            S(kind="contrastive", options={"loss": "triplet"}),
        ),
        T(
            "lora-layers-beyond-the-llm",
            ("lora_layers must be 1..2, got 9",),
            S(train=["lora"], lora_layers=9),
        ),
        T("vision-kind-unknown", ("vision.kind 'vit'",), M("vision", kind="vit")),
        T("patch-size-zero", ("patch_size must be at least 1",), M("vision", patch_size=0)),
        T(
            "image-size-not-multiple-of-patch",
            ("image_size 18 is not a multiple of patch_size 4",),
            M("vision", image_size=18),
        ),
        T(
            "hidden-size-not-divisible-by-heads",
            ("hidden_size 15 is not divisible by num_heads",),
            M("vision", hidden_size=15),
        ),
        T("preprocess-unknown", ("vision.preprocess 'stretch'",), M("vision", preprocess="stretch")),
        T("resnet-depths-empty", ("resnet_depths",), M("vision", kind="resnet", resnet_depths=[])),
        T(
            "vision-weights-missing",
            ("nothere.safetensors",),
            lambda c, t: c["model"]["vision"].update(weights=str(t / "nothere.safetensors")),
        ),
        T(
            "vision-name-missing",
            ("vision.name_or_path", "no-such-tower"),
            lambda c, t: c["model"]["vision"].update(name_or_path=str(t / "no-such-tower")),
        ),
        T("projector-unknown", ("projector 'mlp9'", "valid names"), M("projector", name="mlp9")),
        T(
            "projector-num-queries-zero",
            ("projector.num_queries must be at least 1",),
            M("projector", num_queries=0),
        ),
        T("llm-dtype-abc", ("llm.dtype 'abc'",), M("llm", dtype="abc")),
        T(
            "llm-missing-dir",
            ("no-llm", "cannot load its tokenizer"),
            lambda c, t: c["model"]["llm"].update(name_or_path=str(t / "no-llm")),
        ),
        T(
            "llm-from-config-without-type",
            ("from_config needs a model_type",),
            M("llm", from_config={"hidden_size": 8}),
        ),
        T(
            "llm-from-config-unknown-type",
            ("llm.from_config: cannot build a 'nope' causal LM", "model_type"),
            M("llm", from_config={"model_type": "nope"}),
        ),
        T(
            "from-pretrained-missing-dir",
            ("no-llava", "LLaVA"),
            lambda c, t: c["model"].update(from_pretrained=str(t / "no-llava")),
        ),
        T(
            "from-pretrained-not-llava",
            ("LLaVA",),
            lambda c, t: c["model"].update(from_pretrained=c["model"]["llm"]["name_or_path"]),
        ),
        T("data-empty", ("stage 'instruct': data is empty",), _stage(data=[])),
        T(
            "stage-names-repeated",
            ("every stage needs its own name", "['instruct']"),
            lambda c, t: c["stages"].append(dict(c["stages"][0])),
        ),
        T(
            "data-file-missing",
            ("nothere.json", "no such file"),
            lambda c, t: c["stages"][0]["data"][0].update(path=str(t / "nothere.json")),
        ),
        T(
            "data-wrong-format",
            ("data.csv", "expected a .json or .jsonl"),
            lambda c, t: (
                (t / "data.csv").write_text("a,b")
                and c["stages"][0]["data"][0].update(path=str(t / "data.csv"))
            ),
        ),
        T(
            "data-limit-zero",
            ("limit must be at least 1",),
            lambda c, t: c["stages"][0]["data"][0].update(limit=0),
        ),
        T(
            "data-where-matches-nothing",
            ("no record matches where=",),
            lambda c, t: c["stages"][0]["data"][0].update(where={"split": "nowhere"}),
        ),
        T(
            "data-where-not-a-mapping",
            ("stages[0].data[0].where", "got []"),
            lambda c, t: c["stages"][0]["data"][0].update(where=[]),
        ),
        T("data-without-path", ("data[0]", "path"), lambda c, t: c["stages"][0]["data"][0].pop("path")),
        T("seed-true", ("seed: expected int, got True",), _top(seed=True)),
        T("save-every-zero", ("save_every must be at least 1",), _top(save_every=0)),
        T("keep-last-zero", ("keep_last must be at least 1",), _top(keep_last=0)),
        T("set-without-equals", ("override 'stages.0.lr'",), None, "--set", "stages.0.lr"),
        T(
            "set-out-of-range-index",
            ("override 'stages.5.lr=1'", "does not name a field"),
            None,
            "--set",
            "stages.5.lr=1",
        ),
        T(
            "set-bad-value",
            ("stages[0].batch_size: expected int, got 'two'",),
            None,
            "--set",
            "stages.0.batch_size=two",
        ),
        T("out-is-a-file", ("run", "not a directory"), prepare=lambda t: (t / "run").write_text("x")),
        T(
            "resume-past-a-corrupt-checkpoint",
            (),
            _recorded_as_is,
            "--resume",
            prepare=_corrupt_checkpoint,
            expect="skip",
            check=_resumed_fresh,
        ),
        T("fresh-run-into-an-old-run", ("holds a previous run", "--resume", "--overwrite"), prepare=_old_run),
        T(
            "resume-with-another-config",
            ("--resume with a config that differs", "stages[0].lr: 0.5 -> 0.01"),
            _recorded_with_other_lr,
            "--resume",
        ),
        T(
            "bad-record-raise",
            ("train.json record 'r-missing'", "missing image"),
            prepare=lambda t: _train_data(t, _rec("r-missing", "nothere.png")),
        ),
        T(
            "bad-role-record-raise",
            ("train.json record 'r-role'", "unknown role 'robot'"),
            prepare=lambda t: _train_data(t, _rec("r-role", "0.png", [["human", "<image>"], ["robot", "x"]])),
        ),
        T(
            "every-record-bad-skip",
            ("no usable records", "skipped_bad"),
            lambda c, t: (
                c["stages"][0].update(on_bad_record="skip")
                or c["stages"][0]["data"][0].update(
                    path=str(_json(t / "bad.json", [_rec("b1", "x.png"), _rec("b2", "y.png")]))
                )
            ),
        ),
        T(
            "short-png-record-skip",
            (),
            S(on_bad_record="skip"),
            expect="skip",
            check=_skipped_bad(1),
            prepare=lambda t: _train_data(
                t, _rec("r-short", "short.png"), images={"short.png": broken_images.short_png}
            ),
        ),
        T("too-long-record-dropped", (), prepare=_long, expect="skip", check=_dropped_too_long),
    ]


CASES = train_cases()


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case: Case, tmp_path, request, capsys, monkeypatch):
    run_case(case, tmp_path, request, capsys, monkeypatch)
