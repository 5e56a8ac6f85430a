"""Extensions: packages that add projectors and stage kinds to vistune's tables from above.

An extension declares an entry point in the group `vistune.extensions` whose target is a function
that registers its parts with `vistune.model.projector.register_projector` and
`vistune.train.objective.register_objective`. The built-in shapes world is one: pyproject.toml
declares `shapes = "vistune.shapes:register"`. Extensions are loaded once, when a table is first looked
up, so a saved model that uses an extension's projector loads anywhere the extension is installed,
and the core never names an extension.
"""

from __future__ import annotations

from importlib.metadata import entry_points

GROUP = "vistune.extensions"
_loaded = False


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
