"""The shapes world: a built-in synthetic dataset whose scene graphs give exact ground truth.

A wing on top of the core: it uses the core's parts and plugs its own into the core's tables through
`vistune.shapes.plugin.register` (the entry point `shapes` of the group `vistune.extensions`, declared in
pyproject.toml); the core never imports it. What it adds:

- data: scene graphs (`scenes`), the dataset writer (`synth`, `outdir`), renderer (`render`), captions
  and questions (`questions`), POPE probes (`pope`);
- model: the `visual_words` and `object_words` projectors (`words`);
- train: the `scene` stage kind with its options (`scene`);
- commands: the main job (`vistune quickstart`, `quickstart`) and `vistune data synth` (`synth`);
- the evaluation suite over its splits (`vistune eval --suite shapes`, `suite`) and its report's
  generalisation-gap section.
"""
