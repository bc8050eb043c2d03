"""Warnings about peers that hit a limit, rate-limited so that a flood of them cannot flood the log."""

from __future__ import annotations

import logging
import time
from collections import Counter


class RateLimitedLog:
    """At most one line per kind of event every `interval_s`; the next line of that kind says how many were left out.
    Kinds are a fixed set of names (never an address), so this holds a few entries whoever floods the node."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger, self.interval_s = logger, interval_s
        self._last: dict[str, float] = {}
        self._skipped: Counter[str] = Counter()

    def warning(self, kind: str, message: str, *args: object) -> None:
        """Log `message % args` unless a line of `kind` went out less than `interval_s` ago."""
        now = time.monotonic()
        last = self._last.get(kind, -self.interval_s)
        if now - last < self.interval_s:
            self._skipped[kind] += 1
            return
        self._last[kind] = now
        skipped = self._skipped.pop(kind, 0)
        if skipped:
            message = f"{message} ({skipped} more like it in the last {now - last:.0f} s)"
        self.logger.warning(message, *args)
