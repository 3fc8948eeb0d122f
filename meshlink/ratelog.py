"""Rate-limited warnings: one line per kind of event per interval.

A flood of refused connections or failing accepts must not flood the log
too; the bus servers and the NBD server both log through this.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """At most one log line per ``interval`` seconds for each key.

    Lines held back are counted and the count is added to the next line that
    is written for that key.

    Args:
        logger: where lines go (at WARNING).
        interval: seconds between two lines of one key.
        clock: monotonic clock (a parameter so tests can drive it).
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._state: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless a line for ``key`` was written recently.

        Returns:
            Whether the line was written.
        """
        now = self._clock()
        last, held = self._state.get(key, (-math.inf, 0))
        if now - last < self._interval:
            self._state[key] = (last, held + 1)
            return False
        if held:
            msg += " (%d more since the last such message)"
            args = (*args, held)
        self._logger.warning(msg, *args)
        self._state[key] = (now, 0)
        return True
