"""Config: YAML with overrides, errors that name the dotted field path, validation, data_root, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vistune.config import (
    ClassifyOptions,
    Config,
    ContrastiveOptions,
    DataSpec,
    Stage,
    VisionConfig,
    VLMOptions,
    config_from_dict,
    load_config,
    save_config,
)

ROOT = Path(__file__).resolve().parent.parent

RAW = {
    "out": "runs/x",
    "data_root": "data",
    "model": {"vision": {"kind": "clip", "image_size": 32, "patch_size": 8}, "projector": {"name": "linear"}},
    "stages": [
        {"name": "align", "data": [{"path": "a.json", "image_root": "img"}], "lr": 0.002},
        {"name": "tune", "train": ["projector", "lora"], "data": [{"path": "/abs/b.jsonl"}]},
    ],
}


def _write(tmp_path: Path, data: dict, text: str | None = None) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data), encoding="utf-8")
    return path


def test_load_with_nested_and_list_overrides(tmp_path):
    path = _write(tmp_path, RAW)
    cfg = load_config(
        path,
        ["model.projector.name=pixel_shuffle", "stages.0.lr=0.1", "stages.1.train=[projector]",
         "model.llm.chat_template=chatml", "seed=7", "stages.1.max_steps=null"],
    )  # fmt: skip
    assert cfg.model.projector.name == "pixel_shuffle"
    assert cfg.stages[0].lr == 0.1 and cfg.stages[1].lr == 1e-3  # only stage 0 changed
    assert cfg.stages[1].train == ["projector"]
    assert cfg.model.llm.chat_template == "chatml" and cfg.seed == 7 and cfg.stages[1].max_steps is None
    assert cfg.model.vision.image_size == 32 and cfg.model.vision.kind == "clip"
    assert isinstance(cfg.stages[0], Stage) and isinstance(cfg.stages[0].data[0], DataSpec)


def test_overrides_create_missing_sections(tmp_path):
    cfg = load_config(_write(tmp_path, {}, text=""), ["model.vision.kind=siglip", "out=o"])
    assert cfg.model.vision.kind == "siglip" and cfg.out == "o" and cfg.stages == []


def test_yaml_exponent_floats_are_numbers(tmp_path):
    """YAML 1.1 reads `1e-3` (no dot) as a string; a float field must still get 0.001."""
    text = "stages:\n  - name: s\n    lr: 1e-3\n    lr_vision: 2e-5\n"
    cfg = load_config(_write(tmp_path, {}, text=text), ["stages.0.weight_decay=1e-2"])
    assert cfg.stages[0].lr == pytest.approx(1e-3) and isinstance(cfg.stages[0].lr, float)
    assert cfg.stages[0].lr_vision == pytest.approx(2e-5)
    assert cfg.stages[0].weight_decay == pytest.approx(0.01)


@pytest.mark.parametrize(
    "override, path",
    [
        ("model.vision.bogus=1", "model.vision"),
        ("stages.1.bogus=1", "stages[1]"),
        ("stages.0.data.0.bogus=1", "stages[0].data[0]"),
        ("bogus=1", "unknown field(s) ['bogus']"),
    ],
)
def test_unknown_field_names_the_dotted_path(tmp_path, override, path):
    with pytest.raises(ValueError, match="unknown field") as err:
        load_config(_write(tmp_path, RAW), [override])
    message = str(err.value)
    assert path in message and "bogus" in message and "cfg.yaml" in message


@pytest.mark.parametrize(
    "override, words",
    [
        ("model.vision.kind=vit", ["model.vision", "'vit'"]),
        ("model.vision.patch_size=7", ["patch_size 7"]),
        ("stages.0.train=[projector, everything]", ["stages[0]", "everything"]),
        ("stages.1.train=[llm, lora]", ["llm (full) or lora"]),
        ("stages.0.on_bad_record=ignore", ["on_bad_record"]),
        ("stages.0.batch_size=0", ["batch_size"]),
        ("stages.0.batch_size=8.5", ["stages[0].batch_size", "8.5"]),
        ("stages.0.lr=fast", ["stages[0].lr", "fast"]),
        ("seed=true", ["seed"]),
        ("seed.x=1", ["seed"]),
        ("keep_last=0", ["keep_last"]),
        ("model.vision.resnet_depths=[2, two]", ["model.vision.resnet_depths[1]"]),
        ("stages=3", ["stages"]),
        ("stages.5.lr=1", ["stages.5.lr"]),
        ("stages.first.lr=1", ["stages.first.lr"]),
        ("nodots", ["key.path=value"]),
        ("stages.1.data.0.where=[spatial]", ["stages[1].data[0].where", "spatial"]),
        ("stages.1.data.0.where={}", ["stages[1].data[0]", "where must map a field"]),
    ],
)
def test_invalid_values_raise_naming_the_field(tmp_path, override, words):
    with pytest.raises(ValueError) as err:
        load_config(_write(tmp_path, RAW), [override])
    assert all(w in str(err.value) for w in words), str(err.value)


def test_where_filter_takes_one_value_or_a_list(tmp_path):
    cfg = load_config(_write(tmp_path, RAW), ["stages.1.data.0.where={question_type: count, split: [a, b]}"])
    assert cfg.stages[1].data[0].where == {"question_type": ["count"], "split": ["a", "b"]}
    spec = cfg.stages[1].data[0]
    assert spec.selects({"question_type": "count", "split": "b", "other": 1})
    assert not spec.selects({"question_type": "count", "split": "c"})
    assert not spec.selects({"split": "a"})  # a record without the field does not match


@pytest.mark.parametrize("old", ["words", "slots", "position_bins"])
def test_renamed_keys_name_the_new_one(tmp_path, old):
    with pytest.raises(
        ValueError, match=rf"model\.projector\.{old} was renamed: use model\.projector\.options\.{old}"
    ):
        load_config(_write(tmp_path, RAW), [f"model.projector.{old}=3"])


def test_llm_from_config_needs_a_model_type(tmp_path):
    cfg = load_config(_write(tmp_path, RAW), ["model.llm.from_config={model_type: llama, hidden_size: 64}"])
    assert cfg.model.llm.from_config == {"model_type": "llama", "hidden_size": 64}
    with pytest.raises(ValueError, match="from_config needs a model_type"):
        load_config(_write(tmp_path, RAW), ["model.llm.from_config={hidden_size: 64}"])


def test_preprocess_is_one_of_three(tmp_path):
    assert load_config(_write(tmp_path, RAW)).model.vision.preprocess == "pad"
    with pytest.raises(ValueError, match=r"preprocess 'stretch' is not one of \('squash', 'pad', 'crop'\)"):
        load_config(_write(tmp_path, RAW), ["model.vision.preprocess=stretch"])


def test_unreadable_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="cannot read config"):
        load_config(_write(tmp_path, {}, text="model: [unclosed"))


def test_direct_construction_validates():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        VisionConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        VisionConfig(hidden_size=30, num_heads=4)
    VisionConfig(kind="resnet", image_size=30, patch_size=8)  # CNNs take any size


def test_data_root_resolves_relative_paths_once(tmp_path):
    cfg = load_config(_write(tmp_path, RAW), [f"data_root={tmp_path / 'd'}"])
    a, b = cfg.stages[0].data[0], cfg.stages[1].data[0]
    assert a.path == str(tmp_path / "d" / "a.json") and a.image_root == str(tmp_path / "d" / "img")
    assert b.path == "/abs/b.jsonl" and b.image_root is None  # absolute paths stay put
    assert cfg.data_root == "."
    again = config_from_dict(cfg.to_dict())  # re-reading the resolved config must not prefix twice
    assert again.stages[0].data[0].path == a.path


def test_save_load_round_trip(tmp_path):
    cfg = load_config(_write(tmp_path, RAW), ["stages.1.lora_rank=4", "model.vision.use_cls=true"])
    save_config(cfg, tmp_path / "config.json")
    back = load_config(tmp_path / "config.json")
    assert back == cfg
    assert back.stages[0].data[0].path == "data/a.json"


@pytest.mark.parametrize(
    "recipe, stages, projector",
    [
        ("quickstart.yaml", ["vision", "instruct"], "object_words"),
        ("quickstart_gpu.yaml", ["vision", "instruct"], "object_words"),
        ("quickstart_pixel_shuffle.yaml", ["vision", "align", "instruct"], "pixel_shuffle"),
        ("quickstart_contrastive.yaml", ["contrastive", "vision", "instruct"], "visual_words"),
    ],
)
def test_shipped_recipes_load(recipe, stages, projector):
    cfg = load_config(ROOT / "configs" / recipe)
    assert [s.name for s in cfg.stages] == stages
    assert isinstance(cfg, Config) and cfg.model.projector.name == projector


def test_the_gpu_profile_trains_the_cpu_recipes_model_on_its_data():
    cpu, gpu = (load_config(ROOT / "configs" / name) for name in ("quickstart.yaml", "quickstart_gpu.yaml"))
    assert gpu.model == cpu.model
    for a, b in zip(cpu.stages, gpu.stages, strict=True):
        assert (a.kind, a.train, a.data, a.options, a.lr) == (b.kind, b.train, b.data, b.options, b.lr)
    assert gpu.stages[1].max_steps > cpu.stages[1].max_steps and gpu.stages[0].workers > 0


def test_every_shipped_config_loads_and_round_trips(tmp_path):
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(configs) >= 8
    for path in configs:
        cfg = load_config(path)
        save_config(cfg, tmp_path / "config.json")
        assert load_config(tmp_path / "config.json") == cfg, path.name


@pytest.mark.parametrize(
    "old, value",
    [("pack", "true"), ("pack_length", "256"), ("cache_features", "false"),
     ("gradient_checkpointing", "true"), ("text_tower", "minilm"), ("loss", "siglip"), ("embed_dim", "64"),
     ("chunk_size", "8"), ("augment", "{flip: 0.5}")],
)  # fmt: skip
def test_a_stage_key_that_moved_into_options_names_its_new_place(tmp_path, old, value):
    with pytest.raises(ValueError) as err:
        load_config(_write(tmp_path, RAW), [f"stages.1.{old}={value}"])
    assert str(err.value) == f"{tmp_path / 'cfg.yaml'}: stages[1]: {old} moved: use stages[1].options.{old}"


@pytest.mark.parametrize(
    "override, message",
    [
        ("stages.1.options={pack: maybe}", "stages[1].options.pack: expected bool, got 'maybe'"),
        ("stages.1.options={text_tower: minilm}", "stages[1].options: unknown field(s) ['text_tower']"),
        ("stages.1.options={pack_length: 64}", "options.pack_length 64 is set but pack is false"),
        ("stages.1.options=[pack]", "stages[1].options: expected a mapping, got list"),
        ("stages.1.kind=bogus", "'tune': kind 'bogus' is not one of ['classify', 'clm', 'contrastive',"),
    ],
)  # fmt: skip
def test_a_stages_options_are_checked_by_its_kind(tmp_path, override, message):
    with pytest.raises(ValueError) as err:
        load_config(_write(tmp_path, RAW), [override])
    assert message in str(err.value)


def test_each_kind_reads_its_options_into_its_dataclass(tmp_path):
    cfg = load_config(
        _write(tmp_path, RAW),
        ["stages.0.options={pack: true}", "stages.1.kind=contrastive", "stages.1.options={loss: siglip}"],
    )
    vlm, contrastive = (stage.options for stage in cfg.stages)
    assert isinstance(vlm, VLMOptions) and vlm.pack and vlm.row_length(cfg.stages[0].max_length) == 512
    assert isinstance(contrastive, ContrastiveOptions) and contrastive.loss == "siglip"
    saved = cfg.to_dict()["stages"][1]["options"]
    assert saved == {"text_tower": "minilm", "loss": "siglip", "embed_dim": 128, "chunk_size": 32}
    assert isinstance(Stage(name="s", kind="classify").options, ClassifyOptions)
    with pytest.raises(ValueError, match="options of a vlm stage are VLMOptions, got ClassifyOptions"):
        Stage(name="s", options=ClassifyOptions())
