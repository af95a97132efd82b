"""The command line every benchmark shares: its sizes as options, and ``--quick``, which shrinks them all.

``--quick`` checks that a benchmark runs to its table (tiny sizes, a second or two of load); its figures measure
nothing. ``make test`` runs every benchmark so (tests/test_bench.py), so that one that can no longer run fails a test.
An option given on the command line wins over both its default and its quick value.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

QUICK_FLAG = "--quick"


class BenchOptions:
    def __init__(self, doc: str, quick_means: str) -> None:
        self.parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
        self.parser.add_argument(
            QUICK_FLAG,
            action="store_true",
            help=f"check that the benchmark runs to its table, not a measurement: {quick_means}",
        )
        self._sizes: dict[str, tuple[float, float]] = {}

    def size(self, flag: str, *, full: float, quick: float, meaning: str, convert: Callable[[str], Any] = int) -> None:
        """An option whose default is ``full``, or ``quick`` with --quick."""
        action = self.parser.add_argument(
            flag, type=convert, help=f"{meaning} (default {full:,}; {quick:,} with {QUICK_FLAG})"
        )
        self._sizes[action.dest] = (full, quick)

    def parse(self, argv: list[str] | None = None) -> argparse.Namespace:
        arguments = self.parser.parse_args(argv)
        for name, (full, quick) in self._sizes.items():
            if getattr(arguments, name) is None:
                setattr(arguments, name, quick if arguments.quick else full)
        return arguments
