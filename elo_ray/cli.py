"""The `elo-ray` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elo-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the whole pipeline on the embedded default")
    args = parser.parse_args(argv)
    if args.command == "demo":
        print("elo-ray demo: not built yet (the pipeline lands with the pipeline issue)", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
