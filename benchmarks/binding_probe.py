"""Does the quickstart's LLM bind a colour to its shape when it is told the scene as text? A cheap probe.

    python benchmarks/binding_probe.py DATA_DIR OUT [--formats words,sentence] [--steps 60] [--probes 200]

From a shapes world's scene graphs (DATA_DIR/scenes: train to learn from, test to score), builds existence
probes "Is there a <colour> <shape> in the image?" of the kinds `pope_binding.py` sorts POPE probes into:
present (answer yes), apart (the colour and the shape are both in the image, on different objects: no),
one (only one of them is: no) and none (no). Each record holds the scene's ground-truth object list as
text, in one of FORMATS, where the image would be. For each format it asks the base LLM (no training),
then trains the quickstart recipe's instruct stage alone (same LLM, LoRA, learning rate) for `--steps`
steps of 8 probes (half yes; the no half apart, one and none as 2:1:1) and asks again; it prints the
accuracy of each kind on the test probes (as many present as apart, one and none together). A model that
says yes whenever both words appear scores 1 on present and 0 on apart.

    python benchmarks/binding_probe.py DATA_DIR OUT --question-type spatial --formats words,first

The same training and scoring on DATA_DIR's VQA questions of one type instead (`--steps` x 8 training
questions, `--probes` test questions), by reference answer. FORMATS: "words" is what object_words shows
("small red star 3 7 ..."), "first" the same with each object's digits first (`position_first`).

    python benchmarks/binding_probe.py DATA_DIR OUT --frozen --formats words,first --steps 150 --probes 80

No training: the base SmolLM2's hidden states over each scene's object list (`--steps` training and
`--probes` test scenes); per layer, a logistic regression on the states at two objects' shape words
says which object is higher (and the same from the y digits), and one on the state at an object's
shape word says its colour. Whether a question's words find, at the word that names an object, where
and what that object is.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from vistune.commands.train import train
from vistune.config import load_config
from vistune.data.readers import load_records
from vistune.eval.run import evaluate
from vistune.infer.generate import load_generator
from vistune.model.llm import smollm2_dir
from vistune.shapes.questions import COLORS, SHAPES, left_to_right
from vistune.shapes.quickstart import RECIPE
from vistune.shapes.scenes import load_scenes

SLOTS, BINS = 6, 10


def _words(o: dict, scene: dict) -> list[str]:
    x, y = (min(int(o[k] / scene[s] * BINS), BINS - 1) for k, s in (("x", "width"), ("y", "height")))
    return [o["size"], o["color"], o["shape"], str(x), str(y)]


def as_projected(scene: dict) -> str:
    """What object_words shows the LLM, as words: '2 small red star 3 7 large blue circle 5 2 none ...'."""
    objs = [" ".join(_words(o, scene)) for o in left_to_right(scene)]
    return " ".join([str(len(objs)), *objs, *["none none none none none"] * (SLOTS - len(objs))])


def as_first(scene: dict) -> str:
    """As object_words shows it with `position_first`: each object's digits before its words,
    '2 3 7 small red star 5 2 large blue circle none ...', so an object's last word comes after all of it."""
    objs = [" ".join(w[3:] + w[:3]) for w in (_words(o, scene) for o in left_to_right(scene))]
    return " ".join([str(len(objs)), *objs, *["none none none none none"] * (SLOTS - len(objs))])


def as_commas(scene: dict) -> str:
    """The text ceiling's form: 'small red star 3 7, large blue circle 5 2'."""
    return ", ".join(" ".join(_words(o, scene)) for o in left_to_right(scene))


def as_sentence(scene: dict) -> str:
    """English noun phrases: 'a small red star at 3 7; a large blue circle at 5 2.'"""
    parts = [
        f"a {' '.join(w[:3])} at {w[3]} {w[4]}" for w in (_words(o, scene) for o in left_to_right(scene))
    ]
    return "; ".join(parts) + "."


def as_lines(scene: dict) -> str:
    """One object per line, numbered: '1. small red star 3 7\\n2. large blue circle 5 2'."""
    return "\n".join(f"{i}. {' '.join(_words(o, scene))}" for i, o in enumerate(left_to_right(scene), 1))


FORMATS = {
    "words": as_projected,
    "first": as_first,
    "commas": as_commas,
    "sentence": as_sentence,
    "lines": as_lines,
}
KINDS = ("present", "apart", "one", "none")


def probe_kinds(scene: dict) -> dict[str, list[tuple[str, str]]]:
    """Every colour+shape pair of the vocabulary, by kind for this scene."""
    kinds: dict[str, list] = {k: [] for k in KINDS}
    pairs = {(o["color"], o["shape"]) for o in scene["objects"]}
    colors, shapes = {c for c, _ in pairs}, {s for _, s in pairs}
    for c in COLORS:
        for s in SHAPES:
            kind = "present" if (c, s) in pairs else "apart" if c in colors and s in shapes else (
                "one" if c in colors or s in shapes else "none")  # fmt: skip
            kinds[kind].append((c, s))
    return kinds


def probes(scenes: list[dict], n: int, mix: dict[str, float], seed: int) -> list[tuple[dict, str, str]]:
    """n (scene, kind, "colour shape") probes, kinds drawn by `mix`, from scenes that have an apart pair."""
    rng = np.random.default_rng(seed)
    usable = [s for s in scenes if probe_kinds(s)["apart"]]
    names, weights = list(mix), np.array(list(mix.values()))
    out = []
    for i in range(n):
        scene = usable[i % len(usable)]
        kind = names[rng.choice(len(names), p=weights / weights.sum())]
        options = probe_kinds(scene)[kind] or probe_kinds(scene)["apart"]
        c, s = options[int(rng.integers(len(options)))]
        out.append((scene, kind if probe_kinds(scene)[kind] else "apart", f"{c} {s}"))
    return out


def records(items: list[tuple[dict, str, str]], fmt: str) -> list[dict]:
    """Text-only LLaVA records: the object list, then the question; answer yes for present probes."""
    out = []
    for i, (scene, kind, obj) in enumerate(items):
        article = "an" if obj[0] in "aeiou" else "a"
        question = f"{FORMATS[fmt](scene)}\nIs there {article} {obj} in the image?"
        answer = "yes" if kind == "present" else "no"
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        out.append({"id": f"p{i}", "conversations": turns, "answer": answer, "kind": kind})
    return out


def question_records(data: Path, split: str, qtype: str, fmt: str, n: int) -> list[dict]:
    """The first `n` records of `qtype` in DATA/<split>/vqa.json, each image replaced by its scene's object
    list as text in `fmt`; kind "all" plus the reference answer as a second kind (a model that answers
    from priors scores 1 on one answer and 0 on the other)."""
    scenes = {s["image"]: s for s in load_scenes(data / "scenes" / f"{split}.jsonl")}
    out = []
    for rec in json.loads((data / split / "vqa.json").read_text(encoding="utf-8")):
        if rec.get("question_type") != qtype or len(out) >= n:
            continue
        turns = [dict(t) for t in rec["conversations"]]
        turns[0]["value"] = turns[0]["value"].replace("<image>", FORMATS[fmt](scenes[rec["image"]]))
        out.append({"id": rec["id"], "conversations": turns, "answer": rec["answer"], "kind": rec["answer"]})
    return out


def score(model: str, path: Path, task: str = "pope") -> dict[str, float]:
    """Accuracy per probe kind (and over all, "all") of a model (a model dir or an LLM) on a records file."""
    recs = list(load_records(path))
    rows, _ = evaluate(load_generator(model, batch_size=32), recs, task, batch_size=32)
    kinds = [r.meta["kind"] for r in recs]
    result = {"all": float(np.mean([row["correct"] for row in rows]))}
    order = [k for k in KINDS if k in kinds] + sorted(set(kinds) - set(KINDS))
    for k in order:
        result[k] = float(np.mean([row["correct"] for row, kk in zip(rows, kinds, strict=True) if kk == k]))
    return result


def _object_states(model, tok, scene: dict, fmt: str, layers: list[int]) -> list[dict[str, np.ndarray]]:
    """One frozen forward pass over the scene's object list in `fmt` (words or first); per object, left to
    right, the hidden states (one row per layer) at its shape word and at its y digit."""
    pieces: list[tuple[str, str]] = []  # (text, role) pieces; each is one or more tokens
    objs = left_to_right(scene)
    pieces.append((str(len(objs)), "count"))
    for o in objs:
        size, color, shape, x, y = _words(o, scene)
        named = [(size, "size"), (color, "color"), (shape, "shape")]
        digits = [(x, "x"), (y, "y")]
        pieces += digits + named if fmt == "first" else named + digits
    ids, where = [], []
    for text, role in pieces:  # each word as it is tokenised mid-sentence: " red", " 7" is " " + "7"
        ids += tok(" " + text, add_special_tokens=False)["input_ids"]
        where.append((role, len(ids) - 1))  # a piece's last token
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    states = np.stack([hidden[layer][0].float().numpy() for layer in layers], 1)  # (tokens, layers, D)
    out: list[dict[str, np.ndarray]] = []
    for role, pos in where[1:]:
        if role == ("x" if fmt == "first" else "size"):  # an object's first piece
            out.append({})
        out[-1][role] = states[pos]
    return out


def frozen_probe(data: Path, formats: list[str], n_train: int, n_test: int) -> None:
    """Is an object's vertical position in the states of the tokens a question names it by? For each
    format, the base SmolLM2's hidden states (frozen) at each object's shape word; a logistic regression
    per layer on the pair (state of A, state of B) says whether A is above B (centres more than
    SPATIAL_MARGIN of the side apart), trained on pairs of `n_train` training scenes, scored on pairs of
    `n_test` test scenes. Also from the states at the y digits (what the default order gives a question
    to read from). Chance is about 0.5. And whether the state at an object's shape word says its colour
    (a logistic regression per layer over the 6 colours)."""
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vistune.shapes.questions import SPATIAL_MARGIN

    path = smollm2_dir()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    layers = [0, 4, 8, 12, 16, 20, 24, 30]
    splits = {"train": load_scenes(data / "scenes" / "train.jsonl")[:n_train],
              "test": load_scenes(data / "scenes" / "test.jsonl")[:n_test]}  # fmt: skip
    for fmt in formats:
        feats: dict[str, dict[str, list]] = {}
        for split, scenes in splits.items():
            feats[split] = {"shape": [], "y": [], "label": [], "objects": []}
            for scene in scenes:
                states, objs = _object_states(model, tok, scene, fmt, layers), left_to_right(scene)
                feats[split]["objects"] += [
                    {"shape": st["shape"], "color": o["color"]} for st, o in zip(states, objs, strict=True)
                ]
                for i, a in enumerate(objs):
                    for j, b in enumerate(objs):
                        if i != j and abs(a["y"] - b["y"]) > SPATIAL_MARGIN * scene["height"]:
                            for role in ("shape", "y"):
                                feats[split][role].append(
                                    np.concatenate([states[i][role], states[j][role]], -1)
                                )
                            feats[split]["label"].append(int(a["y"] < b["y"]))
        # binding: the object's own colour from the state at its shape word (6 colours: chance ~0.17)
        cells = []
        for li, layer in enumerate(layers):
            xs = {sp: np.stack([o["shape"][li] for o in feats[sp]["objects"]]) for sp in splits}
            ys = {sp: [o["color"] for o in feats[sp]["objects"]] for sp in splits}
            clf = LogisticRegression(max_iter=2000, C=0.1).fit(xs["train"], ys["train"])
            cells.append(f"L{layer} {clf.score(xs['test'], ys['test']):.3f}")
        n = len(feats["test"]["objects"])
        print(f"{fmt:<6} colour at the shape ({n} test objects): {'  '.join(cells)}", flush=True)
        for role in ("shape", "y"):
            cells = []
            for li, layer in enumerate(layers):
                x_tr = np.stack(feats["train"][role])[:, li]
                x_te = np.stack(feats["test"][role])[:, li]
                clf = LogisticRegression(max_iter=2000, C=0.1).fit(x_tr, feats["train"]["label"])
                cells.append(f"L{layer} {clf.score(x_te, feats['test']['label']):.3f}")
            n = len(feats["test"]["label"])
            print(f"{fmt:<6} states at the {role:<5} ({n} test pairs): {'  '.join(cells)}", flush=True)


def train_on(fmt: str, out: Path, steps: int) -> Path:
    """The recipe's instruct stage alone, on OUT/<fmt>/train.json, for `steps` steps of 8 probes."""
    recipe = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    recipe["stages"] = [s for s in recipe["stages"] if s["name"] == "instruct"]
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    overrides = [f"out={out / fmt}", f"data_root={out / fmt}", "stages.0.data=[{path: train.json}]",
                 f"stages.0.max_steps={steps}", "stages.0.batch_size=8", "stages.0.grad_accum=1",
                 "stages.0.max_length=96", "save_every=100000"]  # fmt: skip
    return train(load_config(out / "recipe.yaml", overrides), resume=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data_dir")
    parser.add_argument("out")
    parser.add_argument(
        "--formats", default="words,sentence", help=f"comma-separated, of {', '.join(FORMATS)}"
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--probes", type=int, default=200, help="test probes (half present, half not)")
    parser.add_argument("--base", default="smollm2", help="the LLM asked before training")
    parser.add_argument(
        "--question-type", default=None,
        help="instead of existence probes, DATA's VQA questions of this type (e.g. spatial): --steps x 8 "
        "of the training split's, --probes of the test split's",
    )  # fmt: skip
    parser.add_argument("--skip-untrained", action="store_true", help="do not score the untrained LLM")
    parser.add_argument(
        "--frozen", action="store_true",
        help="no training: probe the frozen LLM's states for above/below (formats words, first; "
        "--steps scenes of the training split, --probes of the test split)",
    )  # fmt: skip
    args = parser.parse_args()
    data, out = Path(args.data_dir), Path(args.out)
    if args.frozen:
        frozen_probe(data, args.formats.split(","), args.steps, args.probes)
        return
    # with --question-type only the lengths of these are used
    train_items = probes(load_scenes(data / "scenes" / "train.jsonl"), args.steps * 8,
                         {"present": 4, "apart": 2, "one": 1, "none": 1}, seed=0)  # fmt: skip
    test_items = probes(load_scenes(data / "scenes" / "test.jsonl"), args.probes,
                        {"present": 2, "apart": 1, "one": 0.5, "none": 0.5}, seed=1)  # fmt: skip
    for fmt in args.formats.split(","):
        (out / fmt).mkdir(parents=True, exist_ok=True)
        for name, items in (("train", train_items), ("test", test_items)):
            recs = (
                question_records(data, name, args.question_type, fmt, len(items))
                if args.question_type
                else records(items, fmt)
            )
            (out / fmt / f"{name}.json").write_text(json.dumps(recs), encoding="utf-8")
        task = "vqa" if args.question_type else "pope"
        scored = (
            []
            if args.skip_untrained
            else [(f"{args.base}, untrained", score(args.base, out / fmt / "test.json", task))]
        )
        start = time.perf_counter()
        model = train_on(fmt, out, args.steps)
        seconds = time.perf_counter() - start
        scored.append(
            (f"{args.steps} steps, {seconds:.0f} s", score(str(model), out / fmt / "test.json", task))
        )
        for label, result in scored:
            cells = "  ".join(f"{k} {v:.3f}" for k, v in result.items())
            print(f"{fmt:<9} {label:<24} {cells}", flush=True)


if __name__ == "__main__":
    main()
