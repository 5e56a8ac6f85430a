"""POPE existence probes for the shapes world: which object kinds to ask about, per setting.

POPE (Li et al., 2023) measures object hallucination by asking "Is there a ... in the image?" about
present objects (answer yes) and absent ones (no); its three settings draw the absent ones at random,
from the most frequent kinds (popular), or from kinds that co-occur with what is present (adversarial).
The training split's statistics (`pope_stats`) rank the kinds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vistune.shapes.questions import COMBOS, combo_name, indefinite

POPE_SETTINGS = ("random", "popular", "adversarial")


def pope_probes(scene: dict, rng: np.random.Generator, stats: dict, k: int = 3) -> list[dict]:
    """POPE existence probes: k positives and k negatives per setting, each {object, answer, setting}.

    stats: {"frequency": {combo_name: images in train containing it},
            "cooccurrence": {combo_name: {combo_name: train images containing both}}}.
    random: negatives drawn uniformly from absent kinds; popular: the absent kinds most frequent in
    train; adversarial: absent kinds sharing a colour or shape with a present one, ranked by how often
    they co-occur with the present kinds in train (then the remaining absent kinds, same ranking).
    Ties break by the fixed COMBOS order.
    """
    kinds = {(o["color"], o["shape"]) for o in scene["objects"]}
    present = [c for c in COMBOS if c in kinds]
    absent = [c for c in COMBOS if c not in present]
    n = min(k, len(present), len(absent))
    positives = [present[i] for i in rng.choice(len(present), n, replace=False)]
    freq, cooc = stats["frequency"], stats["cooccurrence"]

    def co(c: tuple) -> int:
        return sum(cooc.get(combo_name(c), {}).get(combo_name(p), 0) for p in present)

    negatives = {
        "random": [absent[i] for i in rng.choice(len(absent), n, replace=False)],
        "popular": sorted(absent, key=lambda c: -freq.get(combo_name(c), 0))[:n],
        "adversarial": sorted(
            absent, key=lambda c: (not any(c[0] == p[0] or c[1] == p[1] for p in present), -co(c))
        )[:n],
    }
    probes = []
    for setting in POPE_SETTINGS:
        items = [(c, "yes") for c in positives] + [(c, "no") for c in negatives[setting]]
        for i in rng.permutation(len(items)):
            probes.append({"object": combo_name(items[i][0]), "answer": items[i][1], "setting": setting})
    return probes


def pope_question(obj: str) -> str:
    """The POPE probe text."""
    return f"Is there {indefinite(obj)} in the image?"


def pope_stats(scenes: Sequence[dict]) -> dict:
    """Per-kind image frequency and pairwise co-occurrence counts over (training) scenes."""
    freq: dict[str, int] = {}
    cooc: dict[str, dict[str, int]] = {}
    for scene in scenes:
        kinds = sorted({combo_name((o["color"], o["shape"])) for o in scene["objects"]})
        for a in kinds:
            freq[a] = freq.get(a, 0) + 1
            row = cooc.setdefault(a, {})
            for b in kinds:
                if b != a:
                    row[b] = row.get(b, 0) + 1
    return {"frequency": freq, "cooccurrence": cooc}
