"""The layout: the core's areas import only the areas below them, and the core never imports nor names the
shapes world, which plugs into the core's tables from above through its entry point."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

from vistune import extensions
from vistune.extensions import load_extensions
from vistune.model.projector import projectors
from vistune.train.kinds import stage_kinds

PACKAGE = Path(__file__).resolve().parent.parent / "vistune"
WING = "shapes"
# The core's areas, bottom to top: a file may import its own area and those below it, never above.
LAYERS = (
    "extensions", "config", "data", "model", "train", "infer", "eval", "interop", "commands", "api", "cli",
    "__init__",
)  # fmt: skip
# What the core may not name: the wing and its parts (as identifiers, or in strings other than docstrings,
# where English such as "shapes keep their proportions" is no reference).
EXTENSION_NAMES = ("shapes", "visual_words", "object_words", "scene")
NAMED = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(EXTENSION_NAMES) + r")(?![A-Za-z0-9])")


def _type_only(tree: ast.Module) -> set[int]:
    """ids of the statements inside `if TYPE_CHECKING:` blocks (imports for annotations only)."""
    return {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for stmt in node.body
        for child in ast.walk(stmt)
    }


def _imports(path: Path, root: Path = PACKAGE) -> set[str]:
    """Every module a file imports at run time (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(root.parent).with_suffix("").parts[:-1])
    skip, found = _type_only(tree), set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def _area(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return parts[0]


def _core_files(root: Path = PACKAGE) -> list[Path]:
    return [p for p in root.rglob("*.py") if WING not in p.relative_to(root).parts]


def _wrong_imports(root: Path = PACKAGE) -> dict[str, list[str]]:
    """file -> the vistune modules it imports from the wing or from an area above its own."""
    wrong = {}
    for path in _core_files(root):
        rank = LAYERS.index(_area(path, root))
        bad = []
        for module in sorted(_imports(path, root)):
            parts = module.split(".")
            if parts[0] != "vistune" or len(parts) < 2:
                continue
            if parts[1] == WING or (parts[1] in LAYERS and LAYERS.index(parts[1]) > rank):
                bad.append(module)
        if bad:
            wrong[str(path.relative_to(root.parent))] = bad
    return wrong


def _docstrings(tree: ast.Module) -> set[int]:
    holders = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, holders)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
        and isinstance(node.body[0].value.value, str)
    }


def _names_in(path: Path) -> list[str]:
    """Where a file names the wing: identifiers with one of EXTENSION_NAMES as a word, and strings (not
    docstrings) holding one, as `line: text`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs, found = _docstrings(tree), []
    for node in ast.walk(tree):
        words = {
            ast.Name: lambda n: [n.id], ast.Attribute: lambda n: [n.attr], ast.arg: lambda n: [n.arg],
            ast.FunctionDef: lambda n: [n.name], ast.ClassDef: lambda n: [n.name],
            ast.keyword: lambda n: [n.arg or ""], ast.alias: lambda n: [n.name, n.asname or ""],
        }.get(type(node), lambda n: [])(node)  # fmt: skip
        found += [f"{node.lineno}: {w}" for w in words if NAMED.search(w.replace("_", " ").replace(".", " "))]
        found += [f"{node.lineno}: {w}" for w in words if "visual_words" in w or "object_words" in w]
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if NAMED.search(node.value):
                found.append(f"{node.lineno}: {node.value[:80]!r}")
    return sorted(set(found))


def test_every_area_imports_only_those_below_it_and_never_the_wing():
    files = _core_files()
    assert len(files) > 30  # the walk found the package
    assert {_area(p, PACKAGE) for p in files} <= set(LAYERS)
    assert _wrong_imports() == {}


def test_the_core_never_names_the_wing():
    named = {str(p.relative_to(PACKAGE.parent)): _names_in(p) for p in _core_files()}
    assert {k: v for k, v in named.items() if v} == {}


@pytest.mark.parametrize(
    "area, source",
    [
        ("model", "import vistune.shapes.synth"),
        ("model", "from vistune.shapes import synth"),
        ("model", "from vistune import shapes"),
        ("model", "from ..shapes import synth"),
        ("train", "from vistune.eval.metrics import classification_metrics"),
        ("train", "from vistune.interop import llava"),
        ("train", "from ..commands.start import start_model"),
        ("data", "import vistune.model.vlm"),
    ],
)
def test_the_import_check_can_fail(tmp_path, area, source):
    """A copy of the package with one forbidden import (the source tree is not touched) fails the check."""
    root = Path(shutil.copytree(PACKAGE, tmp_path / "vistune", ignore=shutil.ignore_patterns("__pycache__")))
    (root / area / "_probe.py").write_text(source + "\n", encoding="utf-8")
    assert list(_wrong_imports(root)) == [f"vistune/{area}/_probe.py"]


def test_type_only_imports_do_not_count(tmp_path):
    probe = tmp_path / "vistune" / "config" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vistune.train import loop\n"
    )
    assert _imports(probe, tmp_path / "vistune") == {"typing", "typing.TYPE_CHECKING"}


@pytest.mark.parametrize(
    "source",
    [
        'KIND = "scene"\n',
        'def f():\n    """Docstrings may say shapes."""\n    return "Evaluation suite: shapes world"\n',
        "from vistune.x import visual_words\n",
        "object_words_cache = {}\n",
        'ROUTE = ("--suite", "shapes")\n',
    ],
)
def test_the_name_check_can_fail(tmp_path, source):
    probe = tmp_path / "probe.py"
    probe.write_text(source, encoding="utf-8")
    assert _names_in(probe)


def test_the_name_check_lets_english_in_docstrings_and_other_words_pass(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('"""Pad keeps shapes in proportion."""\nscenes = "tensor shape"\n', encoding="utf-8")
    assert _names_in(probe) == []


def test_the_shapes_world_plugs_in_through_its_entry_point():
    load_extensions()
    assert {"visual_words", "object_words"} <= set(projectors())
    assert set(stage_kinds()) == {"vlm", "contrastive", "classify", "clm", "mlm", "nsp", "plm", "scene"}
    assert {"quickstart", "data synth"} <= set(extensions.COMMANDS) and "shapes" in extensions.SUITES
    assert extensions.REPORT_SECTIONS["shapes"]


def test_the_documented_entry_point_is_the_declared_one():
    text = (PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split(f'[project.entry-points."{extensions.GROUP}"]\n')[1].split("\n[")[0]
    declared = [line for line in section.splitlines() if line and not line.startswith("#")]
    assert declared == ['shapes = "vistune.shapes.plugin:register"']
    assert f"    {declared[0]}\n" in extensions.__doc__


def test_a_name_cannot_be_taken_twice(monkeypatch):
    monkeypatch.setattr(extensions, "PROJECTORS", dict(extensions.PROJECTORS))
    extensions.register_projector("mine", "pkg.module:Mine")
    extensions.register_projector("mine", "pkg.module:Mine")  # the same part again: fine
    with pytest.raises(ValueError, match="projector 'mine' is already registered"):
        extensions.register_projector("mine", "pkg.module:Other")
    extensions.register_projector("linear", "pkg.module:Mine")
    with pytest.raises(ValueError, match=r"projector\(s\) \['linear'\] are built in"):
        projectors()
