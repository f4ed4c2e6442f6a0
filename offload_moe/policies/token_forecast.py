"""Token forecast: ``forecast``, told which token each decoding step runs, expects it to route as it did before.

Where a model's router acts mostly on the token at hand, a token routes much as it did the last times it came,
and the token after it much as the tokens that followed it did. So the policy remembers, by token id, the
experts each layer chose for that token (``width`` most often chosen per layer) and for the token that came
next (``follow_width``). While a step runs, the experts its token is expected to need at the layers still to
come, and those the next token is expected to need at the layers already done, count as certain to be needed
at their layer's next visit (chance 1 in ``forecast``'s ranking, as a prefetched expert has), so they are
the last to go. Nothing is loaded on the strength of a guess: it only changes what is evicted.

The cache tells it each step's tokens through ``on_tokens``: the runtime from the model's ``input_ids``, a
replay from the trace's token ids. It learns and guesses on steps of one token (the decoding of one
sequence); a prompt's step only names the token the next one follows, and a step of several rows, or one
whose tokens are not known (a trace without token ids), runs as plain ``forecast``.

The memory is bounded: each table forgets its least recently seen tokens beyond ``MAX_ENTRIES`` entries.
On the bundled model's held-out trace, at 12.5% and 25% of the experts, it reaches 0.869 and 0.900 of
Belady's hit rate where ``forecast`` reaches 0.815 and 0.890 (BENCHMARKS.md).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from ..errors import PolicyError
from .base import Key
from .forecast import HALF_LIFE, Forecast

WIDTH = 3  # experts a layer expected of the step's own token
FOLLOW_WIDTH = 2  # experts a layer expected of the token after it
MAX_ENTRIES = 200_000  # (token, layer, expert) counts a table keeps, about 20 MB


class TokenForecast(Forecast):
    """``forecast`` with guesses from each token's earlier routing (see the module docstring)."""

    name = "token-forecast"

    def __init__(self, half_life: float = HALF_LIFE, width: int = WIDTH, follow_width: int = FOLLOW_WIDTH,
                 max_entries: int = MAX_ENTRIES) -> None:
        super().__init__(half_life)
        for setting, value in (("width", width), ("follow_width", follow_width), ("max_entries", max_entries)):
            if not (isinstance(value, int) and value >= 0):
                raise PolicyError(f"token-forecast: {setting}={value!r} must be a whole number, 0 or more")
        self.width, self.follow_width = width, follow_width
        self._seen = _Counts(max_entries)  # token -> the experts each layer chose for it
        self._after = _Counts(max_entries)  # token -> the experts each layer chose for the token after it
        self._token = None  # the token of the step running now, when it is a step of one token
        self._previous = None  # the token before it
        self._last = None  # the last token of the step before
        self._now: dict = {}  # layer -> experts expected of this step's token
        self._next: dict = {}  # layer -> experts expected of the next token
        self._done: set = set()  # layers this step has visited
        self._routed: dict = {}  # layer -> the experts this step's token was routed to
        self._hinted: dict = {}  # layer -> {key: its rank before the hint}

    # -- what the cache tells ------------------------------------------------
    def on_tokens(self, tokens: Sequence[int] | None) -> None:
        if self._layer is not None and self._group:
            self._routed[self._layer] = list(self._group)  # the step's last layer, still open
        if self._token is not None:
            self._seen.add(self._token, self._routed)
            if self._previous is not None:
                self._after.add(self._previous, self._routed)
        single = tokens is not None and len(tokens) == 1
        self._previous = self._last if single else None  # the token a step of one token follows
        self._token = int(tokens[0]) if single else None
        self._last = int(tokens[-1]) if tokens else None  # a prompt's last token is followed by the next step's
        self._routed, self._done = {}, set()
        self._now = self._seen.expected(self._token, self.width)
        self._next = self._after.expected(self._token, self.follow_width)
        for layer in list(self._hinted):
            self._unhint(layer)
        for layer in self._heaps:
            self._hint(layer)

    def on_access(self, key: Key) -> None:
        layer = key[0]
        if layer == self._layer:
            super().on_access(key)
            return
        before = self._layer
        if before is not None:
            self._routed[before] = list(self._group)
            self._unhint(before)  # forecast scores the visit that ends against the ranks of its own
        super().on_access(key)
        if before is not None:
            self._hint(before)
        self._done.add(layer)
        self._unhint(layer)
        self._hint(layer)

    def on_evict(self, key: Key) -> None:
        saved = self._hinted.get(key[0], {}).pop(key, None)
        if saved is not None:
            self._rank[key] = saved
        super().on_evict(key)

    # -- the guesses, as ranks ---------------------------------------------------
    def _hint(self, layer) -> None:
        """Rank the resident experts expected at ``layer``'s next visit as certain: this token's own at a layer
        still to come, the next token's at one done."""
        expected = (self._next if layer in self._done else self._now).get(layer)
        heap = self._heaps.get(layer)
        if not expected or heap is None:
            return
        hinted = self._hinted.setdefault(layer, {})
        for expert in expected:
            key = (layer, expert)
            if key in heap.resident and key not in hinted:
                saved = self._rank[key]
                hinted[key] = saved
                self._rank[key] = (1.0, saved[1])
                heap.push(key)

    def _unhint(self, layer) -> None:
        heap = self._heaps.get(layer)
        for key, saved in self._hinted.pop(layer, {}).items():
            self._rank[key] = saved
            if heap is not None and key in heap.resident:
                heap.push(key)


class _Counts:
    """token -> layer -> expert -> times chosen, forgetting the least recently seen tokens beyond ``max_entries``."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.tokens: OrderedDict = OrderedDict()
        self.entries = 0

    def add(self, token: int, routed: dict) -> None:
        layers = self.tokens.pop(token, None)
        if layers is None:
            layers = {}
        self.tokens[token] = layers  # now the most recently seen
        for layer, experts in routed.items():
            counts = layers.setdefault(layer, {})
            for expert in experts:
                if expert not in counts:
                    self.entries += 1
                counts[expert] = counts.get(expert, 0) + 1
        while self.entries > self.max_entries and self.tokens:
            _, gone = self.tokens.popitem(last=False)
            self.entries -= sum(len(counts) for counts in gone.values())

    def expected(self, token: int | None, width: int) -> dict:
        """layer -> the ``width`` experts most often chosen (the lower id first among equals)."""
        layers = self.tokens.get(token) if token is not None else None
        if not layers or width == 0:
            return {}
        return {layer: sorted(counts, key=lambda e: (-counts[e], e))[:width] for layer, counts in layers.items()}
