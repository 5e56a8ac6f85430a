"""Which parameters a stage trains: freeze everything, unfreeze the parts `stage.train` names."""

from __future__ import annotations

from torch import nn

from vistune.config import Stage


def set_trainable(module: nn.Module, parts: dict[str, list[nn.Parameter]], stage: Stage) -> list[dict]:
    """Freeze `module`, unfreeze the named parts, and return AdamW parameter groups.

    The vision part learns at `stage.lr_vision` (default `stage.lr`), the rest at `stage.lr`. With
    `stage.weight_decay`, only matrices decay (not biases, norms or temperatures). Each group says
    whether it is the vision part's (`"vision": True`), so logs can show the stage's own rate.
    """
    unknown = [name for name in stage.train if name not in parts]
    if unknown:
        raise ValueError(
            f"stage {stage.name!r} ({stage.kind}): train names {unknown}; this kind trains {sorted(parts)}"
        )
    if not stage.train:
        raise ValueError(f"stage {stage.name!r}: train is empty; nothing would learn")
    module.requires_grad_(False)
    lr_vision = stage.lr_vision if stage.lr_vision is not None else stage.lr
    by_part: dict[bool, list[nn.Parameter]] = {}
    for name, params in parts.items():  # the objective's order, so groups do not depend on how train is spelt
        if name in stage.train:
            by_part.setdefault(name == "vision", []).extend(params)
    groups = []
    for vision, params in by_part.items():
        for p in params:
            p.requires_grad_(True)
        lr = lr_vision if vision else stage.lr
        if stage.weight_decay:
            groups += [
                {"params": [p for p in params if p.dim() >= 2], "lr": lr, "weight_decay": stage.weight_decay},
                {"params": [p for p in params if p.dim() < 2], "lr": lr, "weight_decay": 0.0},
            ]
        else:
            groups.append({"params": params, "lr": lr})
        for group in groups[-2 if stage.weight_decay else -1 :]:
            group["vision"] = vision
    return [g for g in groups if g["params"]]
