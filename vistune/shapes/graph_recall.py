"""Scene-graph recall of a free-text description: which objects it names right and which it makes up.

`mentions(text)` reads every object a description names: a shape word, singular or plural, with the
colour and size words right before it ("a small red star", "two blue circles"). A count word before
them says how many objects a plural names ("two", "3"; "no" or "zero" names none; a plural without a
count names two); a singular names one ("no red star" none). Every other word is ignored. A mention
after "the" that agrees with an earlier mention on every word it says refers back to that object ("...
a small red star. The red star is left of ...", "the star") and is not counted again.

`score_description(text, scene)` pairs mentions with the scene's objects, each object at most once:
first the mentions whose size, colour and shape all agree with an object, then those whose colour and
shape agree, then those that name a shape without a colour, by shape. An object is *recalled* when a
mention names its colour and shape; a mention that pairs with no object is *hallucinated*.
`graph_recall` sums over descriptions: recall = recalled / objects, hallucination = hallucinated /
mentions, size_recall = objects named with the right size, colour and shape / objects.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from vistune.shapes.questions import COLORS, SHAPES, SIZES

WORD = re.compile(r"[a-z]+|\d+")
NUMBERS = {"no": 0, "zero": 0, "a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
           "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}  # fmt: skip
SHAPE_WORDS = {s: s for s in SHAPES} | {s + "s": s for s in SHAPES}
PLURAL_WITHOUT_COUNT = 2


def _attributes(words: list[str], i: int) -> tuple[dict, int]:
    """The mention whose shape word is words[i], and the index of the first word before its colour and
    size words (those come in either order)."""
    found = {"shape": SHAPE_WORDS[words[i]]}
    j = i
    while j > 0 and len(found) < 3:
        word = words[j - 1]
        key = "color" if word in COLORS else "size" if word in SIZES else None
        if key is None or key in found:
            break
        found[key] = word
        j -= 1
    return found, j - 1


def _how_many(words: list[str], before: int, plural: bool) -> int:
    """How many objects a mention names, from the word before it (index `before`, -1 for none)."""
    word = words[before] if before >= 0 else ""
    number = int(word) if word.isdigit() else NUMBERS.get(word)
    if not plural:
        return 0 if number == 0 else 1
    return PLURAL_WITHOUT_COUNT if number is None else number


def mentions(text: str) -> list[dict]:
    """Every object the text names, once per object: {"shape"} with "color" and "size" when named."""
    words = WORD.findall(text.lower())
    out: list[dict] = []
    for i, word in enumerate(words):
        if word not in SHAPE_WORDS:
            continue
        found, before = _attributes(words, i)
        named_before = any(all(m.get(k) == v for k, v in found.items()) for m in out)
        if before >= 0 and words[before] == "the" and named_before:
            continue  # "the red star", "the star": an object named before
        out += [dict(found) for _ in range(_how_many(words, before, word != found["shape"]))]
    return out


def _pair(objects: list[dict], free: list[bool], mention: dict, keys: tuple[str, ...]) -> int | None:
    """Index of the first unpaired object that agrees with the mention on `keys`, now paired."""
    for k, obj in enumerate(objects):
        if free[k] and all(obj[key] == mention[key] for key in keys):
            free[k] = False
            return k
    return None


def score_description(text: str, scene: dict) -> dict:
    """{"objects", "mentions", "recalled", "sized", "hallucinated"} of one description of `scene`."""
    objects, named = scene["objects"], mentions(text)
    free = [True] * len(objects)
    left = list(named)
    recalled = sized = 0
    passes = (
        (("size", "color", "shape"), lambda m: "color" in m and "size" in m),
        (("color", "shape"), lambda m: "color" in m),
        (("size", "shape"), lambda m: "color" not in m and "size" in m),
        (("shape",), lambda m: "color" not in m),
    )
    for keys, applies in passes:
        unpaired = []
        for m in left:
            k = _pair(objects, free, m, keys) if applies(m) else None
            if k is None:
                unpaired.append(m)
                continue
            recalled += "color" in m
            sized += "color" in m and m.get("size") == objects[k]["size"]
        left = unpaired
    return {"objects": len(objects), "mentions": len(named), "recalled": recalled, "sized": sized,
            "hallucinated": len(left)}  # fmt: skip


def graph_recall(pairs: Iterable[tuple[str, dict]]) -> dict:
    """Summed over (description, scene) pairs: recall, hallucination, size_recall, the share of
    descriptions that name every object right and nothing else (`exact`), and the totals."""
    totals = {"objects": 0, "mentions": 0, "recalled": 0, "sized": 0, "hallucinated": 0}
    exact = n = 0
    for text, scene in pairs:
        one = score_description(text, scene)
        for key in totals:
            totals[key] += one[key]
        exact += one["recalled"] == one["objects"] and one["hallucinated"] == 0
        n += 1
    return {
        "recall": totals["recalled"] / totals["objects"] if totals["objects"] else 0.0,
        "hallucination": totals["hallucinated"] / totals["mentions"] if totals["mentions"] else 0.0,
        "size_recall": totals["sized"] / totals["objects"] if totals["objects"] else 0.0,
        "exact": exact / n if n else 0.0,
        "descriptions": n,
        **totals,
    }
