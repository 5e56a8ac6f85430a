"""`vistune export --out`: never the model dir or a dir around it; `--overwrite` replaces only a previous
export, and an export that fails leaves what was there."""

from __future__ import annotations

import pytest

from vistune import cli
from vistune.interop.export import export_llava, not_an_export
from vistune.model.vlm import save_vlm


@pytest.fixture(scope="module")
def run_dir(tiny_vlm, tmp_path_factory):
    """A run dir as training leaves it: notes and a config beside `model/`."""
    root = tmp_path_factory.mktemp("run")
    save_vlm(tiny_vlm("clip", "mlp2x_gelu", seed=2), root / "model")
    (root / "config.json").write_text("{}")
    (root / "notes.txt").write_text("mine")
    return root


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["model", "run", "inside"])
def test_out_at_or_around_the_model_is_refused_even_with_overwrite(run_dir, where, capsys):
    out = {"model": run_dir / "model", "run": run_dir, "inside": run_dir / "model" / "hf"}[where]
    before = _files(run_dir)
    argv = ["export", str(run_dir / "model"), "--out", str(out), "--overwrite", "--no-check"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model dir" in err and str(out) in err, err
    assert _files(run_dir) == before and (run_dir / "model" / "vistune.json").is_file()


def test_overwrite_replaces_a_previous_export_and_nothing_else(run_dir, tmp_path):
    out = tmp_path / "hf"
    export_llava(run_dir / "model", out, check=False)
    assert not_an_export(out) is None
    (out / "stale.safetensors").write_bytes(b"old shard")
    export_llava(run_dir / "model", out, check=False, overwrite=True)
    assert not (out / "stale.safetensors").exists() and not_an_export(out) is None
    assert not list(tmp_path.glob(".hf*"))  # neither the temporary nor the old copy is left
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"model_type": "llava"}')
    (mine / "model.safetensors").write_bytes(b"x")
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text('{"model_type": "llama"}')
    (llm / "model.safetensors").write_bytes(b"x")
    for folder, why in [(mine, "model card"), (llm, "LLaVA"), (tmp_path, "not a file")]:
        before = _files(folder)
        with pytest.raises(ValueError, match=f"replaces only a previous export.*{why}"):
            export_llava(run_dir / "model", folder, check=False, overwrite=True)
        assert _files(folder) == before
