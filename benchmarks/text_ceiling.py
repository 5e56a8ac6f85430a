"""What the quickstart's LLM learns when it is *told* the scene instead of shown it: a ceiling.

    python benchmarks/text_ceiling.py DATA_DIR OUT [--set KEY=VALUE ...] [--limit 500]

Copies the instruct stage's training files and the test split's VQA from a shapes-world DATA_DIR
(`vistune data synth` or a quickstart run's data/) into OUT/data with every `<image>` replaced by the
scene graph written out as the `object_words` projector spells it ("small red star 3 7, ..."; see
`read_accuracy.truth`), trains the quickstart recipe's instruct stage alone on them (same LLM, LoRA,
steps and data mix; `--set stages.0.max_steps=250` and the like override it) and prints exact-match
VQA accuracy by question type on the first `--limit` test questions. Perception is perfect here by
construction, so what stays wrong is what the LLM does not learn to do with the object list.
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import islice
from pathlib import Path

import yaml
from read_accuracy import truth

from vistune.commands.train import train
from vistune.config import load_config
from vistune.data.readers import load_records
from vistune.data.records import IMAGE_PLACEHOLDER
from vistune.eval.run import evaluate
from vistune.infer.generate import load_generator
from vistune.shapes.quickstart import RECIPE
from vistune.shapes.scenes import load_scenes


def as_text(records: list[dict], scenes: dict[str, dict], source: Path, bins: int) -> list[dict]:
    """LLaVA records with the image placeholder replaced by the scene's object list, and no image."""
    out = []
    for record in records:
        scene = scenes.get(record.get("image", ""))
        if scene is None:
            raise SystemExit(
                f"{source} record {record.get('id')!r}: no scene graph for image {record.get('image')!r}"
            )
        listing = ", ".join(truth(scene, bins))
        turns = [
            dict(t, value=t["value"].replace(IMAGE_PLACEHOLDER, listing)) for t in record["conversations"]
        ]
        out.append({k: v for k, v in record.items() if k != "image"} | {"conversations": turns})
    return out


def write_text_data(data: Path, out: Path, files: list[str], bins: int) -> None:
    """OUT/<file> for each of `files` (paths relative to DATA_DIR), as text-only records; positions in
    `bins` digits, as the recipe's projector spells them."""
    scenes = {
        s["image"]: s for split in ("train", "test") for s in load_scenes(data / "scenes" / f"{split}.jsonl")
    }
    for name in files:
        source = data / name
        records = json.loads(source.read_text(encoding="utf-8"))
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        tmp = (out / name).with_suffix(".tmp")
        tmp.write_text(json.dumps(as_text(records, scenes, source, bins)), encoding="utf-8")
        tmp.replace(out / name)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data_dir", help="a shapes-world directory with scenes/, train/ and test/")
    parser.add_argument("out", help="run directory (text data, checkpoints, model)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field"
    )
    parser.add_argument("--limit", type=int, default=500, help="test VQA questions to score")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    data, out = Path(args.data_dir), Path(args.out)

    # The recipe with its instruct stage alone (as stage 0: `--set stages.0...` overrides it), kept in OUT.
    recipe = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    recipe["stages"] = [s for s in recipe["stages"] if s["name"] == "instruct"]
    if len(recipe["stages"]) != 1:
        raise SystemExit(f"{RECIPE}: expected one stage named 'instruct'")
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    cfg = load_config(out / "recipe.yaml", [f"data_root={out / 'data'}", f"out={out}", *args.set])
    # Paths come back resolved against data_root (OUT/data); the sources sit at the same place in DATA_DIR.
    files = [str(Path(spec.path).relative_to(out / "data")) for spec in cfg.stages[0].data] + [
        "test/vqa.json"
    ]
    write_text_data(data, out / "data", files, cfg.model.projector.options.get("position_bins", 10))

    start = time.perf_counter()
    model_dir = train(cfg, resume=True)
    train_seconds = time.perf_counter() - start
    records = list(islice(load_records(out / "data" / "test" / "vqa.json"), args.limit))
    _, metrics = evaluate(
        load_generator(str(model_dir), batch_size=args.batch_size), records, "vqa", batch_size=args.batch_size
    )
    print(f"\ntext ceiling: {len(records)} test questions, instruct stage {train_seconds:.1f} s")
    for qtype, m in sorted(metrics.get("by_question_type", {}).items()):
        print(f"  {qtype:<10}{m['accuracy']:.3f}  (n={m['n']})")
    print(f"  {'all':<10}{metrics['exact_match']:.3f}")


if __name__ == "__main__":
    main()
