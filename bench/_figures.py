"""Turning samples into the figures the benchmarks print.

Latencies are kept as lists of seconds and reduced here, so that every script
computes a p50 or p99 the same way.  The load average is printed because the
machines the benchmarks run on are shared: it says how disturbed a run was.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def percentile(samples: Sequence[float], q: float) -> float:
    """The sample at quantile ``q`` (0..1) of ``samples`` (nearest rank, no interpolation)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def print_load_average(when: str) -> None:
    """Print the 1, 5 and 15 minute load averages, labelled ``when`` (start, end)."""
    print("load average at {}: {:.2f} {:.2f} {:.2f}".format(when, *os.getloadavg()))
