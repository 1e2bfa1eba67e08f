"""`diffusekit` commands: train, train-vae, distill, finetune, train-controlnet, sample, generate, edit, eval, info, export, slim, presets, noise, explain, serve.

Each module here holds a few commands: their parsers (`register`) and the thin functions that
run them over layer 4. Mistakes a user can make (UserError) are printed as one line and exit
with code 2; warnings as "warning: ..." lines.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from diffusekit.cli import checkpoints, controlnet, explain, finetune, quality, sampling, serving, tools, training
from diffusekit.errors import DiffusekitWarning, UserError

COMMAND_GROUPS = (training, finetune, controlnet, sampling, quality, checkpoints, tools, explain, serving)


class Parser(argparse.ArgumentParser):
    """argparse with diffusekit's one-line errors: "error: ..." on stderr and exit code 2, no usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="diffusekit", description="Train and sample diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """diffusekit's warnings as one 'warning: ...' line between progress-bar updates; others as Python prints them."""
    if not issubclass(category, DiffusekitWarning):
        return DEFAULT_SHOWWARNING(message, category, filename, lineno, file, line)
    from tqdm.auto import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


DEFAULT_SHOWWARNING = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error already printed as one "error:" line
        return stop.code if isinstance(stop.code, int) else 2
    with warnings.catch_warnings():
        warnings.simplefilter("always", DiffusekitWarning)  # every one, as they happen
        warnings.showwarning = print_warning
        return run_command(args)


def run_command(args) -> int:
    try:
        args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine's, not ours: a full disk, a missing permission, a vanished file
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
