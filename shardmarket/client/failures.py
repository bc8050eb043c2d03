"""Nodes that failed recently: routed around for a while, then tried again (a node may have restarted)."""

from __future__ import annotations

import time


class RecentFailures:
    """Remembers failed node URLs for `ttl_s` seconds."""

    def __init__(self, ttl_s: float = 60.0) -> None:
        self.ttl_s = ttl_s
        self._since: dict[str, float] = {}

    def add(self, url: str) -> None:
        self._since[url] = time.monotonic()

    def current(self) -> set[str]:
        """The URLs that failed within the last `ttl_s` seconds."""
        cutoff = time.monotonic() - self.ttl_s
        self._since = {url: at for url, at in self._since.items() if at >= cutoff}
        return set(self._since)
