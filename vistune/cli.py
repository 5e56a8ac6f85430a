"""`vistune <command>`: a table from subcommand to a plain function that parses its own arguments.

Functions are imported only when their command runs, so `vistune --help` stays instant. Installed
extensions add commands and `vistune eval --suite NAME` suites to the built-in ones
(`vistune.extensions`).
"""

from __future__ import annotations

import importlib
import os
import sys

from vistune import extensions

# The built-in commands; `commands()` adds the extensions'.
COMMANDS: dict[str, tuple[str, str]] = {
    "data digits": (
        "vistune.data.digits:main_digits",
        "write scikit-learn's handwritten digits as images, conversations and VQA",
    ),
    "data replay": (
        "vistune.infer.replay:main_replay",
        "write the base LLM's answers to plain-text prompts (keeps plain-text skills while tuning)",
    ),
    "data validate": ("vistune.data.validate:main_validate", "check a dataset and report problems"),
    "data inspect": (
        "vistune.commands.inspect:main_inspect",
        "show records token by token with their labels",
    ),
    "train": ("vistune.commands.train:main_train", "train a model through a config's stages"),
    "chat": ("vistune.infer.session:main_chat", "talk with a model about images (or text only)"),
    "serve": ("vistune.infer.server:main_serve", "OpenAI-compatible HTTP API and web chat page"),
    "eval": ("vistune.eval.command:main_eval", "score a model on a benchmark file or suite"),
    "contrastive": (
        "vistune.commands.contrastive:main_train_contrastive",
        "CLIP/SigLIP image-text pretraining",
    ),
    "embed": ("vistune.infer.embed:main_embed", "write normalised image or text embeddings"),
    "classify": ("vistune.infer.embed:main_classify", "zero-shot classification of images"),
    "classifier": (
        "vistune.commands.classifier:main_train_classifier",
        "linear probe or fine-tune on an ImageFolder",
    ),
    "export": ("vistune.interop.export:main_export", "write a model dir in the transformers LLaVA format"),
}
# `vistune eval` options that run another scorer than generation: (option, value) -> target. The
# suites of extensions (`--suite NAME`) join them in `eval_routes()`.
EVAL_ROUTES = {
    ("--task", "retrieval"): "vistune.eval.retrieval:main_eval_retrieval",  # scores embeddings
}


def commands() -> dict[str, tuple[str, str]]:
    """Every command: name -> (target, what it does); the built-in ones and the extensions'."""
    extensions.load_extensions()
    clash = sorted(set(COMMANDS) & set(extensions.COMMANDS))
    if clash:
        raise ValueError(f"command(s) {clash} are built in; an extension cannot take them")
    return COMMANDS | {name: (part.target, part.about) for name, part in extensions.COMMANDS.items()}


def eval_routes() -> dict[tuple[str, str], str]:
    """`vistune eval` routes: the built-in ones and `--suite NAME` of each extension's suite."""
    extensions.load_extensions()
    return EVAL_ROUTES | {("--suite", name): part.target for name, part in extensions.SUITES.items()}


def _usage() -> str:
    table = commands()
    width = max(map(len, table))
    rows = "\n".join(f"  {name:<{width}}  {about}" for name, (_, about) in table.items())
    suites = "".join(f"\n  eval --suite {name}: {part.about}" for name, part in extensions.SUITES.items())
    return (
        f"usage: vistune <command> [args] [--debug]\n\ncommands:\n{rows}\n"
        + (f"\nsuites:{suites}\n" if suites else "")
        + "\n`vistune <command> --help` for details; --debug shows tracebacks."
    )


def _resolve(argv: list[str]) -> tuple[str, list[str]] | None:
    """Longest command name matching the start of argv."""
    table = commands()
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in table:
            return name, argv[words:]
    return None


def _eval_target(args: list[str]) -> str:
    """The function `vistune eval ARGS` runs (its routing option removed from `args`)."""
    routes = eval_routes()
    target = next((t for (o, v), t in routes.items() if _pop_option(args, o, v)), None)
    if target is not None:
        return target
    for i, arg in enumerate(args):
        if arg == "--suite" or arg.startswith("--suite="):
            asked = arg.partition("=")[2] or " ".join(args[i + 1 : i + 2])
            suites = sorted(v for o, v in routes if o == "--suite")
            raise ValueError(f"--suite {asked!r} is not one of the installed suites {suites}")
    return commands()["eval"][0]


def _pop_option(args: list[str], option: str, value: str) -> bool:
    """Remove `OPTION VALUE` (or `OPTION=VALUE`) from args in place; say whether it was there."""
    for i, arg in enumerate(args):
        if arg == f"{option}={value}" or (arg == option and args[i + 1 : i + 2] == [value]):
            del args[i : i + (1 if "=" in arg else 2)]
            return True
    return False


# Bad input: a file, record, field or flag the message names. Exit 2, one line.
USER_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vistune` console script.

    Errors print one line and no traceback (exit 2 for bad input, 1 for anything else); `--debug`
    anywhere on the command line (or VISTUNE_DEBUG=1) lets the traceback through instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("VISTUNE_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    found = _resolve(argv)
    if found is None:
        print(_usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    name, rest = found
    try:
        target = _eval_target(rest) if name == "eval" else commands()[name][0]
        module, function = target.split(":")
        return int(getattr(importlib.import_module(module), function)(rest) or 0)
    except KeyboardInterrupt:
        print(f"vistune {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        if isinstance(err, USER_ERRORS):
            print(f"vistune {name}: error: {err}", file=sys.stderr)
            return 2
        print(f"vistune {name}: failed: {type(err).__name__}: {err} (--debug shows where)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
