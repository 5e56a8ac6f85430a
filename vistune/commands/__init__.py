"""The commands that run the pipeline's parts together: `vistune train`, `vistune data inspect`,
`vistune contrastive`, `vistune classifier`, and what a run's model starts from (`start`).

The layer above `vistune.train`: it may import every part (starting a run from a transformers LLaVA
dir needs `vistune.interop`, a classifier's report needs `vistune.eval`), while the objectives and the
training loop under `vistune.train` import neither.
"""
