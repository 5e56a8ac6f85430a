"""Tests for the shapes world: determinism, non-overlap, held-out combos and styles, the drawing knobs,
rendering, files written, where synth may write (atomically) and the arguments it refuses."""

from __future__ import annotations

import colorsys
import errno
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vistune import cli
from vistune.shapes import questions as Q
from vistune.shapes import relations as R
from vistune.shapes import scenes as S
from vistune.shapes import style as St
from vistune.shapes import synth
from vistune.shapes import wordings as W
from vistune.shapes.quickstart import make_data
from vistune.shapes.suite import suite_splits

SIZES = {"train": 40, "val": 8, "test": 8, "compositional": 16, "shifted": 8}
SEEN_SPLITS = ("train", "val", "test", "compositional")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    synth.synthesize(out, SIZES, seed=7, workers=1, imagefolder=True)
    return out


def test_same_seed_same_bytes_whatever_the_worker_count(dataset, tmp_path):
    synth.synthesize(tmp_path / "again", SIZES, seed=7, workers=2, imagefolder=True)
    first, second = _tree(dataset), _tree(tmp_path / "again")
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []


def test_different_seed_different_output(dataset, tmp_path):
    synth.synthesize(tmp_path / "other", {"train": 4}, seed=8, workers=1)
    for name in ("images/train/train-000000.png", "scenes/train.jsonl", "train/vqa.json"):
        assert (dataset / name).read_bytes()[:4000] != (tmp_path / "other" / name).read_bytes()[:4000]


def test_scene_lines_have_the_documented_keys(dataset):
    scenes = S.load_scenes(dataset / "scenes" / "train.jsonl")
    assert len(scenes) == SIZES["train"]
    for i, s in enumerate(scenes):
        assert list(s) == ["id", "image", "split", "width", "height", "background", "style", "objects"]
        assert s["id"] == f"train-{i:06d}" and s["image"] == f"train/{s['id']}.png"
        assert list(s["style"]) == ["canvas", "background", "supersample", "outline", "star_inner"]
        assert s["width"] == s["height"] == s["style"]["canvas"]
        assert Image.open(dataset / "images" / s["image"]).size == (s["width"], s["height"])
        for o in s["objects"]:
            assert list(o) == ["color", "shape", "size", "x", "y", "radius", "rotation", "aspect", "rgb"]
            assert all(round(o[k], 2) == o[k] for k in ("x", "y", "radius", "rotation", "aspect"))


@pytest.mark.parametrize("split, image_size", [("train", None), ("shifted", None), ("test", 24), ("val", 64)])
def test_objects_never_overlap_and_stay_inside(split, image_size):
    for i in range(300):
        s = S.sample_scene(3, split, i, image_size)
        objs = s["objects"]
        assert 1 <= len(objs) <= S.MAX_OBJECTS
        for a in objs:
            assert a["radius"] <= a["x"] <= s["width"] - a["radius"]
            assert a["radius"] <= a["y"] <= s["height"] - a["radius"]
            low, high = St.RADIUS[a["size"]]
            assert low * s["width"] - 0.01 <= a["radius"] <= high * s["width"] + 0.01
            assert abs(a["rotation"]) <= St.MAX_ROTATION and (a["shape"] != "circle" or a["rotation"] == 0)
            least = St.MIN_CIRCLE_ASPECT if a["shape"] == "circle" else St.MIN_ASPECT
            assert least - 0.01 <= min(a["aspect"], 1 / a["aspect"])
        for j, a in enumerate(objs):
            for b in objs[j + 1 :]:
                gap = np.hypot(a["x"] - b["x"], a["y"] - b["y"]) - a["radius"] - b["radius"]
                assert gap >= S.MARGIN_PX - 0.02  # rounding to 2 decimals


def test_small_and_large_stay_apart_after_the_squeeze():
    (_, small_max), (large_min, _) = St.RADIUS["small"], St.RADIUS["large"]
    assert small_max < large_min * St.MIN_ASPECT


def test_seen_splits_never_draw_the_shifted_styles():
    knobs = {"canvas": set(), "background": set(), "supersample": set(), "outline": set()}
    for split in SEEN_SPLITS:
        for i in range(150):
            style = S.sample_scene(4, split, i)["style"]
            assert style["canvas"] in St.SEEN_CANVASES and style["background"] in St.SEEN_BACKGROUNDS
            for knob, values in knobs.items():
                values.add(style[knob])
            assert St.STAR_INNER[0] <= style["star_inner"] <= St.STAR_INNER[1]
    assert knobs == {"canvas": set(St.SEEN_CANVASES), "background": set(St.SEEN_BACKGROUNDS),
                     "supersample": set(St.SUPERSAMPLES), "outline": set(St.OUTLINES)}  # fmt: skip
    shifted = [S.sample_scene(4, "shifted", i) for i in range(150)]
    assert {s["style"]["canvas"] for s in shifted} == set(St.SHIFTED_CANVASES)
    assert {s["style"]["background"] for s in shifted} == set(St.SHIFTED_BACKGROUNDS)
    assert not set(St.SHIFTED_CANVASES) & set(St.SEEN_CANVASES)
    assert not set(St.SHIFTED_BACKGROUNDS) & set(St.SEEN_BACKGROUNDS)
    # only seen colour+shape pairs, as in test
    assert not {(o["color"], o["shape"]) for s in shifted for o in s["objects"]} & set(S.HELD_OUT)


def _hue(rgb) -> float:
    return 360 * colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0]


def _hue_distance(a: float, b: float) -> float:
    return min(abs(a - b), 360 - abs(a - b))


def test_colour_shades_of_different_names_stay_apart_in_hue():
    rng = np.random.default_rng(0)
    shades = {name: [St.shade(rng, name) for _ in range(400)] for name in Q.COLORS}
    # every corner of each name's range too: the extreme hues, saturations and values
    for name, ((h0, h1), (s0, s1), (v0, v1)) in St.HUES.items():
        for h, sat, v in ((h, sat, v) for h in (h0, h1) for sat in (s0, s1) for v in (v0, v1)):
            shades[name].append([round(255 * c) for c in colorsys.hsv_to_rgb(h % 360 / 360, sat, v)])
    hues = {name: [_hue(c) for c in colors] for name, colors in shades.items()}
    for a in Q.COLORS:
        for b in Q.COLORS:
            if a < b:
                closest = min(_hue_distance(x, y) for x in hues[a] for y in hues[b])
                assert closest >= St.MIN_HUE_GAP - 0.5, (a, b, closest)  # 0.5: rounding to 8-bit RGB
    # red sits on both sides of 0 and never reaches orange; the sampled shades stay in their ranges
    assert max(h for h in hues["red"] if h < 180) < min(hues["orange"]) - St.MIN_HUE_GAP + 0.5
    for name, colors in shades.items():
        (h0, h1), (s0, s1), (v0, v1) = St.HUES[name]
        for c in colors[:400]:
            h, sat, v = colorsys.rgb_to_hsv(*(x / 255 for x in c))
            assert _hue_distance(360 * h, (h0 + h1) / 2 % 360) <= (h1 - h0) / 2 + 1, (name, c)
            assert s0 - 0.02 <= sat <= s1 + 0.02 and v0 - 0.01 <= v <= v1 + 0.01, (name, c)


def test_every_count_from_1_to_6_and_every_combo_occur():
    scenes = [S.sample_scene(0, "train", i) for i in range(600)]
    assert {len(s["objects"]) for s in scenes} == set(range(1, 7))
    seen = {(o["color"], o["shape"]) for s in scenes for o in s["objects"]}
    assert seen == set(S.SEEN)


def test_held_out_combos_only_in_the_compositional_split(dataset):
    held = set(S.HELD_OUT)
    assert len(held) == 5 and {s for _, s in held} == set(Q.SHAPES) and len({c for c, _ in held}) == 5
    for split in ("train", "val", "test"):
        for i in range(300):
            objs = S.sample_scene(11, split, i)["objects"]
            assert not {(o["color"], o["shape"]) for o in objs} & held
    for i in range(300):
        objs = S.sample_scene(11, "compositional", i)["objects"]
        assert {(o["color"], o["shape"]) for o in objs} & held
    for s in S.load_scenes(dataset / "scenes" / "compositional.jsonl"):
        assert {(o["color"], o["shape"]) for o in s["objects"]} & held


def _rendered(split: str, n: int) -> list[tuple[dict, np.ndarray]]:
    scenes = [S.sample_scene(6, split, i) for i in range(n)]
    return [(s, np.asarray(S.render(s, 6)).astype(int)) for s in scenes]


@pytest.mark.parametrize("split", ["train", "shifted"])
def test_rendered_objects_have_their_shade_on_a_pale_background(split):
    for s, pixels in _rendered(split, 60):
        assert pixels.shape == (s["height"], s["width"], 3)
        yy, xx = np.mgrid[0 : s["height"], 0 : s["width"]]
        clear = np.ones(pixels.shape[:2], bool)  # pixels away from every object
        for o in s["objects"]:
            near = np.hypot(xx + 0.5 - o["x"], yy + 0.5 - o["y"]) < o["radius"] + 1.5
            clear &= ~near
            # the pixels around the centre hold the object's own shade (an outline is only at the edge)
            inner = np.hypot(xx + 0.5 - o["x"], yy + 0.5 - o["y"]) < 0.2 * o["radius"]
            if inner.any():
                assert np.abs(np.median(pixels[inner], axis=0) - o["rgb"]).max() <= 20, (s["id"], o)
            assert np.abs(np.asarray(o["rgb"]) - s["background"]).sum() >= 120, (s["id"], o)  # stands out
        background = pixels[clear]
        assert background.mean() > 200 and background.min() > 150, s["id"]  # pale, marks faint


def test_task_files_manifest_and_pairs_agree(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["labels"] == list(Q.LABELS)
    assert [tuple(c) for c in manifest["held_out"]] == list(S.HELD_OUT)
    shifted = manifest["shifted"]
    assert shifted["canvases"] == list(St.SHIFTED_CANVASES) and shifted["backgrounds"] == list(
        St.SHIFTED_BACKGROUNDS
    )
    assert shifted["templates"] == {k: list(v) for k, v in W.SHIFTED_TEMPLATES.items()}
    for split, n in SIZES.items():
        for task in synth.TASKS:
            records = json.loads((dataset / split / f"{task}.json").read_text())
            assert len(records) == manifest["counts"][split][task]
            assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in records)
            assert all(r["image"].startswith(f"{split}/") for r in records)
        types = [r["question_type"] for r in json.loads((dataset / split / "vqa.json").read_text())]
        assert manifest["vqa_counts"][split] == dict(sorted(Counter(types).items()))
        six = sum(t in Q.QUESTION_TYPES for t in types)  # the six types first, then the relation types
        assert set(types[:six]) <= set(Q.QUESTION_TYPES) and set(types[six:]) <= set(R.RELATION_TYPES)
        assert len(json.loads((dataset / split / "multiturn.json").read_text())) == n
        pairs = [json.loads(line) for line in (dataset / split / "pairs.jsonl").read_text().splitlines()]
        scenes = {s["image"]: s for s in S.load_scenes(dataset / "scenes" / f"{split}.jsonl")}
        assert len(pairs) == n and all(p["caption"] == Q.caption(scenes[p["image"]]) for p in pairs)


def test_the_suite_scores_the_splits_the_dataset_holds(dataset, tmp_path):
    assert suite_splits(dataset) == ("test", "compositional", "shifted")
    synth.synthesize(tmp_path / "old", {"test": 1, "compositional": 1}, workers=1)
    assert suite_splits(tmp_path / "old") == ("test", "compositional")  # no shifted images: not scored
    synth.synthesize(tmp_path / "train-only", {"train": 1}, workers=1)
    with pytest.raises(ValueError, match="holds none of the splits"):
        suite_splits(tmp_path / "train-only")


def test_imagefolder_view_uses_the_class_label(dataset):
    for s in S.load_scenes(dataset / "scenes" / "test.jsonl"):
        link = dataset / "imagefolder" / "test" / Q.class_label(s) / f"{s['id']}.png"
        assert link.read_bytes() == (dataset / "images" / s["image"]).read_bytes()


def test_main_synth_cli(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--train", "3", "--val", "1", "--test", "1", "--compositional", "2"]
    assert synth.main_synth([*argv, "--shifted", "1", "--workers", "1", "--image-size", "96"]) == 0
    assert "wrote 8 images" in capsys.readouterr().out
    for image in ("compositional/compositional-000001.png", "shifted/shifted-000000.png"):
        assert Image.open(tmp_path / "images" / image).size == (96, 96)  # --image-size fixes every canvas


def test_unknown_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="valid splits"):
        synth.synthesize(tmp_path, {"training": 3})


def test_load_scenes_names_the_bad_line(tmp_path):
    path = tmp_path / "scenes.jsonl"
    path.write_text('{"objects": [], "image": "a.png", "width": 8, "height": 8}\n\n{"objects": []}\n')
    with pytest.raises(ValueError, match=r"scenes.jsonl line 3: not a scene graph"):
        S.load_scenes(path)


# --- where synth writes, and what it accepts (issue 18) ---------------------------------------------------


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_out_on_a_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("keep me")
    for out in (tmp_path / "file.txt", tmp_path / "file.txt" / "sub"):
        assert synth.main_synth(["--out", str(out), "--train", "2", "--workers", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vistune data synth: error: ") and str(tmp_path / "file.txt") in err
        assert "Traceback" not in err
    assert (tmp_path / "file.txt").read_text() == "keep me" and _names(tmp_path) == ["file.txt"]
    assert cli.main(["data", "synth", "--out", str(tmp_path / "file.txt"), "--train", "1"]) == 2


def test_a_second_run_replaces_the_first_without_stale_images(tmp_path):
    out = tmp_path / "shapes"
    synth.synthesize(out, {"train": 6, "val": 2}, workers=1, imagefolder=True)
    synth.synthesize(out, {"train": 3}, workers=1, imagefolder=True)
    assert len(list((out / "images" / "train").iterdir())) == 3
    assert list((out / "images" / "val").iterdir()) == []
    assert len(list((out / "imagefolder" / "train").rglob("*.png"))) == 3
    assert not (out / "imagefolder" / "val").exists()
    assert json.loads((out / "manifest.json").read_text())["sizes"]["train"] == 3
    assert _names(tmp_path) == ["shapes"]  # no staging or old folder left beside it


def test_a_non_empty_dir_that_is_not_synth_output_is_refused_untouched(tmp_path):
    out = tmp_path / "mine"
    (out / "images" / "train").mkdir(parents=True)
    (out / "images" / "train" / "stale.png").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"mine: the directory is not empty and is not a shapes-world"):
        synth.synthesize(out, {"train": 2}, workers=1)
    synth.synthesize(tmp_path / "prev", {"train": 2}, workers=1)
    (tmp_path / "prev" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"also holds notes.txt"):
        synth.synthesize(tmp_path / "prev", {"train": 2}, workers=1)
    assert _names(out / "images" / "train") == ["stale.png"] and (tmp_path / "prev" / "notes.txt").is_file()
    assert _names(tmp_path) == ["mine", "prev"]
    (out / "images" / "train" / "stale.png").unlink()  # an empty dir tree is still not empty: refused
    with pytest.raises(ValueError, match="not empty"):
        synth.synthesize(out, {"train": 2}, workers=1)
    (tmp_path / "empty").mkdir()
    synth.synthesize(tmp_path / "empty", {"train": 2}, workers=1)
    assert (tmp_path / "empty" / "manifest.json").is_file()


def test_a_failed_run_leaves_nothing_half_written(tmp_path, monkeypatch):
    synth.synthesize(tmp_path / "prev", {"train": 2}, workers=1)
    before = _tree(tmp_path / "prev")

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "_manifest", fail)
    for out in (tmp_path / "new", tmp_path / "prev"):
        with pytest.raises(RuntimeError, match="disk full"):
            synth.synthesize(out, {"train": 3}, workers=1)
    assert not (tmp_path / "new").exists() and _tree(tmp_path / "prev") == before
    assert _names(tmp_path) == ["prev"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train", "-5"], "argument --train: expected a whole number >= 0, got -5"),
        (["--val", "x"], "argument --val: expected a whole number >= 0, got 'x'"),
        (
            ["--train", "0", "--val", "0", "--test", "0", "--compositional", "0", "--shifted", "0"],
            "nothing to write",
        ),
        (["--image-size", "0"], "--image-size must be at least 24"),
        (["--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_bad_counts_are_refused_by_the_cli(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        synth.main_synth(["--out", str(tmp_path / "d"), *flags])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sizes": {"train": -5}}, "number of train images must be a whole number >= 0, got -5"),
        ({"sizes": {"train": 2.5}}, "got 2.5"),
        ({"sizes": {"train": True}}, "got True"),
        ({"sizes": {"train": 0}}, "nothing to write"),
        ({"sizes": {"train": 1}, "image_size": 8}, "image side in pixels must be a whole number >= 24"),
        ({"sizes": {"train": 1}, "workers": 0}, "workers must be a whole number >= 1"),
    ],
)
def test_bad_arguments_are_refused_by_synthesize(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        synth.synthesize(tmp_path / "d", **kwargs)
    assert not (tmp_path / "d").exists()


def test_quickstart_make_data_still_generates_then_reuses(tmp_path, capsys, tiny_llm_dir):
    data, base = tmp_path / "qs" / "data", str(tiny_llm_dir)
    make_data(data, {"train": 2, "val": 0, "test": 1, "compositional": 1}, seed=0, base=base)
    manifest = (data / "manifest.json").read_bytes()
    assert (data / "train" / "text_replay.json").is_file()  # the base LLM's text replay, in the same rename
    make_data(data, {"train": 2, "val": 0, "test": 1, "compositional": 1}, seed=0, base=base)
    assert "data: reusing" in capsys.readouterr().out and (data / "manifest.json").read_bytes() == manifest
    assert _names(tmp_path / "qs") == ["data"]


def test_a_dir_that_cannot_be_replaced_is_a_clear_error_and_keeps_the_previous_output(tmp_path, monkeypatch):
    synth.synthesize(tmp_path / "prev", {"train": 2}, workers=1)
    before = _tree(tmp_path / "prev")

    def busy(src, dst):
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(synth.os, "replace", busy)
    with pytest.raises(ValueError, match=r"prev: cannot move the finished dataset into place \(Device or"):
        synth.synthesize(tmp_path / "prev", {"train": 3}, workers=1)
    assert _tree(tmp_path / "prev") == before and _names(tmp_path) == ["prev"]
