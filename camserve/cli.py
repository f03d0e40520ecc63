"""The ``camserve`` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from camserve import __version__

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each subcommand lives in its own module."""
    parser = argparse.ArgumentParser(prog="camserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"camserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from camserve.torchserve import commands

    commands.register(sub)
    from camserve import commands as local_commands

    local_commands.register(sub)
    from camserve.gateway import commands as gateway_commands

    gateway_commands.register(sub)
    from camserve.export import commands as export_commands

    export_commands.register(sub)
    __import__("camserve.audit.commands", fromlist=["register"]).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``camserve`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
