"""`python -m dhub`: the same as the `dhub` console script."""

from dhub.cli import entry

entry()
