"""`vistune data synth`: the shapes world as a complete dataset, byte-identical for a seed and sizes.

Scene graphs come from `vistune.shapes.scenes` (their drawing style from `style`), drawings from
`render`, every text from `questions` and `pope`; this module renders and describes them in worker
processes and writes the result. The shifted split's texts use the held-out wordings
(`wordings.SHIFTED_TEMPLATES`, `wordings.SHIFTED_INSTRUCTIONS`).

Layout written by `synthesize(out, ...)`:
    scenes/<split>.jsonl           one scene graph per line (the source of every text)
    images/<split>/<id>.png        the renderings
    <split>/<task>.json            LLaVA records: captions, detailed, vqa, conversations, pope, classify,
                                   multiturn; vqa.json holds the six question types of every image
                                   first, then the relation and binding types (`relations.py`)
    <split>/pairs.jsonl            {"image", "caption"} lines for contrastive training
    manifest.json                  seed, sizes, vocabulary, held-out combos, labels, counts
    imagefolder/<split>/<label>/   optional ImageFolder view (hard links)

The dataset is written into a hidden temporary folder beside `out` and renamed into place when complete,
so a half-written dataset never sits at `out`. `out` may be missing, empty, or a previous output of this
module (it is replaced as a whole); anything else is refused, so stale files never mix with new ones.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import operator
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from vistune.data.outdir import OutputKind, check_out, move_into_place, staging_dir
from vistune.data.records import IMAGE_PLACEHOLDER
from vistune.shapes import multiturn as M
from vistune.shapes import pope
from vistune.shapes import questions as Q
from vistune.shapes import relations as R
from vistune.shapes import style as St
from vistune.shapes import wordings as W
from vistune.shapes.scenes import (
    HELD_OUT,
    MAX_OBJECTS,
    MIN_IMAGE_SIZE,
    SHIFTED,
    SPLITS,
    STREAMS,
    render,
    rng_for,
    sample_scene,
)

TASKS = ("captions", "detailed", "vqa", "conversations", "pope", "classify", "multiturn")
VQA_PER_IMAGE = 3
DEFAULT_SIZES = {"train": 8000, "val": 500, "test": 500, "compositional": 500, "shifted": 500}
CHUNK = 250  # images per worker job
OUTPUT = OutputKind(
    "shapes-world dataset",
    "vistune data synth",
    frozenset({"manifest.json", "scenes", "images", "imagefolder", *SPLITS}),
    lambda manifest: {"seed", "sizes", "counts", "held_out"} <= set(manifest),
)


def _llava(rid: str, image: str, pairs: Sequence[tuple[str, str]], **extra) -> dict:
    """A LLaVA record; the image placeholder opens the first human turn."""
    conv = []
    for i, (q, a) in enumerate(pairs):
        conv.append({"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{q}" if i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return {"id": rid, "image": image, "conversations": conv, **extra}


def scene_texts(scene: dict, seed: int) -> dict[str, list[dict]]:
    """All LLaVA records of one scene except POPE (which needs training-split statistics)."""
    rng = rng_for(seed, scene["split"], int(scene["id"].rsplit("-", 1)[1]), STREAMS["texts"])
    held_out = scene["split"] == SHIFTED
    templates = W.SHIFTED_TEMPLATES if held_out else W.TEMPLATES
    instructions = W.SHIFTED_INSTRUCTIONS if held_out else W.INSTRUCTIONS
    sid, img = scene["id"], scene["image"]
    out: dict[str, list[dict]] = {
        "captions": [_llava(f"{sid}-caption", img, [(Q.pick(rng, templates["caption"]), Q.caption(scene))])],
        "detailed": [
            _llava(f"{sid}-detailed", img, [(Q.pick(rng, templates["detailed"]), Q.detailed(scene, rng))])
        ],
    }
    out["vqa"] = [
        _llava(
            f"{sid}-vqa{i}",
            img,
            [(Q.vqa_prompt(q["question"], rng, instructions), q["answer"])],
            question_type=q["question_type"],
            answer=q["answer"],
            params=q["params"],
        )
        for i, q in enumerate(Q.questions(scene, rng, VQA_PER_IMAGE, templates))
    ]
    turns = Q.questions(scene, rng, int(rng.integers(2, 6)), templates)
    out["conversations"] = [
        _llava(
            f"{sid}-conv",
            img,
            [(q["question"], q["answer"]) for q in turns],
            question_types=[q["question_type"] for q in turns],
            answers=[q["answer"] for q in turns],
            params=[q["params"] for q in turns],
        )
    ]
    label = Q.class_label(scene)
    out["classify"] = [_llava(f"{sid}-classify", img, [(Q.classify_prompt(), label)], label=label)]
    return out | extra_texts(scene, seed)


def extra_texts(scene: dict, seed: int) -> dict[str, list[dict]]:
    """The records of the relation and binding questions ("relations", appended to vqa.json) and the
    follow-up conversation ("multiturn") of one scene, each from its own RNG stream, so the records of
    `scene_texts`' first stream stay as they were."""
    index, held_out = int(scene["id"].rsplit("-", 1)[1]), scene["split"] == SHIFTED
    templates = W.SHIFTED_TEMPLATES if held_out else W.TEMPLATES
    instructions = {
        False: W.SHIFTED_INSTRUCTIONS if held_out else W.INSTRUCTIONS,
        True: W.SHIFTED_NAME_INSTRUCTIONS if held_out else W.NAME_INSTRUCTIONS,
    }
    sid, img = scene["id"], scene["image"]
    rng = rng_for(seed, scene["split"], index, STREAMS["relations"])
    relations = []
    for i, q in enumerate(R.relation_questions(scene, rng, templates)):
        prompt = Q.vqa_prompt(q["question"], rng, instructions[q["question_type"] in R.NAMED_ANSWERS])
        relations.append(
            _llava(
                f"{sid}-rel{i}",
                img,
                [(prompt, q["answer"])],
                question_type=q["question_type"],
                answer=q["answer"],
                params=q["params"],
            )
        )
    turns = M.conversation(scene, rng_for(seed, scene["split"], index, STREAMS["multiturn"]), templates)
    multiturn = _llava(
        f"{sid}-multiturn",
        img,
        [(question, ans) for _, question, _, ans in turns],
        question_type=turns[-1][0],
        answer=turns[-1][3],
        params=turns[-1][2],
        turn_types=[t[0] for t in turns],
        turn_params=[t[2] for t in turns],
        turn_answers=[t[3] for t in turns],
    )
    return {"relations": relations, "multiturn": [multiturn]}


def pope_records(scene: dict, seed: int, stats: dict) -> list[dict]:
    """The POPE probes of one scene as LLaVA records."""
    rng = rng_for(seed, scene["split"], int(scene["id"].rsplit("-", 1)[1]), STREAMS["pope"])
    records, seen = [], {s: 0 for s in pope.POPE_SETTINGS}
    for p in pope.pope_probes(scene, rng, stats):
        rid = f"{scene['id']}-pope-{p['setting']}-{seen[p['setting']]}"
        seen[p["setting"]] += 1
        records.append(
            _llava(
                rid,
                scene["image"],
                [(pope.pope_question(p["object"]), p["answer"])],
                answer=p["answer"],
                pope_setting=p["setting"],
                object=p["object"],
            )
        )
    return records


def _sample(job: tuple) -> list[dict]:
    """Worker, phase 1: the scene graphs of one chunk of a split."""
    seed, split, start, stop, image_size = job
    return [sample_scene(seed, split, index, image_size) for index in range(start, stop)]


def _render_and_describe(job: tuple) -> list[dict[str, list[dict]]]:
    """Worker, phase 2: render and save a chunk of scenes; return each scene's records per task."""
    out, seed, scenes, stats = job
    texts = []
    for scene in scenes:
        # Level-1 zlib: about 2x faster to write than the default for ~15% larger files.
        render(scene, seed).save(Path(out) / "images" / scene["image"], format="PNG", compress_level=1)
        texts.append(scene_texts(scene, seed) | {"pope": pope_records(scene, seed, stats)})
    return texts


def _generate(out: Path, sizes: dict[str, int], seed: int, image_size: int | None, workers: int) -> tuple:
    """Sample every scene, then render and describe them, over fixed chunks in a fixed order.

    Chunks are the same whatever the worker count and results come back in job order, so the output
    does not depend on `workers`. POPE needs training-split statistics, hence the two phases.
    """
    chunks = [
        (split, a, min(a + CHUNK, sizes[split])) for split in SPLITS for a in range(0, sizes[split], CHUNK)
    ]
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    run = pool.map if pool else lambda fn, jobs: [fn(j) for j in jobs]
    try:
        sampled = run(_sample, [(seed, split, a, b, image_size) for split, a, b in chunks])
        stats = pope.pope_stats(
            [s for (split, _, _), part in zip(chunks, sampled, strict=True) if split == "train" for s in part]
        )
        described = run(_render_and_describe, [(str(out), seed, part, stats) for part in sampled])
    finally:
        if pool:
            pool.close()
            pool.join()
    scenes: dict[str, list] = {s: [] for s in SPLITS}
    texts: dict[str, list] = {s: [] for s in SPLITS}
    for (split, _, _), part, part_texts in zip(chunks, sampled, described, strict=True):
        scenes[split].extend(part)
        texts[split].extend(part_texts)
    return scenes, texts, stats


def _dump(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_split(out: Path, split: str, scenes: list[dict], texts: list[dict]) -> tuple[dict, dict]:
    """Write one split's scene JSONL, task files and pairs; return record counts per task and VQA
    question counts per type."""
    with open(out / "scenes" / f"{split}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(s) + "\n" for s in scenes)
    (out / split).mkdir(exist_ok=True)
    counts = {}
    for task in TASKS:
        records = [r for t in texts for r in t[task]]
        if task == "vqa":  # the six types first, as before the relation types existed
            records += [r for t in texts for r in t["relations"]]
            by_type = dict(sorted(Counter(r["question_type"] for r in records).items()))
        _dump(out / split / f"{task}.json", records)
        counts[task] = len(records)
    with open(out / split / "pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"image": s["image"], "caption": Q.caption(s)}) + "\n" for s in scenes)
    counts["pairs"] = len(scenes)
    return counts, by_type


def _check_arguments(
    sizes: dict[str, int], image_size: int | None = None, workers: int = 1
) -> dict[str, int]:
    """Every split's image count (missing splits: 0), once the arguments of `synthesize` are checked.

    Raises ValueError naming the split or argument: unknown splits, counts that are not whole numbers
    >= 0, no image at all, an image side (when given) under MIN_IMAGE_SIZE, fewer than one worker.
    """
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; valid splits are {SPLITS}")
    sizes = {split: _whole(n, f"the number of {split} images", 0) for split, n in sizes.items()}
    if not any(sizes.values()):
        raise ValueError(f"nothing to write: every split has 0 images ({sizes})")
    if image_size is not None:
        _whole(image_size, "the image side in pixels", MIN_IMAGE_SIZE)
    _whole(workers, "workers", 1)
    return {s: 0 for s in SPLITS} | dict(sizes)


def _whole(value: object, what: str, least: int) -> int:
    """`value` as an int if it is a whole number >= least (bools and floats refused), else ValueError."""
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or number < least:
        raise ValueError(f"{what} must be a whole number >= {least}, got {value!r}")
    return number


def synthesize(
    out: str | Path,
    sizes: dict[str, int] | None = None,
    seed: int = 0,
    image_size: int | None = None,
    workers: int = 2,
    imagefolder: bool = False,
) -> dict:
    """Write the whole shapes-world dataset under `out`; return the manifest.

    Args:
        out: output directory: missing, empty, or a previous output (replaced as a whole); the data is
            written beside it first and renamed into place when complete.
        sizes: images per split, e.g. {"train": 8000, "val": 500, "test": 500, "compositional": 500,
            "shifted": 500} (DEFAULT_SIZES); a split left out gets none.
        seed: the seed every image's Generator derives from.
        image_size: side of every square image in pixels (at least MIN_IMAGE_SIZE); None (default)
            draws each image's side from its split's canvases (`style.SEEN_CANVASES`, and
            `style.SHIFTED_CANVASES` for the shifted split).
        workers: processes rendering images (1 = in this process).
        imagefolder: also write imagefolder/<split>/<label>/<id>.png hard links.
    Raises ValueError for bad arguments or an `out` that may not be written (see `_check_arguments`).
    """
    sizes = _check_arguments(sizes if sizes is not None else DEFAULT_SIZES, image_size, workers)
    out = Path(out).resolve()
    replace = check_out(out, OUTPUT)
    tmp = staging_dir(out)
    try:
        manifest = _write_all(tmp, sizes, seed, image_size, workers, imagefolder)
        move_into_place(tmp, out, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed
    return manifest


def _write_all(
    out: Path, sizes: dict, seed: int, image_size: int | None, workers: int, imagefolder: bool
) -> dict:
    """Generate and write every file of the dataset into `out` (an empty directory)."""
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    (out / "scenes").mkdir(exist_ok=True)
    scenes, texts, stats = _generate(out, sizes, seed, image_size, workers)
    written = {split: _write_split(out, split, scenes[split], texts[split]) for split in SPLITS}
    counts = {split: c for split, (c, _) in written.items()}
    manifest = _manifest(seed, image_size, sizes, stats, counts)
    manifest["vqa_counts"] = {split: by_type for split, (_, by_type) in written.items()}
    if imagefolder:
        write_imagefolder(out, scenes)
    _dump(out / "manifest.json", manifest)  # last: a dir with a manifest is complete
    return manifest


def _manifest(seed: int, image_size: int | None, sizes: dict, stats: dict, counts: dict) -> dict:
    popular = sorted((Q.combo_name(c) for c in Q.COMBOS), key=lambda n: -stats["frequency"].get(n, 0))
    return {
        "seed": seed,
        "image_size": image_size,
        "sizes": sizes,
        "vocab": {"colors": list(Q.COLORS), "shapes": list(Q.SHAPES), "sizes": list(Q.SIZES)},
        "color_rgb": St.COLOR_RGB,
        "color_hsv_ranges": St.HUES,
        "radius_fraction": St.RADIUS,
        "style": {
            "canvases": list(St.SEEN_CANVASES),
            "backgrounds": list(St.SEEN_BACKGROUNDS),
            "supersample": list(St.SUPERSAMPLES),
            "outlines": St.OUTLINES,
            "star_inner": list(St.STAR_INNER),
            "min_aspect": St.MIN_ASPECT,
            "min_circle_aspect": St.MIN_CIRCLE_ASPECT,
            "max_rotation": St.MAX_ROTATION,
        },
        "max_objects": MAX_OBJECTS,
        "held_out": [list(c) for c in HELD_OUT],
        "shifted": {  # what only the shifted split uses
            "canvases": list(St.SHIFTED_CANVASES),
            "backgrounds": list(St.SHIFTED_BACKGROUNDS),
            "templates": W.SHIFTED_TEMPLATES,
            "instructions": list(W.SHIFTED_INSTRUCTIONS),
            "name_instructions": list(W.SHIFTED_NAME_INSTRUCTIONS),
        },
        "labels": list(Q.LABELS),
        "label_rule": "majority shape; ties go to the tied shape of the leftmost object (smallest x, then y)",
        "question_types": list(Q.QUESTION_TYPES) + list(R.RELATION_TYPES),
        "turn_kinds": list(M.TURN_KINDS),
        "near_margin": R.NEAR_MARGIN,
        "position_bins": Q.POSITION_BINS,
        "instructions": list(W.INSTRUCTIONS),
        "name_instructions": list(W.NAME_INSTRUCTIONS),
        "no_instruction_fraction": Q.NO_INSTRUCTION,
        "spatial_margin": Q.SPATIAL_MARGIN,
        "pope_popular_ranking": popular,
        "counts": counts,
    }


def write_imagefolder(out: str | Path, scenes: dict[str, list[dict]]) -> None:
    """ImageFolder view imagefolder/<split>/<label>/<id>.png of the class labels (hard links, else copies)."""
    out = Path(out)
    for split, items in scenes.items():
        for scene in items:
            dest = out / "imagefolder" / split / Q.class_label(scene) / f"{scene['id']}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.unlink(missing_ok=True)
            try:
                os.link(out / "images" / scene["image"], dest)
            except OSError:  # e.g. a filesystem without hard links
                shutil.copyfile(out / "images" / scene["image"], dest)


def _count(text: str) -> int:
    """argparse type: a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def main_synth(argv: list[str] | None = None) -> int:
    """`vistune data synth`: write the shapes-world dataset."""
    p = argparse.ArgumentParser(prog="vistune data synth", description=main_synth.__doc__)
    p.add_argument("--out", required=True, help="output directory (new, empty, or a previous synth output)")
    for split, default in DEFAULT_SIZES.items():
        p.add_argument(f"--{split}", type=_count, default=default, help=f"{split} images (default {default})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--image-size",
        type=int,
        help=f"one image side in pixels for every image (>= {MIN_IMAGE_SIZE}); default: drawn per image",
    )
    p.add_argument("--workers", type=int, default=2, help="rendering processes (>= 1)")
    p.add_argument("--imagefolder", action="store_true", help="also write imagefolder/<split>/<label>/")
    p.add_argument(
        "--replay-base",
        metavar="LLM",
        help="also write train/text_replay.json: this LLM's answers to plain-text prompts (the quickstart "
        "recipes train on it; e.g. smollm2)",
    )
    args = p.parse_args(argv)
    sizes = {s: getattr(args, s) for s in SPLITS}
    if not any(sizes.values()):
        p.error("nothing to write: --train, --val, --test, --compositional and --shifted are all 0")
    if args.image_size is not None and args.image_size < MIN_IMAGE_SIZE:
        p.error(f"--image-size must be at least {MIN_IMAGE_SIZE}, got {args.image_size}")
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    start = time.perf_counter()
    try:
        manifest = synthesize(args.out, sizes, args.seed, args.image_size, args.workers, args.imagefolder)
    except ValueError as e:
        print(f"vistune data synth: error: {e}", file=sys.stderr)
        return 2
    if args.replay_base:
        from vistune.infer.replay import write_replay  # loads an LLM: only when asked

        if sizes["train"]:
            try:
                written = write_replay(Path(args.out) / "train" / "text_replay.json", args.replay_base)
            except (OSError, ValueError) as e:
                print(f"vistune data synth: error: --replay-base {args.replay_base}: {e}", file=sys.stderr)
                return 2
            print(f"text replay: {written} records answered by {args.replay_base}")
    seconds = time.perf_counter() - start
    total = sum(sizes.values())
    print(f"wrote {total} images to {args.out} in {seconds:.1f} s ({total / seconds:.0f} images/s)")
    for split in SPLITS:
        print(f"  {split}: " + ", ".join(f"{t} {n}" for t, n in manifest["counts"][split].items()))
    return 0
