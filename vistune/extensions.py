"""The plug-in contract: how packages add projectors, stage kinds, commands, evaluation suites and report
sections to vistune from above, so the core never names them.

An extension declares an entry point in the group `vistune.extensions` whose target is a function of no
arguments that calls the `register_*` functions below. The built-in shapes world is one; pyproject.toml
declares it as

    [project.entry-points."vistune.extensions"]
    shapes = "vistune.shapes.plugin:register"

Each part is named by a target: `"module:attribute"` (imported only when the part is first used, so
`vistune --help` and loading a config stay fast) or the object itself. Extensions are loaded once per
process, when a table is first looked up (`load_extensions`), so a saved model that uses an extension's
projector loads anywhere the extension is installed. A name cannot be taken twice by different parts,
and an extension cannot take a built-in name (the core's tables check when they join both).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vistune.config import Stage

GROUP = "vistune.extensions"
Target = Any  # "module:attribute", or the object itself


@dataclass(frozen=True)
class ProjectorPart:
    """A projector: `factory(ProjectorConfig, ProjectorContext) -> nn.Module` (see
    `vistune.model.projector`); `upgrade(saved projector config: dict) -> dict` brings a config saved by
    an earlier version of the extension into today's form when a model dir loads (None: nothing to do)."""

    factory: Target
    upgrade: Target | None = None


@dataclass(frozen=True)
class StageKindPart:
    """A stage kind: `factory(Stage, VLM, StageContext) -> Objective` (see `vistune.train.objective`).

    `options`: the dataclass (a `vistune.config.StageOptions`) that a stage's `options` mapping is read
    into and checked by, errors naming `stages[i].options.FIELD` (None: the kind takes no options).
    `find_unused_parameters`: whether some trainable parameters can get no gradient from the kind's loss,
    so DDP must look for them every step (a bool, or a function of the stage)."""

    factory: Target
    options: Target | None = None
    find_unused_parameters: bool | Callable[[Stage], bool] = False


@dataclass(frozen=True)
class CommandPart:
    """A `vistune NAME` command (one or two words): `target(argv) -> int` parses its own arguments."""

    target: str
    about: str


@dataclass(frozen=True)
class SuitePart:
    """`vistune eval MODEL --suite NAME`: `target(argv) -> int`; `title` heads its report."""

    target: str
    about: str
    title: str


PROJECTORS: dict[str, ProjectorPart] = {}
STAGE_KINDS: dict[str, StageKindPart] = {}
COMMANDS: dict[str, CommandPart] = {}
SUITES: dict[str, SuitePart] = {}
# suite name -> `section(results) -> list[str]`: markdown lines its report shows after the table
REPORT_SECTIONS: dict[str, list[Target]] = {}
_loaded = False


def _add(table: dict[str, Any], what: str, name: str, part: Any) -> None:
    if table.get(name, part) != part:
        raise ValueError(f"{what} {name!r} is already registered")
    table[name] = part


def register_projector(name: str, factory: Target, upgrade: Target | None = None) -> None:
    """Add a projector (`ProjectorPart`)."""
    _add(PROJECTORS, "projector", name, ProjectorPart(factory, upgrade))


def register_stage_kind(
    name: str,
    factory: Target,
    options: Target | None = None,
    find_unused_parameters: bool | Callable[[Stage], bool] = False,
) -> None:
    """Add a stage kind (`StageKindPart`)."""
    _add(STAGE_KINDS, "stage kind", name, StageKindPart(factory, options, find_unused_parameters))


def register_command(name: str, target: str, about: str) -> None:
    """Add `vistune NAME` (`CommandPart`)."""
    _add(COMMANDS, "command", name, CommandPart(target, about))


def register_suite(name: str, target: str, about: str, title: str | None = None) -> None:
    """Add `vistune eval --suite NAME` (`SuitePart`; the title defaults to the name)."""
    _add(SUITES, "suite", name, SuitePart(target, about, title or name))


def register_report_section(suite: str, section: Target) -> None:
    """Add a section to the report of `suite`: `section(results) -> list[str]` (markdown lines)."""
    sections = REPORT_SECTIONS.setdefault(suite, [])
    if section not in sections:
        sections.append(section)


def resolve(target: Target) -> Any:
    """The object a target names: `"module:attribute"` imported, anything else as it is."""
    if not isinstance(target, str):
        return target
    module, _, attribute = target.partition(":")
    if not module or not attribute:
        raise ValueError(f"extension target {target!r} is not of the form 'module:attribute'")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"extension target {target!r} cannot be loaded: {err}") from err


def load_extensions() -> None:
    """Call each installed extension's register function, once per process."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # before registering: a register function may look a table up
    for point in entry_points(group=GROUP):
        try:
            register = point.load()
        except ImportError as err:
            raise ImportError(
                f"vistune extension {point.name!r} ({point.value}) cannot be imported: {err}"
            ) from err
        register()
