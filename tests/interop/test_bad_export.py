"""Bad inputs to `vistune export`: each answered with a clear error naming what is wrong,
or a counted skip (the corpus and its runner: tests/bad_inputs.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from bad_inputs import (
    Case,
    World,
    _broken,
    _png,
    params,
    run_case,
)

# --- export -----------------------------------------------------------------------------------------------


def _export(name: str, needles: tuple[str, ...], argv: Callable[[Path, World], list[str]], **kw) -> Case:
    return Case("export", name, lambda tmp, world: ["export", *argv(tmp, world)], 2, needles, **kw)


def _to(model: Callable[[Path, World], Path], *args: str) -> Callable[[Path, World], list[str]]:
    """`export MODEL --out tmp/hf ARGS`."""
    return lambda tmp, world: [str(model(tmp, world)), "--out", str(tmp / "hf"), *args]


def export_cases() -> list[Case]:
    """`vistune export MODEL --out DIR`: not a model, what the format cannot hold, where it cannot go."""
    model = lambda t, w: w.model  # noqa: E731
    return [
        _export("model-missing", ("no-model", "not a vistune model dir"), _to(lambda t, w: t / "no-model")),
        _export("plain-llm-dir", ("not a vistune model dir",), _to(lambda t, w: w.llm)),
        _export(
            "out-not-empty",
            ("hf", "exists and is not empty", "--overwrite"),
            lambda t, w: (_png(t / "hf" / "keep.png"), [str(w.model), "--out", str(t / "hf")])[1],
        ),
        _export(
            "out-is-a-file",
            ("hf", "not a directory", "--out"),
            lambda t, w: ((t / "hf").write_text("x"), [str(w.model), "--out", str(t / "hf")])[1],
        ),
        _export("format-unknown", ("--format", "invalid choice: 'onnx'"), _to(model, "--format", "onnx")),
        _export("dtype-unknown", ("--dtype", "invalid choice: 'int8'"), _to(model, "--dtype", "int8")),
        _export("no-out", ("--out",), lambda t, w: [str(w.model)]),
        _export(
            "resampler-projector",
            ("cannot hold a projector 'resampler'", "mlp2x_gelu"),
            _to(lambda t, w: w.resampler_model),
        ),
        _export("resnet-tower", ("cannot hold a vision tower 'resnet'",), _to(lambda t, w: w.resnet_model)),
        _export(
            "model-json-corrupt",
            ("vistune.json",),
            _to(_broken(lambda m: (m / "vistune.json").write_text("["))),
        ),
        _export(
            "weights-missing",
            ("vision_projector.safetensors",),
            _to(_broken(lambda m: (m / "vision_projector.safetensors").unlink())),
        ),
        _export(
            "max-shard-size-nonsense",
            ("--max-shard-size", "huge"),
            _to(model, "--max-shard-size", "huge", "--no-check"),
        ),
    ]


CASES = export_cases()


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case: Case, tmp_path, request, capsys, monkeypatch):
    run_case(case, tmp_path, request, capsys, monkeypatch)
