"""The ``genserve`` command line: one console script, one module per command group.

Each module registers its subcommands on the parser (``register``) with the function that
runs them; every command exits 2 with a one-line reason on bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from artifact.plugins import load_plugins
from cli import anomaly, data, evaluate, export, report, serve, train
from service.settings import SettingsError, load_settings

__all__ = ["build_parser", "main"]

GROUPS = (train, evaluate, export, serve, anomaly, data, report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genserve",
        description="Train, evaluate, export and serve likelihood-based generative models "
        "(normalizing flows, diffusion, flow matching).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


def one_line(err: BaseException) -> str:
    """An error as the one line a command prints before exiting 2."""
    if isinstance(err, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    try:
        load_plugins(load_settings().plugins)  # plug-in families and model types
    except (SettingsError, ImportError) as err:
        print(f"genserve: error: {one_line(err)}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for --distributed relaunch
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"genserve {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
