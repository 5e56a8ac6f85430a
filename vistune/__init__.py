"""vistune: visual instruction tuning, from a 2-core laptop to many GPUs.

A vision tower, a projector and a Hugging Face causal LLM, trained in stages through one training
loop; then asked about images, scored on benchmarks, served, or exported to transformers LLaVA. The
API below is what the commands `vistune train`, `vistune chat` and `vistune eval` run:

    load_config(path, overrides)   a run config (YAML), with `key.path=value` overrides
    train_model(config)            train through its stages; returns the model dir (OUT/model)
    load_model(model_dir)          a model to ask (a vistune model dir, or any causal LM for text)
    chat(model, prompt, images)    one answer about images (paths or PIL images)
    evaluate(model, task, data)    the metrics of a benchmark file (vqa, caption, pope, classify, text)
    explain(model, prompt, images) where in the images an answer came from: a relevance map per image

(The function is `train_model`, not `train`: `vistune.train` is the package of the training loop.)
Example, with CONFIG a run config such as configs/quickstart.yaml, OUT a fresh run dir, IMAGE an image
and VQA a LLaVA-format VQA file (the tests run this example on a tiny model):

    >>> import vistune
    >>> config = vistune.load_config(CONFIG, [f"out={OUT}"])
    >>> model_dir = vistune.train_model(config)
    >>> model = vistune.load_model(model_dir)
    >>> answer = vistune.chat(model, "What color is the circle?", images=[IMAGE])
    >>> isinstance(answer, str)
    True
    >>> metrics = vistune.evaluate(model, "vqa", VQA, limit=4)
    >>> 0.0 <= metrics["accuracy"] <= 1.0
    True
    >>> found = vistune.explain(model, "What color is the circle?", images=[IMAGE])
    >>> found.maps[0].shape == model.vlm.vision.grid
    True

Deeper parts keep their modules: `vistune.config` (the dataclasses), `vistune.infer.session.Session`
(a multi-turn chat), `vistune.eval.run`, `vistune.infer.explain` (relevance maps),
`vistune.interop.export`, and `vistune.extensions` (how a package adds projectors, stage kinds, commands
and suites).
"""

from vistune.api import chat, evaluate, explain, load_config, load_model, train_model

__version__ = "0.1.0"
__all__ = ["chat", "evaluate", "explain", "load_config", "load_model", "train_model"]
