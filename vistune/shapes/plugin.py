"""How the shapes world plugs into the core: its projectors and stage kind, added to the core's tables."""

from __future__ import annotations

from vistune.model.projector import register_projector
from vistune.shapes.scene import SceneObjective
from vistune.shapes.words import ObjectWords, VisualWords
from vistune.train.objective import register_objective


def register() -> None:
    """Add `visual_words`, `object_words` (projectors) and `scene` (a stage kind)."""
    register_projector("visual_words", VisualWords)
    register_projector("object_words", ObjectWords)
    register_objective("scene", SceneObjective)
