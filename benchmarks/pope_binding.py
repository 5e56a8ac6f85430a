"""Where POPE errors come from on the shapes world: each probe's kind, against the scene graph.

    python benchmarks/pope_binding.py PREDICTIONS_JSONL DATA_DIR

PREDICTIONS_JSONL is what `vistune eval --task pope` (or the quickstart: `eval/test/pope/`) wrote;
DATA_DIR the `vistune data synth` directory its images come from. A probe asks about a colour and a
shape; an absent one is "apart" when the colour and the shape are both in the image on different
objects (only binding the words to objects answers it), "one" when one of them is, "none" otherwise.
Prints the accuracy of each kind: a model that says yes whenever both words appear fails "apart".
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from vistune.shapes.scenes import load_scenes


def kind(probe: dict, scene: dict) -> str:
    """present / apart / one / none for a probe {"meta": {"object"}, "references"} on its scene."""
    if probe["references"][0] == "yes":
        return "present"
    color, shape = probe["meta"]["object"].split()
    has_color = any(o["color"] == color for o in scene["objects"])
    has_shape = any(o["shape"] == shape for o in scene["objects"])
    return "apart" if has_color and has_shape else "one" if has_color or has_shape else "none"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("predictions")
    parser.add_argument("data_dir")
    args = parser.parse_args()
    scenes = {}
    for path in sorted((Path(args.data_dir) / "scenes").glob("*.jsonl")):
        scenes |= {s["image"]: s for s in load_scenes(path)}
    lines = Path(args.predictions).read_text(encoding="utf-8").splitlines()
    right, seen = Counter(), Counter()
    for probe in map(json.loads, lines):
        k = kind(probe, scenes[probe["images"][0]])
        seen[k] += 1
        right[k] += bool(probe["correct"])
    for k in ("present", "apart", "one", "none"):
        if seen[k]:
            print(f"{k:8s} {right[k] / seen[k]:.3f} of {seen[k]}")


if __name__ == "__main__":
    main()
