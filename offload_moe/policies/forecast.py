"""Forecast: evict the key whose next request is expected farthest away, from the layer cycle and a learned chance of reuse.

A model requests its MoE layers in a fixed cycle, so expert (layer, e) is needed again no sooner than its
layer's next visit, ``d`` layer steps ahead (1 for the next layer, the whole period for the layer that just
ran). Whether it is needed then depends on how recently and how often ``e`` was chosen at that layer. The
policy learns that chance ``p`` online: a table of observed reuse rates over bins of (visits since last use,
decayed frequency), pooled over layers and updated at every visit of every layer, so it adapts to routing
with strong locality (recent experts return) as to routing with a stable popular set (frequent ones do).
Reading each later visit as a new try with the same chance, the next request is expected
``d + period * (1 - p) / p`` layer steps ahead; the farthest goes (Belady's rule, on an estimate).

LRU, by contrast, evicts the least recently used key, which in a cycle is the next layer's: the one needed first.
"""

from __future__ import annotations

import math
from collections.abc import Container

from ..errors import PolicyError
from .base import EvictionPolicy, Key
from .heap import LazyHeap

HALF_LIFE = 100.0  # the default: visits of a layer after which a request counts half
_BINS = 8  # age bins: 1, 2, 3-4, 5-8, ..., 65+ visits; frequency bins: >= 1/2, >= 1/4, ..., below 1/128
_PRIOR = 4.0  # weight, in observations, of an expert's own frequency against its bin's learned rate
_UNSEEN = 0.0  # chance given to a key never requested at its layer, once that layer has run without it


class Forecast(EvictionPolicy):
    """Evicts the resident key whose next request is expected farthest away (see the module docstring).

    ``half_life``: visits of a layer after which a request counts half in an expert's frequency. A key
    inserted without a request (a prefetch, the fill at start) is kept until its layer has run once.
    Each layer keeps its resident keys in a heap by chance, so ``victim`` compares one key per layer.
    """

    name = "forecast"

    def __init__(self, half_life: float = HALF_LIFE) -> None:
        if not half_life > 0:
            raise PolicyError(f"forecast: half_life={half_life} must be a positive number of visits")
        self.decay = 0.5 ** (1.0 / half_life)
        self._layer = None  # the layer being requested now, and the experts requested at this visit, in request
        # order (a dict: a set's order would follow its hash table, which the compiled replay cannot follow)
        self._group: dict = {}
        self._step = 0  # layer visits so far, all layers together
        self._visited_at: dict = {}  # layer -> step of its latest visit
        self._visits: dict = {}  # layer -> visits so far
        # layer -> {expert: [decayed requests, at visit, last request's visit]}, in order of first request: the order
        # in which a visit's scores update the table, which the chances read as they go
        self._stats: dict = {}
        self._table = [[0.0, 0.0] for _ in range(_BINS * _BINS)]  # (age bin, frequency bin) -> [reuses, tries]
        self._rank: dict[Key, tuple[float, int]] = {}  # key -> (chance at its layer's next visit, last use)
        self._heaps: dict = {}  # layer -> LazyHeap of its resident keys, lowest chance first

    # -- what the cache tells ------------------------------------------------
    def on_access(self, key: Key) -> None:
        layer = key[0]
        if layer != self._layer:
            self._close_visit()
            self._layer = layer
            self._step += 1
            self._visited_at[layer] = self._step
            self._visits[layer] = self._visits.get(layer, 0) + 1
        self._group[key[1]] = None

    def on_insert(self, key: Key) -> None:
        layer = key[0]
        heap = self._heaps.get(layer)
        if heap is None:
            heap = self._heaps[layer] = LazyHeap(self._rank, self.name)
        if layer == self._layer and key[1] in self._group:
            self._rank.setdefault(key, (_UNSEEN, -1))  # requested now: ranked when this visit ends
        else:  # named by a prefetch or the fill at start: kept until its layer has run
            self._rank[key] = (1.0, self._rank.get(key, (0.0, -1))[1])
        heap.add(key)

    def on_evict(self, key: Key) -> None:
        heap = self._heaps.get(key[0])
        if heap is not None:
            heap.discard(key)

    def victim(self, pinned: Container[Key]) -> Key:
        period = len(self._visited_at) or 1
        best, best_score = None, -1.0
        for layer, heap in self._heaps.items():
            key = heap.first_unpinned(pinned)
            if key is None:
                continue
            distance = self._visited_at.get(layer, self._step) + period - self._step
            if distance <= 0:
                distance += period
            chance = self._rank[key][0]
            score = distance + period * (1.0 - chance) / chance if chance > 0 else math.inf
            if score > best_score:
                best, best_score = key, score
        if best is None:
            raise PolicyError("forecast: victim() found no evictable resident key; call it only when one is unpinned")
        return best

    # -- learning, once per visit of a layer ------------------------------------
    def _close_visit(self) -> None:
        """Score the visit that just ended against each expert's bin, then refresh the layer's chances."""
        layer = self._layer
        if layer is None:
            return
        visit = self._visits[layer]
        chosen, self._group = self._group, {}
        stats = self._stats.setdefault(layer, {})
        table, decay, rank = self._table, self.decay, self._rank
        seen = 1.0 - decay ** visit  # the decayed count of visits, times (1 - decay)
        heap = self._heaps.get(layer)
        for expert, entry in stats.items():
            count, at, last = entry
            before = count * decay ** (visit - 1 - at)  # the decayed count up to the visit before this one
            rate = before * (1.0 - decay) / (1.0 - decay ** (visit - 1)) if visit > 1 else 0.0
            cell = table[_cell(visit - last, rate)]
            cell[1] += 1.0
            if expert in chosen:
                cell[0] += 1.0
                entry[0], entry[1], entry[2] = before * decay + 1.0, visit, visit
                count, at, last = entry
            rate = count * decay ** (visit - at) * (1.0 - decay) / seen
            hits, tries = table[_cell(visit + 1 - last, rate)]
            key = (layer, expert)
            rank[key] = ((hits + _PRIOR * rate) / (tries + _PRIOR), last)
            if heap is not None and key in heap.resident:
                heap.push(key)
        for expert in [e for e in chosen if e not in stats]:  # first requests at this layer: no try to score yet
            stats[expert] = [1.0, visit, visit]
            key = (layer, expert)
            rate = (1.0 - decay) / seen
            hits, tries = table[_cell(1, rate)]
            rank[key] = ((hits + _PRIOR * rate) / (tries + _PRIOR), visit)
            if heap is not None and key in heap.resident:
                heap.push(key)
        if heap is not None:
            for key in heap.resident:
                if key[1] not in stats and rank[key][0] != _UNSEEN:  # inserted, then its layer ran without it
                    rank[key] = (_UNSEEN, -1)
                    heap.push(key)


def _cell(age: int, rate: float) -> int:
    """The table cell of an expert last requested ``age`` visits ago, requested at ``rate`` per visit."""
    age_bin = min((age - 1).bit_length(), _BINS - 1)
    rate_bin = min(int(-math.log2(rate)), _BINS - 1) if rate > 0 else _BINS - 1
    return age_bin * _BINS + max(rate_bin, 0)
