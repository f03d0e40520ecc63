"""The ``camserve`` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from camserve import __version__


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each subcommand lives in its own module."""
    parser = argparse.ArgumentParser(prog="camserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"camserve {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``camserve`` script."""
    build_parser().parse_args(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
