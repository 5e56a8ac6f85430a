"""The Python API that `import vistune` offers: a config in, a trained model out, answers and scores.

Each function imports the parts it needs when it runs, so `import vistune` stays fast (no torch). The
command line does the same through `vistune train`, `vistune chat` and `vistune eval`; these functions
are what those commands call, with the same checks and one-line errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from vistune.config import Config
    from vistune.infer.explain import Explanation
    from vistune.infer.generate import Generator


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML (or JSON) run config and apply `key.path=value` overrides (as `--set` does)."""
    from vistune.config import load_config as load

    return load(path, list(overrides))


def train_model(
    config: Config | str | Path, overrides: Sequence[str] = (), resume: bool = False, overwrite: bool = False
) -> Path:
    """Train through a config's stages (a `Config` or a config file); returns the model dir (`OUT/model`).

    `resume` continues the run in the config's `out`; a fresh run into a dir that holds one stops unless
    `overwrite` (as `vistune train --resume/--overwrite`)."""
    from vistune.commands.train import train
    from vistune.config import Config

    if isinstance(config, Config):
        if overrides:
            raise ValueError("overrides apply to a config file; change the Config's fields instead")
        return train(config, resume=resume, overwrite=overwrite)
    return train(load_config(config, overrides), resume=resume, overwrite=overwrite)


def load_model(name_or_dir: str | Path, device: str | None = None, batch_size: int = 8) -> Generator:
    """A model to ask: a vistune model dir (`OUT/model`), or any causal LM (hub id, local dir or
    `smollm2`) for text only. `device` defaults to CUDA where available."""
    from vistune.infer.generate import load_generator

    return load_generator(str(name_or_dir), batch_size=batch_size, device=device)


def chat(
    model: Generator | str | Path,
    prompt: str,
    images: Sequence[str | Path | Image.Image] = (),
    max_new_tokens: int = 64,
    temperature: float = 0.0,
) -> str:
    """One answer to `prompt` about `images` (paths or PIL images; none for text only). `model` is
    what `load_model` returns, or a model dir / LM name to load. Greedy unless `temperature` > 0;
    `vistune.infer.session.Session` keeps a conversation over several turns."""
    from vistune.data.images import load_image
    from vistune.infer.session import Session

    generator = load_model(model) if isinstance(model, (str, Path)) else model
    pictures = [load_image(im) if isinstance(im, (str, Path)) else im for im in images]
    return Session(generator, prefix_cache_bytes=0).ask(
        prompt, pictures, max_new_tokens=max_new_tokens, temperature=temperature
    )


def evaluate(
    model: Generator | str | Path,
    task: str,
    data: str | Path,
    image_root: str | Path | None = None,
    out: str | Path | None = None,
    fmt: str = "llava",
    limit: int | None = None,
    **options: Any,
) -> dict:
    """Score `model` on a benchmark file: `task` is vqa, caption, pope, classify or text; `fmt` the file's
    format (llava, vqav2, gqa, pope, textvqa). Returns the metrics; with `out`, also writes
    predictions.jsonl, metrics.json and report.md there (as `vistune eval`). `image_root` defaults to
    the data file's folder for llava files; `options` are `vistune.eval.run.evaluate`'s (batch_size,
    labels, meteor, vqa_scoring, group_by, ...)."""
    from vistune.eval.loaders import load_eval_records
    from vistune.eval.run import evaluate as score
    from vistune.eval.run import run_eval

    records = load_eval_records(fmt, data)[:limit]
    if image_root is None and fmt == "llava":
        image_root = data if Path(data).is_dir() else Path(data).parent
    predictor = load_model(model) if isinstance(model, (str, Path)) else model
    if out is not None:
        return run_eval(predictor, records, task, out, image_root=image_root, **options)
    return score(predictor, records, task, image_root=image_root, **options)[1]


def explain(
    model: Generator | str | Path,
    prompt: str | Sequence[str],
    images: Sequence[str | Path | Image.Image],
    answer: str | Sequence[str] | None = None,
    method: str = "gradient",
    out: str | Path | None = None,
    steps: int = 16,
) -> Explanation:
    """Where in the images an answer came from: a relevance map per image over the tower's grid
    (`vistune.infer.explain`). `prompt` is a question, or a conversation's user messages in turn (the
    images go with the first); `answer` the answer to explain (for a conversation: one per prompt), or
    None for the model's own greedy answer (for a conversation: the answers to all but the last prompt).
    `method` is gradient, integrated or occlusion. With `out`, writes METHOD.json and per image
    METHOD-I.png (the overlay) and METHOD-I.npy there (as `vistune explain`)."""
    from vistune.data.images import load_image
    from vistune.infer.explain import Explainer, conversation

    generator = load_model(model) if isinstance(model, (str, Path)) else model
    pictures = [load_image(im) if isinstance(im, (str, Path)) else im for im in images]
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    answers = [] if answer is None else [answer] if isinstance(answer, str) else list(answer)
    turns, explained = conversation(prompts, answers, len(pictures))
    found = Explainer(generator, steps=steps).explain(turns, pictures, explained, method)
    if out is not None:
        found.save(out, method)
    return found
