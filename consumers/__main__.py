"""`python -m consumers [commands|events|bridge|all]` (default: all) in one process."""

from __future__ import annotations

import argparse
import asyncio
import sys

from consumers.runner import CHOICES, main
from core import logs


def cli() -> int:
    parser = argparse.ArgumentParser(prog="python -m consumers", description=__doc__)
    parser.add_argument("part", nargs="?", default="all", choices=CHOICES)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    logs.setup(args.log_level.upper())
    return asyncio.run(main(args.part))


if __name__ == "__main__":
    sys.exit(cli())
