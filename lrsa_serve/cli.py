"""``lrsa``: serve | train | pipeline | eval | bench | prepare-model.

Each subcommand lives in the module that owns it, which provides ``add_arguments(parser)`` and
``run(args) -> int`` and keeps heavy imports (torch, vLLM) inside ``run`` so ``--help`` is quick.
Expected failures (bad settings, a missing model, bad data) end in one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from lrsa_serve.errors import UserError, one_line

SUBCOMMANDS = {
    "serve": ("lrsa_serve.serving.cli", "Start the OpenAI-compatible server with LagKV"),
    "train": ("lrsa_serve.training.cli", "Post-train a checkpoint with the LRSA mask"),
    "pipeline": ("lrsa_serve.pipeline.cli", "Train, serve and evaluate in one command"),
    "eval": ("lrsa_serve.eval.cli", "Long-context accuracy under compression"),
    "bench": ("lrsa_serve.bench", "Vanilla vLLM vs LagKV memory and throughput"),
    "prepare-model": ("lrsa_serve.cli", "Convert the default model once; print its folder"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="convert again even if present")


def run(args: argparse.Namespace) -> int:
    from lrsa_serve.models import prepare_default_model

    print(prepare_default_model(force=args.force))
    return 0


def _missing(command: str, module: str | None):
    def run(args: argparse.Namespace) -> int:
        raise UserError(f"`lrsa {command}` needs the Python module {module!r}; install its extra")

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrsa", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            # An optional dependency (an extra) is missing: the other subcommands still work.
            sub.set_defaults(_run=_missing(name, e.name))
            continue
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def expected_errors() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    from lrsa_serve.config import LagKVConfigError
    from lrsa_serve.models import ModelError

    return (UserError, LagKVConfigError, ModelError, ValidationError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        # vLLM's server flags need vLLM's own parser; hand everything over untouched.
        from lrsa_serve.serving.cli import main as serve_main

        return serve_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except expected_errors() as e:
        print(f"lrsa {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lrsa {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
