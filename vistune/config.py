"""Typed configuration: small dataclasses validated on construction, loaded from YAML with CLI overrides.

A run config is `Config(model=ModelConfig(vision, projector, llm), stages=[Stage, ...], ...)`.
YAML mirrors the dataclasses field for field; `--set model.projector.name=linear` overrides one field.
"""

from __future__ import annotations

import dataclasses
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from vistune import extensions

# CNN towers use transformers' ResNetModel (kind "resnet"), not timm: timm hard-requires torchvision, and
# PyPI's torchvision cannot import beside the CPU build of torch 2.13 that this project pins.
VISION_KINDS = ("clip", "siglip", "resnet")
# How an image becomes the tower's square input: squash (resize, aspect ratio lost), pad (to a square
# with the mean colour, then resize: LLaVA-1.5), crop (shortest edge to size, centre crop: CLIP).
PREPROCESS = ("squash", "pad", "crop")
TRAINABLE = ("vision", "projector", "llm", "lora")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Keys that moved: the old spelling is rejected with a message naming the new one.
RENAMED = {
    "ProjectorConfig": {
        "words": "options.words",
        "slots": "options.slots",
        "position_bins": "options.position_bins",
    },
}
# Stage fields that moved into the options of the kinds that read them: the old place is rejected with a
# message naming the new one (`stages[1]: pack moved: use stages[1].options.pack`).
MOVED = {
    "Stage": {
        name: f"options.{name}"
        for name in ("cache_features", "gradient_checkpointing", "pack", "pack_length", "text_tower", "loss",
                     "embed_dim", "chunk_size", "augment")
    },
}  # fmt: skip


@dataclass
class VisionConfig:
    """A vision tower: a Hugging Face CLIP/SigLIP vision model or ResNet CNN, pretrained or from scratch.

    `name_or_path` set: load pretrained weights (hub id or local directory, e.g. microsoft/resnet-18).
    Unset: build the architecture from the size fields (for resnet: `resnet_depths` and
    `resnet_widths`, basic blocks as in ResNet-18), randomly initialised. `weights`: a local
    .safetensors state dict saved by vistune, loaded over the built tower.
    """

    kind: str = "clip"
    name_or_path: str | None = None
    resnet_depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])  # ResNet-18
    resnet_widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    weights: str | None = None
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 768
    feature_layer: int = -1  # which hidden layer feeds the projector (-2 is LLaVA's choice)
    use_cls: bool = False  # keep the CLS token (CLIP) in the image features
    preprocess: str = "pad"  # squash | pad | crop (see PREPROCESS)

    def __post_init__(self) -> None:
        if self.kind not in VISION_KINDS:
            raise ValueError(f"vision.kind {self.kind!r} is not one of {VISION_KINDS}")
        _at_least(self, "vision.", 1, "image_size", "patch_size", "hidden_size", "num_layers", "num_heads",
                  "intermediate_size")  # fmt: skip
        if (
            not self.resnet_depths
            or not self.resnet_widths
            or min(self.resnet_depths + self.resnet_widths) < 1
        ):
            raise ValueError(
                "vision.resnet_depths and resnet_widths must be non-empty lists of positive counts"
            )
        if self.preprocess not in PREPROCESS:
            raise ValueError(f"vision.preprocess {self.preprocess!r} is not one of {PREPROCESS}")
        if self.kind != "resnet" and self.image_size % self.patch_size:
            raise ValueError(
                f"vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision.hidden_size {self.hidden_size} is not divisible by num_heads")


@dataclass
class ProjectorConfig:
    """Maps vision features (B, N, Dv) to LLM embeddings (B, N', Dl).

    `name` is a registered projector (`vistune.model.projector.projectors`); `options` holds the
    settings of projectors that extensions register, which check them when they are built.
    """

    name: str = "mlp2x_gelu"
    shuffle_factor: int = 2  # pixel_shuffle: merge f x f neighbouring tokens into one
    num_queries: int = 16  # resampler: learned queries
    # Width of the sin-cos code of each token's grid row and column appended to its features before the
    # projector (`vistune.model.positions`), so the LLM can tell where a thing is; 0: none.
    position_codes: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("shuffle_factor", "num_queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"projector.{name} must be at least 1, got {getattr(self, name)}")
        if self.position_codes < 0 or self.position_codes % 4:
            raise ValueError(
                f"projector.position_codes must be 0 (none) or a multiple of 4, got {self.position_codes}"
            )


@dataclass
class LLMConfig:
    """Any Hugging Face causal LM by hub id or local directory; `smollm2` is the embedded default.

    `from_config` builds the LLM with random weights from a transformers config instead of loading it,
    e.g. `{model_type: llama, hidden_size: 256, num_hidden_layers: 4, ...}`; the tokenizer and chat
    template still come from `name_or_path`, and vocabulary size and special-token ids default to the
    tokenizer's.
    """

    name_or_path: str = "smollm2"
    chat_template: str | None = None  # override: "chatml" (no default system prompt) or a Jinja string
    dtype: str = "auto"  # auto: fp32 to train (the loop autocasts to bf16 on GPUs), bf16 to infer on GPUs
    from_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"llm.dtype {self.dtype!r} is not one of {DTYPES}")
        if self.from_config is not None and not isinstance(self.from_config.get("model_type"), str):
            raise ValueError("llm.from_config needs a model_type (e.g. llama), as in a transformers config")


@dataclass
class ModelConfig:
    """The three parts of a vision-language model.

    `from_pretrained`: a trained model to start from instead: a vistune model dir (`OUT/model` of an
    earlier run) or a transformers LLaVA directory; tower, projector and LLM (weights and architecture)
    then come from it, and only `llm.chat_template` of the parts below applies.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    from_pretrained: str | None = None


@dataclass
class Augment:
    """Train-time augmentation of a stage's images (`vistune.data.augment`); all zero: none.

    Only changes that keep the targets true: small photometric jitter that never turns one named colour
    into another, a flip that the objective answers mirrored, a grey copy whose colour targets it drops
    and a blurred copy whose shape targets it drops.
    """

    flip: float = 0.0  # probability of a horizontal flip
    grayscale: float = 0.0  # probability of a grey-scale copy (colour targets ignored)
    blur: float = 0.0  # probability of a blur that hides shapes (shape targets ignored)
    brightness: float = 0.0  # brightness scaled by a factor in [1 - b, 1 + b]
    contrast: float = 0.0  # contrast scaled by a factor in [1 - c, 1 + c]
    noise: float = 0.0  # standard deviation of pixel noise, in 0..1 intensity units
    # classify stages: each image shrunk by a factor in [1 - shrink, 1] and put at a random place on a
    # canvas of the mean colour (what `pad` fills with): a tower that later sees several things in one
    # image, each smaller than the whole, learns to read a thing at any size and place
    shrink: float = 0.0

    def __post_init__(self) -> None:
        for name in ("flip", "grayscale", "blur"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"augment.{name} is a probability in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.shrink <= 0.75:
            raise ValueError(f"augment.shrink must be in [0, 0.75] (down to a quarter), got {self.shrink}")
        for name in ("brightness", "contrast", "noise"):
            if not 0 <= getattr(self, name) <= 0.5:
                raise ValueError(f"augment.{name} must be in [0, 0.5], got {getattr(self, name)}")

    def active(self) -> bool:
        """Whether any augmentation is on."""
        return any(getattr(self, f.name) > 0 for f in dataclasses.fields(self))


@dataclass
class DataSpec:
    """One dataset of a stage: a file or folder its kind reads (LLaVA JSON/JSONL, pairs JSONL, an ImageFolder,
    or an extension kind's format) and its image root."""

    path: str
    image_root: str | None = None
    limit: int | None = None  # use only the first N records (of those `where` keeps)
    repeat: int = 1  # each record this many times per epoch: weights a small dataset in a mix
    # Keep only records whose field has one of the values, e.g. {question_type: [spatial, count]}:
    # fields are the record's extra keys (Record.meta). Conversation and contrastive data only.
    where: dict[str, list] | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"data {self.path!r}: limit must be at least 1 (or null for every record)")
        if self.repeat < 1:
            raise ValueError(f"data {self.path!r}: repeat must be at least 1, got {self.repeat}")
        if self.where is None:
            return
        if not isinstance(self.where, dict) or not self.where:
            raise ValueError(f"data {self.path!r}: where must map a field to its values, got {self.where!r}")
        # A single value is a one-element list; values compare as written in the file.
        self.where = {str(k): v if isinstance(v, list) else [v] for k, v in self.where.items()}

    def selects(self, meta: dict) -> bool:
        """Whether a record with these extra fields passes `where`."""
        return not self.where or all(meta.get(k) in values for k, values in self.where.items())


@dataclass
class StageOptions:
    """The options of a stage kind: each kind (built-in or an extension's) reads its stage's `options`
    mapping into a dataclass of its own that derives from this one. Fields check themselves in
    `__post_init__`; `check` sees the whole stage, for rules that join an option with a shared field."""

    def check(self, stage: Stage) -> None:
        """Raise ValueError, naming the field, when an option does not fit the rest of the stage."""


@dataclass
class VLMOptions(StageOptions):
    """`vlm` stages: next-token loss on the assistant tokens of conversations."""

    # With a frozen tower: keep each image's features (on the device) instead of recomputing them;
    # null: when the stage's images fit in FEATURE_CACHE_GB.
    cache_features: bool | None = None
    # Recompute the LLM's layer activations in the backward pass instead of keeping them (about a third
    # more compute for a fraction of the activation memory: for large models).
    gradient_checkpointing: bool = False
    # Pack each micro-batch's records into as few rows of `pack_length` tokens (default max_length) as
    # hold them, first-fit by length; position ids restart at 0 for each record and attention never
    # crosses records. Same loss, fewer padded tokens.
    pack: bool = False
    pack_length: int | None = None

    def check(self, stage: Stage) -> None:
        """Every record (at most `max_length` tokens) must fit a packed row."""
        if self.pack_length is None:
            return
        if not self.pack:
            raise ValueError(
                f"stage {stage.name!r}: options.pack_length {self.pack_length} is set but pack is false"
            )
        if self.pack_length < stage.max_length:
            raise ValueError(
                f"stage {stage.name!r}: options.pack_length must be at least max_length ({stage.max_length}) "
                f"so every record fits a row, got {self.pack_length}"
            )

    def row_length(self, max_length: int) -> int:
        """The token budget of one packed row (`pack_length`, else the stage's `max_length`)."""
        return self.pack_length if self.pack_length is not None else max_length


@dataclass
class ContrastiveOptions(StageOptions):
    """`contrastive` stages: CLIP/SigLIP image-text pretraining of the tower."""

    text_tower: str = "minilm"  # "minilm", "llm" (the run's LLM) or a local encoder dir
    loss: str = "clip"  # clip | siglip
    embed_dim: int = 128  # width of the shared image-text space
    chunk_size: int = 32  # pairs embedded at once (activation memory; the gradients do not change)

    def __post_init__(self) -> None:
        if self.loss not in ("clip", "siglip"):
            raise ValueError(f"loss {self.loss!r} is not one of ('clip', 'siglip')")
        _at_least(self, "", 1, "embed_dim", "chunk_size")


@dataclass
class ClassifyOptions(StageOptions):
    """`classify` stages: the tower with a linear head on an ImageFolder."""

    # train-time image augmentation that keeps the class true (default: none)
    augment: Augment = field(default_factory=Augment)

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = Augment(**self.augment)


# The built-in kinds' options; an extension's kind names its own when it registers
# (`vistune.extensions.register_stage_kind`).
BUILT_IN_OPTIONS: dict[str, type[StageOptions]] = {
    "vlm": VLMOptions,
    "contrastive": ContrastiveOptions,
    "classify": ClassifyOptions,
}


def stage_options_class(kind: str) -> type[StageOptions]:
    """The options dataclass of a stage kind (a built-in one, or an installed extension's)."""
    if kind in BUILT_IN_OPTIONS:
        return BUILT_IN_OPTIONS[kind]
    extensions.load_extensions()
    kinds = extensions.STAGE_KINDS
    if kind not in kinds:
        raise ValueError(f"kind {kind!r} is not one of {sorted(BUILT_IN_OPTIONS.keys() | kinds.keys())}")
    target = kinds[kind].options
    cls = StageOptions if target is None else extensions.resolve(target)
    if not (isinstance(cls, type) and issubclass(cls, StageOptions) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"stage kind {kind!r}: its options {target!r} are not a StageOptions dataclass")
    return cls


@dataclass
class Stage:
    """One training stage: what data, which modules learn, and how long.

    kind: a stage kind (`vistune.train.kinds.stage_kinds`): `vlm` (next-token loss on
    assistant tokens), `contrastive` (image-text), `classify` (the tower with a linear head on an
    ImageFolder), or one an installed extension adds.
    train: trainable module sets among vision, projector, llm (full), lora (adapters on the LLM).
    options: what only this kind reads, checked by the kind's options dataclass (`VLMOptions`,
    `ContrastiveOptions`, `ClassifyOptions`, or an extension kind's).
    """

    name: str
    kind: str = "vlm"
    data: list[DataSpec] = field(default_factory=list)
    train: list[str] = field(default_factory=lambda: ["projector"])
    lr: float = 1e-3
    lr_vision: float | None = None  # defaults to lr (a vlm stage that trains the tower: lr / 10)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_layers: int | None = None  # LoRA on the top N decoder layers only (default: all)
    on_bad_record: str = "raise"  # raise | skip
    max_grad_norm: float = 1.0
    group_by_length: bool = True  # batch records of similar length together (less padding)
    # Build the host-side batches in this many DataLoader worker processes (prefetched, pinned on CUDA);
    # 0 builds them in the training process. The data order is the same either way.
    workers: int = 0
    # The kind's own settings: a mapping in YAML, read into the kind's options dataclass
    # (`stage_options_class`), e.g. `options: {pack: true}` for a vlm stage.
    options: Any = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [t for t in self.train if t not in TRAINABLE]
        if bad:
            raise ValueError(f"stage {self.name!r}: train has {bad}; valid names are {TRAINABLE}")
        if "llm" in self.train and "lora" in self.train:
            raise ValueError(f"stage {self.name!r}: choose llm (full) or lora, not both")
        if self.on_bad_record not in ("raise", "skip"):
            raise ValueError(f"stage {self.name!r}: on_bad_record must be raise or skip")
        where = f"stage {self.name!r}: "
        _at_least(self, where, 1, "batch_size", "grad_accum", "max_length", "lora_rank")
        _at_least(self, where, 1, *(n for n in ("max_steps", "lora_layers") if getattr(self, n) is not None))
        _above(self, where, 0, "lr", "epochs", "lora_alpha", "max_grad_norm")
        _above(self, where, 0, *(["lr_vision"] if self.lr_vision is not None else []))
        if self.weight_decay < 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"{where}weight_decay must be >= 0 and warmup_ratio in [0, 1)")
        if self.workers < 0:
            raise ValueError(f"{where}workers must be at least 0, got {self.workers}")
        self.data = [d if isinstance(d, DataSpec) else DataSpec(**d) for d in self.data]
        try:
            cls = stage_options_class(self.kind)
        except ValueError as err:
            raise ValueError(f"{where}{err}") from err
        if isinstance(self.options, dict):
            self.options = build_dataclass(cls, self.options, f"stage {self.name!r}: options")
        if type(self.options) is not cls:
            raise ValueError(
                f"{where}options of a {self.kind} stage are {cls.__name__}, got {type(self.options).__name__}"
            )
        self.options.check(self)


@dataclass
class Config:
    """A whole run: the model, its stages, and where outputs go."""

    model: ModelConfig = field(default_factory=ModelConfig)
    stages: list[Stage] = field(default_factory=list)
    out: str = "runs/default"
    data_root: str = "."  # relative DataSpec paths and image roots resolve against this
    seed: int = 0
    log_every: int = 10
    save_every: int = 200  # optimizer steps between checkpoints
    keep_last: int = 2

    def __post_init__(self) -> None:
        for name in ("log_every", "save_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        names = [stage.name for stage in self.stages]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:  # logs, loss curves and a contrastive stage's OUT/stages/NAME tell stages apart by name
            raise ValueError(f"stages: every stage needs its own name; {repeated} repeated")
        root = Path(self.data_root)
        for stage in self.stages:
            for spec in stage.data:
                spec.path = str(root / spec.path)
                spec.image_root = str(root / spec.image_root) if spec.image_root else None
        self.data_root = "."  # resolved: saving and reloading the config must not apply it twice

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, as saved beside every checkpoint."""
        return dataclasses.asdict(self)


def _at_least(obj: Any, where: str, low: int, *names: str) -> None:
    """Each named field must be >= low; the error names the field."""
    for name in names:
        if getattr(obj, name) < low:
            raise ValueError(f"{where}{name} must be at least {low}, got {getattr(obj, name)}")


def _above(obj: Any, where: str, low: float, *names: str) -> None:
    """Each named field must be > low; the error names the field."""
    for name in names:
        if not getattr(obj, name) > low:
            raise ValueError(f"{where}{name} must be above {low}, got {getattr(obj, name)}")


def build_dataclass(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from nested dicts, checking each field's type and naming the offending key
    on error (`where` prefixes the names, e.g. "projector.options")."""
    if not dataclasses.is_dataclass(cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    for old, new in RENAMED.get(cls.__name__, {}).items():
        if old in data:
            raise ValueError(f"{prefix}{old} was renamed: use {prefix}{new}")
    for old, new in MOVED.get(cls.__name__, {}).items():
        if old in data:
            raise ValueError(f"{where or 'config'}: {old} moved: use {prefix}{new}")
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where or 'config'}: unknown field(s) {sorted(unknown)}; valid: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        sub = f"{where}.{key}" if where else key
        if cls is Stage and key == "options":  # typed by the stage's kind
            try:
                hint = stage_options_class(data.get("kind", "vlm"))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{where or 'config'}: {err}") from err
        if get_origin(hint) is list and dataclasses.is_dataclass(get_args(hint)[0]):
            if not isinstance(value, list):
                raise ValueError(f"{sub}: expected a list, got {type(value).__name__}")
            kwargs[key] = [build_dataclass(get_args(hint)[0], v, f"{sub}[{i}]") for i, v in enumerate(value)]
        elif dataclasses.is_dataclass(hint):
            kwargs[key] = build_dataclass(hint, value, sub)
        else:
            kwargs[key] = _check_value(hint, value, sub)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where or 'config'}: {err}") from err


def _check_value(hint: Any, value: Any, where: str) -> Any:
    """Check a plain field against its type hint, naming the field on error.

    Float fields also take ints and numeric strings: YAML 1.1 reads `1e-3` (no dot) as a string.
    """
    if hint is Any:
        return value
    options = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if get_origin(option) is list and isinstance(value, list):
            return [_check_value(get_args(option)[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
        if dict in (option, get_origin(option)) and isinstance(value, dict):
            return value  # the dataclass checks its own mappings (DataSpec.where)
        if option is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                continue
        if option in (int, str, bool) and isinstance(value, option):
            if option is int and isinstance(value, bool):  # bool is an int subclass; `seed: true` is wrong
                continue
            return value
    raise ValueError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a validated Config from a plain dict (as read from YAML or JSON)."""
    return build_dataclass(Config, data, "")


def _apply_override(data: dict[str, Any], override: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to nested dicts; list items by index: stages.0.lr=1."""
    if "=" not in override:
        raise ValueError(f"override {override!r} is not of the form key.path=value")
    path, raw = override.split("=", 1)
    keys = path.split(".")
    node: Any = data
    try:
        value = yaml.safe_load(raw)
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node[int(keys[-1])] = value
        else:
            node[keys[-1]] = value
    except (IndexError, ValueError, TypeError, AttributeError, yaml.YAMLError) as err:
        raise ValueError(f"override {override!r}: {path} does not name a field ({err})") from err


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML (or JSON) config file and apply `key.path=value` overrides."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read config: {err}") from err
    for override in overrides or []:
        _apply_override(data, override)
    try:
        return config_from_dict(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as JSON (the form saved with checkpoints and runs)."""
    Path(path).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
