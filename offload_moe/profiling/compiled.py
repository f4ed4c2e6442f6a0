"""The fast replay engine: the reference's bookkeeping over arrays, compiled with numba when it is installed.

What a replay counts is defined by the reference (``replay(engine="reference")``: the runtime's own
``ExpertCache`` and ``Prefetcher`` driven by a ``NullMover``); this engine is an optimisation held equal
to it, counter by counter and layer by layer, by tests/test_replay_engines.py. A key is
``layer position * experts + expert``. At each token and layer, as the runtime takes it:

1. the prefetches started at the previous layer have landed: their flight pins go;
2. the layer requests its distinct experts, ascending: a hit is pinned (and counts a prefetch used if a
   prefetch brought it); every request is the policy's ``on_access``;
3. the misses are admitted in that order, each taking a free slot or evicting the policy's victim among
   the unpinned keys;
4. the predictor's guesses for the next layer (best first) are started while the layer still pins its
   experts, up to the first that finds every slot pinned, and tried again once the layer lets go; a
   started prefetch stays pinned (in flight) until the next layer starts.

The policies are the ones in ``offload_moe.policies``: ``lru`` and ``fifo`` a list in insertion order
(``lru`` moves a requested key to the end), ``lfu`` the lowest (requests, last request), ``belady`` the
farthest next request (both: ties to the key inserted earliest, as ``policies.heap.LazyHeap`` breaks
them; here ``lfu`` keeps one list per request count, ordered by last request, and ``belady`` one binary
heap of the resident keys updated in place, where the reference's lazy heap leaves stale entries),
``random`` draws from Python's Mersenne Twister, seeded as ``random.Random(seed)``, in the order
``policies.rand.Random`` draws. ``forecast`` keeps the policy's statistics per layer and expert, its
learned table and one heap per layer (lowest (chance, last use) first, ties as ``LazyHeap``'s) in arrays,
and computes the same doubles in the same order: its powers ``decay ** n`` are Python's own, worked out
once per replay (numba's power with an integer exponent is not the C library's ``pow``), and
``math.log2`` is the C library's in both. The ``transition`` predictor's guesses do not depend on the
cache, so they are worked out once per trace (``transition_guesses``, the online ``TransitionPredictor``
token by token); ``hybrid`` pools them with the recorded ``gate`` guesses at each step, as ``Prefetcher``
does. A replay's state (``ReplayState``) and the predictor's counts (``TransitionGuesses``) can be fed a trace in
consecutive pieces, for a trace file read in bounded memory (``profiling.chunked``).

Without numba the same functions run as plain Python, far slower; ``compile_kernels`` says which.
"""

from __future__ import annotations

import math
import random
import warnings

import numpy as np

from ..policies.forecast import _BINS, _PRIOR, HALF_LIFE, Forecast
from ..traces import Trace

LRU, FIFO, LFU, RANDOM, BELADY, FORECAST = 0, 1, 2, 3, 4, 5
POLICY_CODES = {"lru": LRU, "fifo": FIFO, "lfu": LFU, "random": RANDOM, "belady": BELADY, "forecast": FORECAST}
COUNTERS = ("hits", "misses", "evictions", "prefetch_issued", "prefetch_used")  # the columns of replay_counts
HITS, MISSES, EVICTIONS, ISSUED, USED = range(5)
NEVER = np.iinfo(np.int64).max  # belady: a key not requested again
_TRIES = 8  # policies.rand: random picks before scanning the candidates
_HALVES = np.array([0.5 ** (k + 1) for k in range(_BINS)])  # forecast: the frequency bins' lower ends, 1/2, 1/4, ..
_NEAR = 2.0 ** -20  # forecast: a rate this close (relatively) to a bin's end has its bin worked out with care
_AGE_BINS = np.array([min(n.bit_length(), _BINS - 1) for n in range(1 << (_BINS - 1))])  # [age - 1]; beyond: _BINS - 1
_MANTISSA = (1 << 52) - 1  # a double's fraction bits
_EDGE = 1 << 33  # a fraction this close to 0 or to the top: within 2**-19 of a power of two
# the scalar state, one int64 array: list ends, heap size, counters of the policies, the generator's index,
# the prefetches in flight, lfu's lowest word of nonempty buckets; forecast's layer visits so far (all layers),
# the layer being requested (-1: none yet), the layers visited, the layers with a heap, the experts of this visit
_HEAD, _TAIL, _HEAP, _RESIDENT, _VISIT, _TICK, _ADDED, _CURSOR, _MT, _LOW, _STEP, _LAYER, _PERIOD, _HEAPS, _GROUP = \
    range(15)
# forecast's columns and rows: of ``fvalues`` [keys, 2], a key's chance at its layer's next visit and its decayed
# requests; of ``fints`` [keys, 3], the last use its rank holds (-1: none), the visit its requests were counted at (0:
# never requested at its layer) and its last request's visit (a key's values side by side, read together at each
# visit of its layer); of the rows of ``flayers`` [6, L], a layer's latest visit (its step;
# 0: not yet), its visits, the experts it has seen, its heap's size, whether it has a heap, and the layers with a
# heap in the order they got it
_CHANCE, _DECAYED = 0, 1
# of ``fwork`` [6, max(E, L)]: a layer visit's scores as it ends, per expert in ``known`` order (the hits and tries of
# its chance's table cell, read in turn, and its rate's numerator), and per layer the last ``period * (1 - chance) /
# chance`` of ``_fc_victim`` with the chance and period it was worked out for
_SNAP_HITS, _SNAP_TRIES, _SNAP_RATE, _Q_CHANCE, _Q_PERIOD, _Q = range(6)
_RANK_LAST, _COUNTED_AT, _USED_AT = 0, 1, 2
_VISITED_AT, _VISITS, _KNOWN, _SIZE, _MADE, _ORDER = range(6)


# ---------------------------------------------------------------- Python's Mersenne Twister (random.Random)

def _mt_next(mt, state):
    """The generator's next 32-bit output (CPython's genrand_uint32); ``mt`` holds its 624 words as int64."""
    i = state[_MT]
    if i >= 624:
        for kk in range(624):
            y = (mt[kk] & 0x80000000) | (mt[(kk + 1) % 624] & 0x7FFFFFFF)
            word = mt[(kk + 397) % 624] ^ (y >> 1)
            if y & 1:
                word ^= 0x9908B0DF
            mt[kk] = word
        i = 0
    y = mt[i]
    state[_MT] = i + 1
    y ^= y >> 11
    y ^= (y << 7) & 0x9D2C5680
    y ^= (y << 15) & 0xEFC60000
    return y ^ (y >> 18)


def _randbelow(mt, state, n):
    """``random.Random._randbelow(n)`` for 1 <= n < 2**32: getrandbits(n.bit_length()) until below n."""
    bits = 0
    while (1 << bits) <= n:
        bits += 1
    r = _mt_next(mt, state) >> (32 - bits)
    while r >= n:
        r = _mt_next(mt, state) >> (32 - bits)
    return r


def mt_state(seed: int) -> tuple[np.ndarray, int]:
    """The 624 words and the index of ``random.Random(seed)``, as ``policies.rand.Random(seed)`` starts."""
    words = random.Random(seed).getstate()[1]
    return np.array(words[:624], dtype=np.int64), int(words[624])


# ---------------------------------------------------------------- orderings of the resident keys

def _append(prev, after, state, key):
    tail = state[_TAIL]
    prev[key] = tail
    after[key] = -1
    if tail >= 0:
        after[tail] = key
    else:
        state[_HEAD] = key
    state[_TAIL] = key


def _unlink(prev, after, state, key):
    p, n = prev[key], after[key]
    if p >= 0:
        after[p] = n
    else:
        state[_HEAD] = n
    if n >= 0:
        prev[n] = p
    else:
        state[_TAIL] = p


def _lfu_rank(key, requests, last, added):
    """Where ``key`` sits in its LFU bucket: its last request, or for a key never requested its insertion."""
    return last[key] if requests[key] > 0 else added[key]


def _lfu_insert(key, space, state, prev, after, nonempty, requests, last, added):
    """Put a resident ``key`` into the bucket of its request count, ordered by ``_lfu_rank`` (lowest first).

    A bucket ``c`` is a ring through its sentinel ``space + c`` (no branch for its ends). It is walked back from
    its end: a miss has the newest rank but for the other requests of its layer visit, so it lands at once or
    nearly; only a prefetched key requested long ago walks further.
    """
    c = requests[key]
    end = space + c
    rank = _lfu_rank(key, requests, last, added)
    before = prev[end]
    while before != end and _lfu_rank(before, requests, last, added) > rank:
        before = prev[before]
    nxt = after[before]
    prev[key], after[key] = before, nxt
    after[before] = key
    prev[nxt] = key
    nonempty[c >> 6] |= np.uint64(1) << np.uint64(c & 63)
    if (c >> 6) < state[_LOW]:
        state[_LOW] = c >> 6


def _lfu_append(key, space, state, prev, after, nonempty, requests):
    """``_lfu_insert`` of a key just requested, at a hit: its rank is the newest, so it goes to the end of its bucket."""
    c = requests[key]
    end = space + c
    tail = prev[end]
    prev[key], after[key] = tail, end
    after[tail] = key
    prev[end] = key
    if tail == end:  # the bucket was empty
        nonempty[c >> 6] |= np.uint64(1) << np.uint64(c & 63)
        if (c >> 6) < state[_LOW]:
            state[_LOW] = c >> 6


def _lfu_remove(key, count, space, prev, after, nonempty):
    """Take a resident ``key`` out of bucket ``count``."""
    p, n = prev[key], after[key]
    after[p] = n
    prev[n] = p
    if p == n:  # both the sentinel: the bucket is empty now
        nonempty[count >> 6] &= ~(np.uint64(1) << np.uint64(count & 63))


def _lowest_bit(word):
    """The index of ``word``'s lowest set bit (``word`` > 0): the exponent of that bit alone, as a double."""
    return (np.float64(word & (~word + np.uint64(1))).view(np.int64) >> 52) - 1023


def _lfu_victim(space, state, pinned_at, low, after, nonempty):
    """The unpinned resident key of lowest (requests, rank): the buckets from the lowest count up, each from its head."""
    while state[_LOW] < nonempty.shape[0] and nonempty[state[_LOW]] == np.uint64(0):
        state[_LOW] += 1  # no bucket below this word holds a key
    for w in range(state[_LOW], nonempty.shape[0]):
        word = nonempty[w]
        while word != np.uint64(0):
            bit = _lowest_bit(word)
            word &= word - np.uint64(1)
            end = space + w * 64 + bit
            key = after[end]
            while key != end:
                if pinned_at[key] < low:
                    return key
                key = after[key]
    return -1


def _before(a, b, next_use, added):
    """Belady's order: ``a`` goes before ``b`` if its next request is farther, ties (never again) to the key
    inserted earlier."""
    return next_use[a] > next_use[b] or (next_use[a] == next_use[b] and added[a] < added[b])


def _place(heap, at, i, key):
    heap[i] = key
    at[key] = i


def _sift_up(heap, at, i, next_use, added):
    key = heap[i]
    while i > 0:
        parent = (i - 1) >> 1
        if not _before(key, heap[parent], next_use, added):
            break
        _place(heap, at, i, heap[parent])
        i = parent
    _place(heap, at, i, key)


def _sift_down(heap, at, state, i, next_use, added):
    n = state[_HEAP]
    key = heap[i]
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and _before(heap[child + 1], heap[child], next_use, added):
            child += 1
        if not _before(heap[child], key, next_use, added):
            break
        _place(heap, at, i, heap[child])
        i = child
    _place(heap, at, i, key)


def _heap_insert(heap, at, state, key, next_use, added):
    i = state[_HEAP]
    state[_HEAP] = i + 1
    _place(heap, at, i, key)
    _sift_up(heap, at, i, next_use, added)


def _heap_remove(heap, at, state, key, next_use, added):
    i = at[key]
    at[key] = -1
    n = state[_HEAP] - 1
    state[_HEAP] = n
    if i == n:
        return
    moved = heap[n]
    _place(heap, at, i, moved)
    _sift_up(heap, at, i, next_use, added)
    _sift_down(heap, at, state, at[moved], next_use, added)


def _heap_victim(heap, at, kept, state, pinned_at, low, next_use, added):
    """Belady's unpinned resident key that goes first: the keys of one heap (resident keys only, each once,
    moved in place when a request changes its next use), the pinned ones lifted off the top and put back."""
    held = 0
    victim = -1
    while state[_HEAP] > 0:
        key = heap[0]
        if pinned_at[key] < low:
            victim = key
            break
        _heap_remove(heap, at, state, key, next_use, added)
        kept[held] = key
        held += 1
    for i in range(held):
        _heap_insert(heap, at, state, kept[i], next_use, added)
    return victim


def _random_victim(mt, state, residents, pinned_at, low):
    """``policies.rand.Random.victim``: a few uniform picks among the resident keys, then one among the unpinned."""
    n = state[_RESIDENT]
    for _ in range(_TRIES if n else 0):
        key = residents[_randbelow(mt, state, n)]
        if pinned_at[key] < low:
            return key
    unpinned = 0
    for i in range(n):
        if pinned_at[residents[i]] < low:
            unpinned += 1
    chosen = _randbelow(mt, state, unpinned)
    for i in range(n):
        if pinned_at[residents[i]] < low:
            if chosen == 0:
                return residents[i]
            chosen -= 1
    return -1


# ---------------------------------------------------------------- forecast (policies.forecast)

def _fc_before(a, b, fvalues, fints, added):
    """Forecast's order in a layer's heap, ``LazyHeap``'s: lower (chance, last use) first, ties to the key inserted
    earlier."""
    if fvalues[a, _CHANCE] != fvalues[b, _CHANCE]:
        return fvalues[a, _CHANCE] < fvalues[b, _CHANCE]
    if fints[a, _RANK_LAST] != fints[b, _RANK_LAST]:
        return fints[a, _RANK_LAST] < fints[b, _RANK_LAST]
    return added[a] < added[b]


def _fc_sift_up(heap, at, base, i, fvalues, fints, added):
    key = heap[base + i]
    while i > 0:
        parent = (i - 1) >> 1
        above = heap[base + parent]
        if not _fc_before(key, above, fvalues, fints, added):
            break
        heap[base + i] = above
        at[above] = i
        i = parent
    heap[base + i] = key
    at[key] = i


def _fc_sift_down(heap, at, base, size, i, fvalues, fints, added):
    key = heap[base + i]
    while True:
        child = 2 * i + 1
        if child >= size:
            break
        if child + 1 < size and _fc_before(heap[base + child + 1], heap[base + child], fvalues, fints, added):
            child += 1
        below = heap[base + child]
        if not _fc_before(below, key, fvalues, fints, added):
            break
        heap[base + i] = below
        at[below] = i
        i = child
    heap[base + i] = key
    at[key] = i


def _fc_insert(key, num_experts, state, group, fvalues, fints, flayers, heap, at, added):
    """``Forecast.on_insert``: a key requested at this visit keeps its rank (a new one: chance 0) until the visit
    ends; one named by a prefetch gets chance 1, kept until its layer has run. It joins its layer's heap."""
    layer = key // num_experts
    if flayers[_MADE, layer] == 0:
        flayers[_MADE, layer] = 1
        flayers[_ORDER, state[_HEAPS]] = layer
        state[_HEAPS] += 1
    if layer != state[_LAYER] or group[1, key - layer * num_experts] == 0:
        fvalues[key, _CHANCE] = 1.0
    i = flayers[_SIZE, layer]
    flayers[_SIZE, layer] = i + 1
    base = layer * num_experts
    heap[base + i] = key
    at[key] = i
    _fc_sift_up(heap, at, base, i, fvalues, fints, added)


def _fc_remove(key, num_experts, heap, at, fvalues, fints, flayers, added):
    """``Forecast.on_evict``: ``key`` leaves its layer's heap."""
    layer = key // num_experts
    base = layer * num_experts
    i = at[key]
    at[key] = -1
    size = flayers[_SIZE, layer] - 1
    flayers[_SIZE, layer] = size
    if i == size:
        return
    moved = heap[base + size]
    heap[base + i] = moved
    at[moved] = i
    _fc_sift_up(heap, at, base, i, fvalues, fints, added)
    _fc_sift_down(heap, at, base, size, at[moved], fvalues, fints, added)


def _fc_lowest_unpinned(heap, base, size, pinned_at, low, stack, fvalues, fints, added):
    """The first unpinned key of one layer's heap (-1: none): the lowest of the unpinned keys reached from the top
    through pinned ones only (any key below an unpinned one comes after it)."""
    if size == 0 or pinned_at[heap[base]] < low:  # most layers: the top
        return heap[base] if size > 0 else -1
    best = -1
    n = 1
    stack[0] = 0
    while n > 0:
        n -= 1
        i = stack[n]
        key = heap[base + i]
        if pinned_at[key] < low:
            if best < 0 or _fc_before(key, best, fvalues, fints, added):
                best = key
            continue
        for child in range(2 * i + 1, min(2 * i + 3, size)):
            stack[n] = child
            n += 1
    return best


def _fc_victim(num_experts, state, pinned_at, low, heap, kept, fvalues, fints, flayers, added, fwork):
    """``Forecast.victim``: of each layer's first unpinned key, the one whose next request is expected farthest
    away, the same doubles as the policy's; ties to the layer whose heap came first. A layer's key changes
    seldom between evictions: the division of its score is kept (``fwork``) until its chance or the period does."""
    period = state[_PERIOD] if state[_PERIOD] > 0 else 1
    step = state[_STEP]
    best, best_score = -1, -1.0
    for h in range(state[_HEAPS]):
        layer = flayers[_ORDER, h]
        key = _fc_lowest_unpinned(heap, layer * num_experts, flayers[_SIZE, layer], pinned_at, low, kept, fvalues, fints, added)
        if key < 0:
            continue
        visited = flayers[_VISITED_AT, layer]
        distance = (visited if visited > 0 else step) + period - step
        if distance <= 0:
            distance += period
        chance = fvalues[key, _CHANCE]
        if chance > 0 and (fwork[_Q_CHANCE, layer] != chance or fwork[_Q_PERIOD, layer] != period):
            fwork[_Q_CHANCE, layer], fwork[_Q_PERIOD, layer] = chance, period
            fwork[_Q, layer] = period * (1.0 - chance) / chance
        score = distance + fwork[_Q, layer] if chance > 0 else math.inf
        if score > best_score:
            best, best_score = key, score
    return best


def _fc_age_bin(age):
    """``min((age - 1).bit_length(), _BINS - 1)``."""
    rest = age - 1
    return _AGE_BINS[rest] if rest < _AGE_BINS.shape[0] else _BINS - 1


def _fc_rate_bin(rate):
    """``int(-math.log2(rate))`` in [0, _BINS - 1] (``_BINS - 1`` for 0), as ``policies.forecast._cell`` has it.

    Mostly how many of 1/2, 1/4, .. rate is below: with ``rate = m * 2**e``, 0.5 <= m < 1, ``-log2(rate)`` lies in
    (-e, 1 - e], so it truncates to -e unless m is so close to 0.5 that log2's rounding may give 1 - e; only there
    is ``math.log2`` (the C library's, as CPython's) called."""
    rate_bin = 0
    for k in range(_BINS - 1):
        rate_bin += rate < _HALVES[k]
    if rate_bin < _BINS - 1 and rate < _HALVES[rate_bin] * (1.0 + _NEAR):
        rate_bin = max(min(int(-math.log2(rate)), _BINS - 1), 0) if rate > 0 else _BINS - 1
    return rate_bin


def _fc_cell(age, rate):
    """``policies.forecast._cell``: the table row of a key last requested ``age`` visits ago at ``rate`` a visit."""
    return _fc_age_bin(age) * _BINS + _fc_rate_bin(rate)


def _fc_cell_of_quotient(age, numerator, denominator, inverse):
    """``_fc_cell(age, numerator / denominator)``, where the division waits on nothing: the rate's bin is the
    exponent of ``numerator * inverse`` (``inverse``: ``1 / denominator``; within a few units in the last place of
    the quotient), unless its mantissa puts it near a power of two, where the quotient is worked out."""
    bits = np.float64(numerator * inverse).view(np.int64)  # a rate is >= 0: no sign bit
    fraction = bits & _MANTISSA
    if fraction < _EDGE or fraction > _MANTISSA - _EDGE:
        rate_bin = _fc_rate_bin(numerator / denominator)
    else:  # m * 2**e, 0.5 < m < 1 not near either end: -log2 truncates to -e, and the exponent field is e + 1022
        rate_bin = min(max(1022 - (bits >> 52), 0), _BINS - 1)
    return _fc_age_bin(age) * _BINS + rate_bin


def _fc_access(key, num_experts, state, group, fvalues, fints, flayers, known, table, powers, decay, heap, at,
               added, fwork):
    """``Forecast.on_access``: a request at another layer than the last ends that layer's visit, starts this one's."""
    layer = key // num_experts
    if layer != state[_LAYER]:
        if state[_LAYER] >= 0:
            _fc_close_visit(state[_LAYER], num_experts, state, group, fvalues, fints, flayers, known, table, powers,
                            decay, heap, at, added, fwork)
        state[_LAYER] = layer
        state[_STEP] += 1
        if flayers[_VISITED_AT, layer] == 0:
            state[_PERIOD] += 1
        flayers[_VISITED_AT, layer] = state[_STEP]
        flayers[_VISITS, layer] += 1
    expert = key - layer * num_experts
    if group[1, expert] == 0:
        group[1, expert] = 1
        group[0, state[_GROUP]] = expert
        state[_GROUP] += 1


def _fc_close_visit(layer, num_experts, state, group, fvalues, fints, flayers, known, table, powers, decay, heap,
                    at, added, fwork):
    """``Forecast._close_visit``, in the same order and with the same doubles: each expert seen at ``layer`` scores
    the visit in its table cell, then reads its chance from the table as it is by then. ``known`` [L * E]: each
    layer's experts in order of first request; ``powers[n]``: ``decay ** n`` as Python computes it."""
    visit = flayers[_VISITS, layer]
    base = layer * num_experts
    seen = 1.0 - powers[visit]  # the decayed count of visits, times (1 - decay)
    before = 1.0 - powers[visit - 1]  # and before this visit
    inverse_before, inverse_seen = 1.0 / before if visit > 1 else 0.0, 1.0 / seen
    for s in range(flayers[_KNOWN, layer]):
        expert = known[base + s]
        key = base + expert
        count, counted_at, last = fvalues[key, _DECAYED], fints[key, _COUNTED_AT], fints[key, _USED_AT]
        past = count * powers[visit - 1 - counted_at]  # the decayed count up to the visit before this one
        # the rate past * (1.0 - decay) / (1.0 - powers[visit - 1]) (0 at the first visit) only picks the cell
        if visit > 1:
            cell = _fc_cell_of_quotient(visit - last, past * (1.0 - decay), before, inverse_before)
        else:
            cell = _fc_cell(visit - last, 0.0)
        table[cell, 1] += 1
        if group[1, expert]:
            table[cell, 0] += 1
            count = past * decay + 1.0
            counted_at = last = visit
            fvalues[key, _DECAYED], fints[key, _COUNTED_AT], fints[key, _USED_AT] = count, visit, visit
        numerator = count * powers[visit - counted_at] * (1.0 - decay)
        cell = _fc_cell_of_quotient(visit + 1 - last, numerator, seen, inverse_seen)
        fwork[_SNAP_HITS, s], fwork[_SNAP_TRIES, s], fwork[_SNAP_RATE, s] = table[cell, 0], table[cell, 1], numerator
        fints[key, _RANK_LAST] = last
    for s in range(flayers[_KNOWN, layer]):  # the chances: divisions that wait on nothing above, apart
        rate = fwork[_SNAP_RATE, s] / seen
        fvalues[base + known[base + s], _CHANCE] = (fwork[_SNAP_HITS, s] + _PRIOR * rate) / (fwork[_SNAP_TRIES, s] + _PRIOR)
    for g in range(state[_GROUP]):  # first requests at this layer: no try to score yet
        expert = group[0, g]
        key = base + expert
        if fints[key, _COUNTED_AT] > 0:
            continue
        fvalues[key, _DECAYED], fints[key, _COUNTED_AT], fints[key, _USED_AT] = 1.0, visit, visit
        known[base + flayers[_KNOWN, layer]] = expert
        flayers[_KNOWN, layer] += 1
        rate = (1.0 - decay) / seen
        cell = _fc_cell(1, rate)
        fvalues[key, _CHANCE] = (float(table[cell, 0]) + _PRIOR * rate) / (float(table[cell, 1]) + _PRIOR)
        fints[key, _RANK_LAST] = visit
    size = flayers[_SIZE, layer]
    for i in range(size):  # resident keys inserted, then their layer ran without them: chance 0
        key = heap[base + i]
        if fints[key, _COUNTED_AT] == 0:
            fvalues[key, _CHANCE], fints[key, _RANK_LAST] = 0.0, -1
    # the resident keys' ranks changed: the layer's heap made again (its victim, the lowest unpinned key, does not
    # depend on how the heap is laid out: the order is total, ties going to the key inserted earlier)
    for i in range(size // 2 - 1, -1, -1):
        _fc_sift_down(heap, at, base, size, i, fvalues, fints, added)
    for g in range(state[_GROUP]):
        group[1, group[0, g]] = 0
    state[_GROUP] = 0


# ---------------------------------------------------------------- the guesses a prefetcher starts

def _pooled(gate, transition, t, pos, votes, out):
    """``prefetch.pooled_row`` of the gate's and the transition's guesses (-1: none) into ``out``: each guess
    scores the guesses left after it, plus one; highest score first, ties to the lower expert. Returns how many."""
    total = 0
    for j in range(gate.shape[2]):
        total += gate[t, pos, j] >= 0
    for j in range(transition.shape[2]):
        total += transition[t, pos, j] >= 0
    n = 0
    i = 0
    for part in range(2):
        row = gate if part == 0 else transition
        for j in range(row.shape[2]):
            expert = row[t, pos, j]
            if expert < 0:
                continue
            weight = total - i
            i += 1
            found = False
            for m in range(n):
                if out[m] == expert:
                    votes[m] += weight
                    found = True
                    break
            if not found:
                out[n] = expert
                votes[n] = weight
                n += 1
    for a in range(1, n):  # insertion sort: a handful of guesses
        e, v = out[a], votes[a]
        b = a - 1
        while b >= 0 and (votes[b] < v or (votes[b] == v and out[b] > e)):
            out[b + 1], votes[b + 1] = out[b], votes[b]
            b -= 1
        out[b + 1], votes[b + 1] = e, v
    return n


def transition_guesses(experts, num_experts, width):
    """What ``prefetch.TransitionPredictor`` names one layer ahead when the trace is fed to it token by token.

    ``experts`` [T, L, k] in the router's order (the order its float sums run in); returns int16
    [T, L-1, width], best first, -1 where fewer experts have any evidence. The same float32 arithmetic
    as the predictor's numpy (exact while no expert is followed more than 2**24 times).
    """
    return TransitionGuesses(experts.shape[1], num_experts, width).next(experts)


class TransitionGuesses:
    """``transition_guesses`` of a trace fed in consecutive pieces: the predictor's counts carry from one piece
    to the next, so the pieces' guesses put together are the whole trace's."""

    def __init__(self, layers: int, num_experts: int, width: int):
        ahead = max(layers - 1, 0)
        self.width = width
        self.counts = np.zeros((ahead, num_experts, num_experts), dtype=np.float32)  # [L-1, E, E]
        self.totals = np.zeros((ahead, num_experts), dtype=np.float32)
        self._scores = np.zeros(num_experts, dtype=np.float32)
        self._best = np.empty(width, dtype=np.int64)

    def next(self, experts: np.ndarray) -> np.ndarray:
        """The guesses int16 [T, L-1, width] for the next piece ``experts`` [T, L, k]."""
        compile_kernels()
        tokens, layers, _ = experts.shape
        out = np.full((tokens, max(layers - 1, 0), self.width), -1, dtype=np.int16)
        _transition_into(np.ascontiguousarray(experts), self.counts, self.totals, self._scores, self._best, out)
        return out


def _transition_into(experts, counts, totals, scores, best, out):
    """``TransitionGuesses.next``'s loop: observe each token's layer pairs, name the top ``width`` into ``out``."""
    tokens, layers, k = experts.shape
    ahead = max(layers - 1, 0)
    num_experts = scores.shape[0]
    width = best.shape[0]
    one = np.float32(1.0)
    for t in range(tokens):
        for pos in range(layers):
            if pos > 0:  # observe: every (previous, current) pair of the token's experts
                for i in range(k):
                    before = experts[t, pos - 1, i]
                    for j in range(k):
                        counts[pos - 1, before, experts[t, pos, j]] += one
                    totals[pos - 1, before] += np.float32(k)
            if pos == ahead:
                continue
            scores[:] = 0
            for i in range(k):
                row = experts[t, pos, i]
                total = totals[pos, row]
                if total > 0:  # an unseen expert's row adds zeros
                    for e in range(num_experts):
                        scores[e] += np.float32(counts[pos, row, e] / total)
            named = 0
            for e in range(num_experts):  # the top ``width`` positive scores, ties to the lower expert
                s = scores[e]
                if s <= 0 or (named == width and s <= scores[best[named - 1]]):
                    continue
                b = min(named, width - 1)
                while b > 0 and scores[best[b - 1]] < s:
                    best[b] = best[b - 1]
                    b -= 1
                best[b] = e
                named = min(named + 1, width)
            for j in range(named):
                out[t, pos, j] = best[j]


# ---------------------------------------------------------------- the replay

def replay_counts(keys, starts, layers, num_experts, capacity, policy, gate, transition, following, mt, mt_index,
                  half_life=HALF_LIFE):
    """Replay one trace; returns int64 [layers, 5]: ``COUNTERS`` per layer position.

    ``keys`` int32 [N]: each token and layer's distinct experts, ascending, as keys; ``starts`` int64
    [T * L + 1] where each token and layer's run begins. ``gate`` and ``transition`` [T, L-1, m] hold the
    guesses for the next layer (-1: none; m = 0: no such predictor). ``following`` [N]: the next position
    of the same key (``NEVER``: none), for Belady; ``mt``, ``mt_index``: the random policy's generator;
    ``half_life``: forecast's (``Forecast(half_life)``).
    """
    state = ReplayState(layers, num_experts, capacity, policy, gate.shape[2] + transition.shape[2], mt, mt_index,
                        half_life=half_life)
    state.feed(keys, starts, gate, transition, following)
    return state.counts


class ReplayState:
    """One replay's cache, policy and counters, fed a trace in consecutive pieces (``feed``): what a piece leaves
    (resident keys, pins of prefetches in flight, the policy's order, the generator) is where the next one
    starts, so feeding the pieces of a trace counts what replaying it whole counts. ``counts`` int64 [L, 5].
    ``half_life``: forecast's, as ``Forecast(half_life)`` takes it (a replay through ``replay`` has the default)."""

    def __init__(self, layers: int, num_experts: int, capacity: int, policy: int, width: int, mt: np.ndarray,
                 mt_index: int, *, half_life: float = HALF_LIFE):
        space = layers * num_experts
        self.layers, self.num_experts, self.capacity, self.policy = layers, num_experts, capacity, policy
        self.counts = np.zeros((layers, 5), dtype=np.int64)
        self.state = np.zeros(15, dtype=np.int64)
        self.state[_HEAD], self.state[_TAIL], self.state[_MT], self.state[_LAYER] = -1, -1, mt_index, -1
        self.mt = mt.copy()
        self.is_resident = np.zeros(space, dtype=np.bool_)
        self.prefetched = np.zeros(space, dtype=np.bool_)
        self.pinned_at = np.full(space, -1, dtype=np.int64)  # a key's pin stamp (see _replay_piece)
        self.evicted = np.zeros(space, dtype=np.int64)  # evictions per key, folded into counts at each piece's end
        self.residents = np.empty(capacity, dtype=np.int64)  # in policies.rand's order: appended, the last moved into a hole
        self.where = np.full(space, -1, dtype=np.int64)
        self.prev = np.full(space, -1, dtype=np.int64)
        self.after = np.full(space, -1, dtype=np.int64)
        self.requests = np.zeros(space, dtype=np.int64)
        self.last = np.zeros(space, dtype=np.int64)
        self.next_use = np.full(space, NEVER, dtype=np.int64)
        self.added = np.zeros(space, dtype=np.int64)
        # belady: the resident keys, a binary heap in its order; forecast: one heap a layer, layer l's in
        # heap[l * E : (l + 1) * E]
        forecast = policy == FORECAST
        self.heap = np.empty(space if forecast else capacity + 1, dtype=np.int64)
        self.at = np.full(space, -1, dtype=np.int64)  # a key's place in its heap
        self.kept = np.empty_like(self.heap)  # keys set aside on the way to the victim or through a heap
        # forecast (see the rows at the top): Python's float decay and its powers, decay ** n at [n], as the policy
        # computes them (the visits of a layer grow with the tokens fed, so they grow too); the learned table
        self.decay = Forecast(half_life).decay
        self.powers = np.empty(0, dtype=np.float64)
        # (age bin, frequency bin) -> [reuses, tries]; whole numbers, which the policy keeps as floats (exact below
        # 2**53), kept as integers here: an integer add is quicker where one cell takes many tries in a row
        self.table = np.zeros((_BINS * _BINS, 2), dtype=np.int64)
        self.fvalues = np.zeros((space if forecast else 0, 2), dtype=np.float64)  # a key's values side by side
        self.fints = np.zeros((space if forecast else 0, 3), dtype=np.int64)
        self.fints[:, _RANK_LAST] = -1
        self.flayers = np.zeros((6, layers), dtype=np.int64)
        self.fwork = np.full((6, max(num_experts, layers) if forecast else 0), -1.0)  # see the rows at the top
        self.known = np.zeros(space if forecast else 0, dtype=np.int64)  # each layer's experts, by first request
        self.group = np.zeros((2, num_experts), dtype=np.int64)  # this visit's experts, in request order; 1 where in it
        # lfu: one ring of resident keys per request count c, through its sentinel space + c in prev and after, a
        # bit per nonempty ring; a key is requested at most once a token, so the rings grow with the tokens fed
        self.tokens = 0
        self.buckets = 0
        self.nonempty = np.zeros(0, dtype=np.uint64)
        self.guesses = np.empty(max(width, 1), dtype=np.int64)
        self.votes = np.empty(max(width, 1), dtype=np.int64)

    def feed(self, keys: np.ndarray, starts: np.ndarray, gate: np.ndarray, transition: np.ndarray,
             following: np.ndarray) -> None:
        """Replay the next piece: its ``keys`` and ``starts`` (``request_keys``), the guesses for its tokens, and for
        Belady ``following`` [N], the next position of each request's key counted from the piece's first request
        (it may lie in a later piece; ``NEVER``: none)."""
        compile_kernels()
        self.state[_CURSOR] = 0
        self.tokens += (starts.shape[0] - 1) // self.layers
        if self.policy == LFU and self.buckets < self.tokens + 2:
            self._grow_buckets(max(self.tokens + 2, 2 * self.buckets))
        if self.policy == FORECAST and self.powers.shape[0] < self.tokens + 2:  # a layer's visits: one a token at most
            size = max(self.tokens + 2, 2 * self.powers.shape[0])
            more = [self.decay ** n for n in range(self.powers.shape[0], size)]  # CPython's float ** int
            self.powers = np.concatenate([self.powers, np.array(more, dtype=np.float64)])
        _PIECES[self.policy](keys, starts, self.layers, self.num_experts, self.capacity, gate, transition, following,
                             self.counts, self.state, self.mt, self.is_resident, self.prefetched, self.pinned_at,
                             self.evicted, self.residents, self.where, self.prev, self.after, self.requests, self.last,
                             self.next_use, self.added, self.heap, self.at, self.kept, self.nonempty,
                             self.guesses, self.votes, self.fvalues, self.fints, self.flayers, self.known,
                             self.group, self.table, self.powers, self.decay, self.fwork)

    def _grow_buckets(self, size: int) -> None:
        words = (size + 63) // 64
        size = 64 * words
        sentinels = np.arange(self.prev.shape[0], self.is_resident.shape[0] + size, dtype=np.int64)  # each its own ring
        self.prev = np.concatenate([self.prev, sentinels])
        self.after = np.concatenate([self.after, sentinels])
        self.buckets = size
        self.nonempty = np.concatenate([self.nonempty, np.zeros(words - self.nonempty.shape[0], dtype=np.uint64)])


def _replay_piece(policy, keys, starts, layers, num_experts, capacity, gate, transition, following, counts, state, mt,
                  is_resident, prefetched, pinned_at, evicted, residents, where, prev, after, requests, last, next_use,
                  added, heap, at, kept, nonempty, guesses, votes, fvalues, fints, flayers, known, group,
                  table, powers, decay, fwork):
    """``ReplayState.feed``'s loop over the piece's tokens and layers, for one ``policy``: each policy's replay is
    compiled apart (``_PIECES``), so the tests of ``policy`` fold away.

    A key is pinned at most once at a time (a layer's keys and the prefetches for the next layer differ), so a pin
    is a stamp: the layer visit ``v`` pins its keys with ``2v`` and its prefetches with ``2v + 1``, and a key is
    pinned while ``pinned_at[key] >= low``; ``low`` moves past ``2v`` once the layer is done and past both at the
    next visit, when the prefetches have landed. Evictions are tallied per key (``evicted``) and folded into the
    counts per layer at the end of the piece."""
    width = gate.shape[2] + transition.shape[2]
    visit, tick, cursor = state[_VISIT], state[_TICK], state[_CURSOR]
    space = layers * num_experts  # lfu: bucket c's sentinel is space + c in prev and after
    tokens = (starts.shape[0] - 1) // layers
    for t in range(tokens):
        for pos in range(layers):
            visit += 1
            low = 2 * visit  # the previous visit's prefetches have landed
            first, end = starts[t * layers + pos], starts[t * layers + pos + 1]
            hits = 0
            for i in range(first, end):  # the requests: on_access, then hit or miss
                key = keys[i]
                resident = is_resident[key]
                if policy == LRU:
                    if resident and key != state[_TAIL]:  # the key at the end stays there
                        _unlink(prev, after, state, key)
                        _append(prev, after, state, key)
                elif policy == LFU:
                    tick += 1
                    last[key] = tick
                    if resident:
                        _lfu_remove(key, requests[key], space, prev, after, nonempty)
                        requests[key] += 1
                        _lfu_append(key, space, state, prev, after, nonempty, requests)
                    else:
                        requests[key] += 1
                elif policy == BELADY:
                    next_use[key] = following[cursor]
                    cursor += 1
                    if resident:  # its next request is later now: it moves toward the top
                        _sift_up(heap, at, at[key], next_use, added)
                elif policy == FORECAST:
                    _fc_access(key, num_experts, state, group, fvalues, fints, flayers, known, table, powers, decay,
                               heap, at, added, fwork)
                if resident:
                    hits += 1
                    pinned_at[key] = low
                    if prefetched[key]:
                        prefetched[key] = False
                        counts[pos, USED] += 1
            counts[pos, HITS] += hits
            counts[pos, MISSES] += end - first - hits
            if hits < end - first:
                for i in range(first, end):  # the misses, admitted
                    key = keys[i]
                    if not is_resident[key]:
                        _admit(key, low, low, policy, capacity, num_experts, state, is_resident, prefetched, pinned_at,
                               evicted, residents, where, prev, after, requests, last, next_use, added, heap, at, kept,
                               mt, space, nonempty, group, fvalues, fints, flayers, fwork)
            named = _pooled(gate, transition, t, pos, votes, guesses) if pos < layers - 1 and width else 0
            pinned = end - first  # the layer's keys, all resident by now
            for layer_done in range(0 if named else 1, 2):  # the prefetches: while the layer runs, then once it is done
                if layer_done:
                    low = 2 * visit + 1
                    pinned -= end - first
                for j in range(named):
                    key = (pos + 1) * num_experts + guesses[j]
                    if is_resident[key]:
                        continue
                    if state[_RESIDENT] >= capacity and pinned >= state[_RESIDENT]:
                        break  # every slot is pinned: the rest wait for the retry
                    _admit(key, 2 * visit + 1, low, policy, capacity, num_experts, state, is_resident, prefetched,
                           pinned_at, evicted, residents, where, prev, after, requests, last, next_use, added, heap, at,
                           kept, mt, space, nonempty, group, fvalues, fints, flayers, fwork)
                    pinned += 1
                    prefetched[key] = True
                    counts[pos + 1, ISSUED] += 1
    state[_VISIT], state[_TICK], state[_CURSOR] = visit, tick, cursor
    for key in range(evicted.shape[0]):
        if evicted[key] > 0:
            counts[key // num_experts, EVICTIONS] += evicted[key]
            evicted[key] = 0


def _admit(key, stamp, low, policy, capacity, num_experts, state, is_resident, prefetched, pinned_at, evicted,
           residents, where, prev, after, requests, last, next_use, added, heap, at, kept, mt, space, nonempty,
           group, fvalues, fints, flayers, fwork):
    """``Residency.admit``: a free slot, or the policy's victim (a key pinned below ``low``) evicted; ``key`` comes in
    pinned with ``stamp``."""
    if state[_RESIDENT] >= capacity:
        if policy == LRU or policy == FIFO:
            victim = state[_HEAD]
            while pinned_at[victim] >= low:
                victim = after[victim]
            _unlink(prev, after, state, victim)
        elif policy == RANDOM:
            victim = _random_victim(mt, state, residents, pinned_at, low)
        elif policy == LFU:
            victim = _lfu_victim(space, state, pinned_at, low, after, nonempty)
            _lfu_remove(victim, requests[victim], space, prev, after, nonempty)
        elif policy == FORECAST:
            victim = _fc_victim(num_experts, state, pinned_at, low, heap, kept, fvalues, fints, flayers, added, fwork)
            _fc_remove(victim, num_experts, heap, at, fvalues, fints, flayers, added)
        else:
            victim = _heap_victim(heap, at, kept, state, pinned_at, low, next_use, added)
            _heap_remove(heap, at, state, victim, next_use, added)
        is_resident[victim] = False
        prefetched[victim] = False
        evicted[victim] += 1
        state[_RESIDENT] -= 1
        if policy == RANDOM:  # its draws index the resident keys: the last one moves into the hole
            hole, moved = where[victim], residents[state[_RESIDENT]]
            residents[hole] = moved
            where[moved] = hole
    is_resident[key] = True
    if policy == RANDOM:
        residents[state[_RESIDENT]] = key
        where[key] = state[_RESIDENT]
    state[_RESIDENT] += 1
    pinned_at[key] = stamp
    state[_ADDED] += 1
    added[key] = state[_ADDED]
    if policy == LRU or policy == FIFO:
        _append(prev, after, state, key)
    elif policy == LFU:
        _lfu_insert(key, space, state, prev, after, nonempty, requests, last, added)
    elif policy == BELADY:
        _heap_insert(heap, at, state, key, next_use, added)
    elif policy == FORECAST:
        _fc_insert(key, num_experts, state, group, fvalues, fints, flayers, heap, at, added)


def _piece_for(policy):
    """``_replay_piece`` with ``policy`` fixed: compiled, a replay specialised to it."""
    def piece(keys, starts, layers, num_experts, capacity, gate, transition, following, counts, state, mt, is_resident,
              prefetched, pinned_at, evicted, residents, where, prev, after, requests, last, next_use, added, heap, at,
              kept, nonempty, guesses, votes, fvalues, fints, flayers, known, group, table, powers,
              decay, fwork):
        _replay_piece(policy, keys, starts, layers, num_experts, capacity, gate, transition, following, counts, state,
                      mt, is_resident, prefetched, pinned_at, evicted, residents, where, prev, after, requests, last,
                      next_use, added, heap, at, kept, nonempty, guesses, votes, fvalues, fints, flayers,
                      known, group, table, powers, decay, fwork)
    return piece


_PIECES = {code: _piece_for(code) for code in POLICY_CODES.values()}


# ---------------------------------------------------------------- from a trace

class TraceArrays:
    """A trace as the engine reads it, worked out once and kept for the replays of one trace (a sweep's).

    ``keys``/``starts``: each token and layer's distinct experts, ascending (``layer_groups``, as keys);
    ``following()`` the next position of each request's key (Belady); ``guesses(predictor, margin)`` the
    gate's and the transition predictor's guesses [T, L-1, m] (m = 0 where the predictor takes no part).
    """

    def __init__(self, trace: Trace):
        experts = trace.experts.numpy()  # [T, L, k] int16, in the router's order
        tokens, layers, _ = experts.shape
        self.trace = trace
        self.layers = layers
        # expert ids as large as the data (routed or guessed), not the metadata's num_experts
        self.num_experts = int(experts.max()) + 1
        if trace.predicted is not None:
            self.num_experts = max(self.num_experts, int(trace.predicted.max()) + 1)
        self.keys, self.starts = request_keys(experts, self.num_experts)  # [N], [T * L + 1]
        self._following: np.ndarray | None = None
        self._transition: dict[int, np.ndarray] = {}  # width -> [T, L-1, width]

    def following(self) -> np.ndarray:
        if self._following is None:
            self._following = next_positions(self.keys)
        return self._following

    def guesses(self, predictor: str, margin: int) -> tuple[np.ndarray, np.ndarray]:
        """(gate [T, L-1, k + margin], transition [T, L-1, k + margin]), each empty where ``predictor`` lacks it."""
        trace = self.trace
        tokens, ahead, width = trace.num_tokens, max(self.layers - 1, 0), trace.top_k + margin
        none = np.empty((tokens, ahead, 0), dtype=np.int16)
        gate = transition = none
        if predictor in ("gate", "hybrid"):
            gate = np.ascontiguousarray(trace.predicted.numpy()[:, :-1, :width])
        if predictor in ("transition", "hybrid"):
            if width not in self._transition:
                self._transition[width] = transition_guesses(trace.experts.numpy(), self.num_experts, width)
            transition = self._transition[width]
        return gate, transition


def request_keys(experts: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """The requests of routing ``experts`` [T, L, k] as the engine reads them: ``keys`` int32 [N], each token and
    layer's distinct experts, ascending, as ``layer position * num_experts + expert`` (``layer_groups``' order),
    and ``starts`` int64 [T * L + 1], where each token and layer's run of keys begins."""
    tokens, layers, _ = experts.shape
    ordered = np.sort(experts.astype(np.int32), axis=-1)
    distinct = np.ones(ordered.shape, dtype=bool)
    distinct[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    keys = (ordered + np.arange(layers, dtype=np.int32)[None, :, None] * num_experts)[distinct]
    starts = np.zeros(tokens * layers + 1, dtype=np.int64)
    np.cumsum(distinct.sum(-1).reshape(-1), out=starts[1:])
    return keys, starts


def next_positions(keys: np.ndarray, later: np.ndarray | None = None, offset: int = 0) -> np.ndarray:
    """For each request of ``keys`` [N], the position of the next request of the same key, ``NEVER`` if none.

    Positions count from ``offset`` (the first request's position). ``later`` [keys space]: where each key is
    requested first after these requests (``NEVER``: not at all), for a backward pass over the pieces of a
    trace; it is updated to the first requests here, for the piece before.
    """
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    same = ordered[1:] == ordered[:-1]
    following = np.full(len(keys), NEVER, dtype=np.int64)
    following[order[:-1][same]] = order[1:][same] + offset
    if later is not None and len(keys):
        last = np.ones(len(keys), dtype=bool)
        last[:-1] = ~same  # the last request of each key here: its next one is in a later piece
        following[order[last]] = later[ordered[last]]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = ~same
        later[ordered[first]] = order[first] + offset
    return following


def compiled_replay(arrays: TraceArrays, policy: str, capacity: int, predictor: str, margin: int,
                    seed: int) -> np.ndarray:
    """Counters [L, 5] (``COUNTERS``) of one replay of ``arrays``' trace; ``capacity`` slots (those a replay
    needs), ``predictor`` and ``margin`` already checked against the trace."""
    compile_kernels()
    gate, transition = arrays.guesses(predictor, margin)
    following = arrays.following() if policy == "belady" else np.empty(0, dtype=np.int64)
    mt, index = mt_state(seed) if policy == "random" else (np.zeros(624, dtype=np.int64), 624)
    return replay_counts(arrays.keys, arrays.starts, arrays.layers, arrays.num_experts, capacity, POLICY_CODES[policy],
                         gate, transition, following, mt, index)


# ---------------------------------------------------------------- compiling

_KERNELS = ("_mt_next", "_randbelow", "_append", "_unlink", "_lfu_rank", "_lfu_insert", "_lfu_append", "_lfu_remove", "_lowest_bit",
            "_lfu_victim", "_before", "_place", "_sift_up", "_sift_down", "_heap_insert", "_heap_remove", "_heap_victim",
            "_random_victim", "_fc_before", "_fc_sift_up", "_fc_sift_down", "_fc_insert", "_fc_remove",
            "_fc_lowest_unpinned", "_fc_victim", "_fc_age_bin", "_fc_rate_bin", "_fc_cell", "_fc_cell_of_quotient", "_fc_close_visit", "_fc_access", "_pooled", "_admit",
            "_transition_into", "_replay_piece")
_ALLOCATING = ("_transition_into",)
_INLINED = ("_replay_piece", "_admit")
_compiled: bool | None = None  # None: not tried yet


def compile_kernels() -> bool:
    """Compile the engine with numba (cached on disk after the first time); False, with a one-time warning,
    when numba is not installed and the functions stay plain Python."""
    global _compiled
    if _compiled is None:
        try:
            import numba  # optional: pip install 'offload_moe[fast]'
        except ImportError:
            _compiled = False
            warnings.warn("numba is not installed, so the fast replay engine runs as plain Python, many times slower: "
                          "pip install 'offload_moe[fast]'", RuntimeWarning, stacklevel=2)
        else:
            names = globals()
            for name in _KERNELS:
                # The helpers allocate nothing, so they go without numba's reference counts: with them, each
                # call that hands over arrays costs atomic increments that outweigh the work (5-10x slower).
                # error_model="numpy": no test for a zero divisor before each division (none is zero here).
                options = {"error_model": "numpy"} if name in _ALLOCATING else {"_nrt": False, "error_model": "numpy"}
                if name in _INLINED:  # into each policy's replay, where its tests of the policy fold away
                    options["forceinline"] = True
                names[name] = numba.njit(cache=True, nogil=True, **options)(names[name])
            for code in _PIECES:
                _PIECES[code] = numba.njit(cache=True, nogil=True, error_model="numpy")(_piece_for(code))
            _compiled = True
    return _compiled
