"""The Python API of `import vistune`: its docstring example runs (on a tiny model), and importing the
package stays light."""

from __future__ import annotations

import doctest
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

import vistune

ROOT = Path(__file__).resolve().parent.parent


def _example_inputs(tiny_world: Path, tiny_llm_dir: Path, tmp_path: Path) -> dict:
    """CONFIG (one short vlm stage of a tiny model on the tiny world), OUT, IMAGE and VQA (a LLaVA VQA
    file whose image paths are relative to its own folder, as `evaluate` assumes by default)."""
    vision = {"kind": "clip", "image_size": 16, "patch_size": 4, "hidden_size": 16, "num_layers": 1,
              "num_heads": 2, "intermediate_size": 32}  # fmt: skip
    config = {
        "data_root": str(tiny_world),
        "model": {"vision": vision, "projector": {"name": "mlp2x_gelu"},
                  "llm": {"name_or_path": str(tiny_llm_dir), "chat_template": "chatml"}},  # fmt: skip
        "stages": [{"name": "instruct", "train": ["projector"], "max_steps": 2, "batch_size": 2,
                    "max_length": 128,
                    "data": [{"path": "train/conversations.json", "image_root": "images"}]}],
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    data = tmp_path / "vqa"
    shutil.copytree(tiny_world / "images" / "train", data / "train")
    (data / "vqa.json").write_text((tiny_world / "train" / "vqa.json").read_text(), encoding="utf-8")
    image = sorted((data / "train").glob("*.png"))[0]
    return {"CONFIG": str(tmp_path / "config.yaml"), "OUT": str(tmp_path / "run"), "IMAGE": str(image),
            "VQA": str(data / "vqa.json")}  # fmt: skip


class ShownOutput(doctest.OutputChecker):
    """Checks the output an example shows; an example that shows none may print progress (training)."""

    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        return not want or super().check_output(want, got, optionflags)


def test_the_docstring_example_runs(tiny_world, tiny_llm_dir, tmp_path):
    globs = _example_inputs(Path(tiny_world), Path(tiny_llm_dir), tmp_path)
    [example] = doctest.DocTestFinder(recurse=False).find(vistune, "vistune", globs=globs)
    assert len(example.examples) == 10
    runner = doctest.DocTestRunner(checker=ShownOutput(), verbose=False)
    report: list[str] = []
    runner.run(example, out=report.append)
    assert (runner.failures, runner.tries) == (0, 10), "".join(report)
    assert (tmp_path / "run" / "model" / "vistune.json").is_file()


def test_help_shows_the_api():
    text = vistune.__doc__
    for name in vistune.__all__:
        assert f"{name}(" in text and getattr(vistune, name).__doc__
    assert set(vistune.__all__) == {"load_config", "train_model", "load_model", "chat", "evaluate", "explain"}


def test_importing_vistune_imports_no_torch():
    heavy = "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))"
    code = f"import json, sys, vistune; print(json.dumps({heavy}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
