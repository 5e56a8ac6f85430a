"""The command table: every command resolves to a function that parses its own --help."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from vistune import cli


@pytest.mark.parametrize("name", sorted(cli.commands()))
def test_every_command_has_help(name, capsys):
    module, function = cli.commands()[name][0].split(":")
    fn = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as done:
        fn(["--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    assert cli.main(["nope"]) == 2
    assert "usage: vistune" in capsys.readouterr().err


def test_eval_task_retrieval_is_routed_to_retrieval(monkeypatch):
    seen = {}
    import vistune.eval.retrieval as retrieval

    monkeypatch.setattr(retrieval, "main_eval_retrieval", lambda argv: seen.setdefault("argv", argv) and 0)
    cli.main(["eval", "MODEL", "--task", "retrieval", "--data", "x.jsonl"])
    assert seen["argv"] == ["MODEL", "--data", "x.jsonl"]


def test_eval_suite_shapes_is_routed_to_the_shapes_suite(monkeypatch):
    seen = {}
    import vistune.shapes.suite as suite

    monkeypatch.setattr(suite, "main_suite", lambda argv: seen.setdefault("argv", argv) and 0)
    cli.main(["eval", "MODEL", "--suite=shapes", "--data", "DIR"])
    assert seen["argv"] == ["MODEL", "--data", "DIR"]


def test_an_unknown_suite_is_a_one_line_error(capsys):
    assert cli.main(["eval", "MODEL", "--suite", "nope", "--data", "DIR"]) == 2
    assert "--suite 'nope' is not one of the installed suites ['shapes']" in capsys.readouterr().err


def test_the_extension_commands_come_from_the_extension_not_the_core():
    assert {"quickstart", "data synth"} <= set(cli.commands()) and not {"quickstart", "data synth"} & set(
        cli.COMMANDS
    )
    assert ("--suite", "shapes") in cli.eval_routes() and ("--suite", "shapes") not in cli.EVAL_ROUTES


def test_help_lists_the_extensions_commands_and_suites_without_importing_torch():
    code = "import sys; from vistune import cli; print(cli._usage()); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "quickstart" in done.stdout and "eval --suite shapes" in done.stdout
    assert done.stdout.strip().endswith("False")


@pytest.mark.parametrize("target", sorted(cli.eval_routes().values()))
def test_eval_routes_have_help(target, capsys):
    module, function = target.split(":")
    with pytest.raises(SystemExit) as done:
        getattr(importlib.import_module(module), function)(["--help"])
    assert done.value.code == 0 and "usage:" in capsys.readouterr().out


def test_user_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_unexpected_failures_are_one_line_unless_debug(monkeypatch, capsys):
    import vistune.commands.train as run

    def broken(argv):
        raise RuntimeError("the disk caught fire")

    monkeypatch.setattr(run, "main_train", broken)
    assert cli.main(["train", "x.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "vistune train: failed: RuntimeError: the disk caught fire (--debug shows where)"
    with pytest.raises(RuntimeError, match="caught fire"):
        cli.main(["train", "x.yaml", "--debug"])


def test_bad_values_exit_2_naming_the_field(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stages: [{name: s, lr: -1}]\n")
    assert cli.main(["train", str(cfg)]) == 2
    assert "lr must be above 0, got -1" in capsys.readouterr().err
