"""How the shapes world plugs into the core: one register function (the entry point `shapes` of the group
`vistune.extensions`, declared in pyproject.toml) that adds its parts to the core's tables.

Every part is named by its "module:attribute", imported only when used, so this module imports nothing
heavy: `vistune --help` lists the commands below without loading torch.
"""

from __future__ import annotations

from vistune.extensions import (
    register_command,
    register_projector,
    register_report_section,
    register_stage_kind,
    register_suite,
)


def register() -> None:
    """Add the `visual_words` and `object_words` projectors, the `scene` stage kind, the `quickstart` and
    `data synth` commands, and `vistune eval --suite shapes` with its report section."""
    for name, cls in (("visual_words", "VisualWords"), ("object_words", "ObjectWords")):
        register_projector(name, f"vistune.shapes.words:{cls}", upgrade="vistune.shapes.words:upgrade_saved")
    # The tower's final layer norm (CLIP, SigLIP) never reaches the cell targets: DDP must be told.
    register_stage_kind(
        "scene",
        "vistune.shapes.scene:SceneObjective",
        options="vistune.shapes.scene:SceneOptions",
        find_unused_parameters=True,
    )
    register_command(
        "quickstart",
        "vistune.shapes.quickstart:main_quickstart",
        "generate data, train, evaluate: the whole recipe",
    )
    register_command("data synth", "vistune.shapes.synth:main_synth", "write the shapes-world dataset")
    register_suite(
        "shapes",
        "vistune.shapes.suite:main_suite",
        "every task on the shapes world's test, compositional and shifted splits",
        title="shapes world",
    )
    register_report_section("shapes", "vistune.shapes.suite:generalisation_gap")
