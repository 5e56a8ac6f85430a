"""Data-layer throughput: shapes-world images/s (1 and 2 workers), records/s read, records/s validated.

python benchmarks/data_throughput.py [--images 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from vistune.data.images import load_image
from vistune.data.readers import load_records
from vistune.data.validate import validate
from vistune.shapes.synth import synthesize


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2000, help="training images to generate")
    args = parser.parse_args()
    n = args.images
    with tempfile.TemporaryDirectory() as tmp:
        times = {}
        for workers in (1, 2):
            _, times[workers] = _timed(synthesize, Path(tmp) / f"w{workers}", {"train": n}, workers=workers)
            print(
                f"synth  {n} images, {workers} worker(s): {times[workers]:.2f} s, "
                f"{n / times[workers]:.0f} images/s"
            )
        print(f"synth  speed-up 2 workers vs 1: {times[1] / times[2]:.2f}x (all task files included)")
        out = Path(tmp) / "w1"
        for task in ("vqa", "pope", "conversations"):
            records, sec = _timed(lambda path: list(load_records(path)), out / "train" / f"{task}.json")
            print(
                f"read   {task}.json: {len(records)} records in {sec:.2f} s, "
                f"{len(records) / sec:.0f} records/s"
            )
        for task, note in (("pairs.jsonl", "one record per image"), ("vqa.json", "3 records share an image")):
            report, sec = _timed(validate, out / "train" / task, out / "images")
            assert report.ok, report.format()
            print(
                f"valid. {task} ({note}): {report.records} records in {sec:.2f} s, "
                f"{report.records / sec:.0f} records/s"
            )
        paths = sorted((out / "images" / "train").glob("*.png"))
        _, sec = _timed(lambda: [load_image(p) for p in paths])
        print(f"decode load_image on {len(paths)} PNGs: {len(paths) / sec:.0f} images/s")


if __name__ == "__main__":
    main()
