"""Bad inputs to `vistune data synth`: each answered with a clear error naming what is wrong,
or a counted skip (the corpus and its runner: tests/bad_inputs.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from bad_inputs import (
    Case,
    World,
    _json,
    params,
    run_case,
)

# --- data synth -------------------------------------------------------------------------------------------

SMALL = ("--train", "1", "--val", "0", "--test", "0", "--compositional", "0", "--shifted", "0",
         "--workers", "1")  # fmt: skip


def _synth(name: str, needles: tuple[str, ...], prepare: Callable[[Path], Path], *args: str, **kw) -> Case:
    """`vistune data synth --out OUT` where `prepare(tmp)` makes OUT; `args` replace the small sizes."""

    def setup(tmp: Path, world: World) -> list[str]:
        out = prepare(tmp)
        return ["data", "synth", "--out", str(out), *SMALL, *args]

    return Case("synth", name, setup, 2, needles, **kw)


def _file(tmp: Path) -> Path:
    (tmp / "file.txt").write_text("mine")
    return tmp / "file.txt"


def _foreign_dir(tmp: Path) -> Path:
    (tmp / "notes").mkdir()
    (tmp / "notes" / "todo.txt").write_text("mine")
    return tmp / "notes"


def _old_output_plus_mine(tmp: Path) -> Path:
    out = tmp / "world"
    _json(out / "manifest.json", {"seed": 0, "sizes": {}, "counts": {}, "held_out": []})
    (out / "mine.txt").write_text("mine")
    return out


def synth_cases() -> list[Case]:
    """`vistune data synth`: bad --out targets and bad counts, refused before anything is written."""
    new = lambda tmp: tmp / "world"  # noqa: E731
    return [
        _synth("out-is-a-file", ("file.txt", "exists and is not a directory"), _file),
        _synth(
            "out-under-a-file", ("file.txt", "cannot create the output directory"), lambda t: _file(t) / "sub"
        ),
        _synth("out-is-a-foreign-dir", ("notes", "not a shapes-world dataset"), _foreign_dir),
        _synth("old-output-holds-a-foreign-file", ("world", "also holds mine.txt"), _old_output_plus_mine),
        _synth("negative-count", ("--train", "whole number >= 0"), new, "--train", "-1"),
        _synth("count-not-a-number", ("--val", "'abc'"), new, "--val", "abc"),
        _synth("every-count-zero", ("nothing to write",), new, "--train", "0"),
        _synth("image-size-too-small", ("--image-size", "at least"), new, "--image-size", "4"),
        _synth("zero-workers", ("--workers", "at least 1"), new, "--workers", "0"),
        _synth("seed-not-a-number", ("--seed", "invalid int value"), new, "--seed", "x"),
        _synth("unknown-flag", ("unrecognized arguments: --splits",), new, "--splits", "3"),
        Case("synth", "no-out", lambda t, w: ["data", "synth", *SMALL], 2, ("--out",)),
    ]


CASES = synth_cases()


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case: Case, tmp_path, request, capsys, monkeypatch):
    run_case(case, tmp_path, request, capsys, monkeypatch)
