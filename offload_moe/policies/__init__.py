"""Eviction policies for the expert cache, one per file, behind ``EvictionPolicy``.

``make_policy`` builds one from its name, as the config and the CLI spell it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ConfigError
from .base import EvictionPolicy, Key, reads_tokens
from .belady import Belady
from .fifo import FIFO
from .forecast import Forecast
from .lfu import LFU
from .lru import LRU
from .rand import Random
from .token_forecast import TokenForecast

POLICIES: dict[str, type[EvictionPolicy]] = {cls.name: cls for cls in (LRU, LFU, FIFO, Random, Belady, Forecast, TokenForecast)}
BUILT_IN: dict[str, type[EvictionPolicy]] = dict(POLICIES)  # what a freshly started process knows

__all__ = ["BUILT_IN", "POLICIES", "Belady", "EvictionPolicy", "FIFO", "Forecast", "Key", "LFU", "LRU", "Random", "TokenForecast", "make_policy", "reads_tokens"]


def make_policy(name: str, *, seed: int = 0, future: Sequence[Key] | None = None) -> EvictionPolicy:
    """Build the eviction policy called ``name`` (case-insensitive).

    ``seed`` seeds ``random``; ``future`` is the full access sequence ``belady``
    needs. Either is ignored by policies that do not use it.
    """
    cls = POLICIES.get(name.lower())
    if cls is None:
        raise ConfigError(f"unknown eviction policy {name!r}; choose one of: {', '.join(POLICIES)}")
    if cls is Random:
        return Random(seed)
    if cls is Belady:
        if future is None:
            raise ConfigError(
                "eviction policy 'belady' needs the future access sequence (future=...); it is meant for "
                "profiling and trace replay, not for serving. Pick lru, lfu, fifo, random, forecast or token-forecast to run a model."
            )
        return Belady(future)
    return cls()
