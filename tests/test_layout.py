"""The layout: the core never imports the shapes world, which plugs into the core's tables from above."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from vistune.extensions import load_extensions
from vistune.model.projector import PROJECTORS
from vistune.train.kinds import stage_kinds

PACKAGE = Path(__file__).resolve().parent.parent / "vistune"
WING = "vistune.shapes"


def _imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names; `from . import x` resolved against its package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def _core_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "shapes" not in p.relative_to(PACKAGE).parts]


def test_the_core_never_imports_the_shapes_world():
    files = _core_files()
    assert len(files) > 30  # the walk found the package
    offenders = {
        str(p.relative_to(PACKAGE.parent)): sorted(
            m for m in _imports(p) if m == WING or m.startswith(WING + ".")
        )
        for p in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_walk_sees_imports_of_every_form(tmp_path):
    """The check itself can fail: each way of importing the wing is caught."""
    fake = PACKAGE / "model" / "_probe_for_layout_test.py"
    for source in (
        "import vistune.shapes.synth",
        "from vistune.shapes import synth",
        "from vistune import shapes",
    ):
        fake.write_text(source + "\n", encoding="utf-8")
        try:
            assert any(m.startswith(WING) for m in _imports(fake)), source
        finally:
            fake.unlink()


def test_the_shapes_world_plugs_in_through_its_entry_point():
    load_extensions()
    assert {"visual_words", "object_words"} <= set(PROJECTORS)
    assert set(stage_kinds()) == {"vlm", "contrastive", "classify", "scene"}


def test_a_name_cannot_be_taken_twice():
    from vistune.model.projector import register_projector

    with pytest.raises(ValueError, match="'linear' is already registered"):
        register_projector("linear", object)
