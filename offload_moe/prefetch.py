"""Prefetch: predict the experts of the next layers from what the router sees now, and start moving them.

A predictor names, for each token, the experts it expects at the next ``depth``
MoE layers. Predictors are pluggable like eviction policies:

- ``gate``: apply layer l+1's router to the hidden states entering layer l's
  experts and take its top-k plus a margin (the mixtral-offloading method);
- ``transition``: estimate P(experts at l+1 | experts at l) online from the routing
  observed so far, in the spirit of MoE-Infinity's activation matrices;
- ``hybrid``: both, their guesses pooled (an expert both name ranks first). They miss
  different experts: on the bundled model gate alone names 77% of the next layer's experts
  with margin 1, transition 76%, the two together 91% (``benchmarks/prefetch_recall.py``);
- ``none``.

``Prefetcher`` asks the predictor, scores its past predictions against the routing
that really came, and names the predicted loads, which the layer's lease on the cache starts. A prediction
costs no extra host-device synchronisation: device-side predictions travel to the
host with the layer's own routing, in the one copy per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .values import PREDICTORS, check_prefetch_reach


class Predictor:
    """Base class: override ``predict_device`` (runs before the layer's sync) or ``predict_host`` (after it)."""

    name = "none"

    def predict_device(self, pos: int, hidden: torch.Tensor) -> dict[int, torch.Tensor]:
        """Predicted expert ids [T, m] on the device, by MoE-layer position, from the hidden states at ``pos``."""
        return {}

    def predict_host(self, pos: int, routing: torch.Tensor) -> dict[int, torch.Tensor]:
        """Predicted expert ids [T, m] on the host, by MoE-layer position, from the routing [T, k] at ``pos``."""
        return {}

    def observe(self, pos: int, routing: torch.Tensor) -> None:
        """The routing [T, k] that really came at ``pos`` (CPU tensor)."""


class GatePredictor(Predictor):
    """Layer l+d's router applied to the hidden states entering layer l's experts: its top-(k + margin)."""

    name = "gate"

    def __init__(self, routers: Sequence[nn.Module | None], top_k: int, margin: int = 1, depth: int = 1):
        self.routers = list(routers)
        self.width = top_k + margin
        self.depth = depth

    def predict_device(self, pos: int, hidden: torch.Tensor) -> dict[int, torch.Tensor]:
        out = {}
        for ahead in range(pos + 1, min(pos + 1 + self.depth, len(self.routers))):
            router = self.routers[ahead]
            if router is None:
                continue
            scores = F.linear(hidden.to(router.weight.dtype), router.weight, getattr(router, "bias", None))  # [T, E]
            bias = getattr(router, "e_score_correction_bias", None)
            if bias is not None:  # DeepSeek-V3 style: selection on sigmoid scores plus the correction bias
                scores = scores.sigmoid() + bias
            out[ahead] = scores.topk(min(self.width, scores.shape[-1]), dim=-1).indices
        return out


class TransitionPredictor(Predictor):
    """Counts, per pair of consecutive MoE layers, how often expert i at l is followed by expert j at l+1.

    Plain numpy on the host: it runs once per layer on a handful of tokens, where small
    array operations cost microseconds rather than the tens a tensor operation costs.
    """

    name = "transition"

    def __init__(self, layers: int, num_experts: int, top_k: int, margin: int = 1, depth: int = 1):
        self.counts = np.zeros((max(layers - 1, 0), num_experts, num_experts), dtype=np.float32)  # [L-1, E, E]
        self.width = top_k + margin
        self.depth = depth
        self._last: tuple[int, np.ndarray] | None = None

    def observe(self, pos: int, routing: torch.Tensor | np.ndarray) -> None:
        now = np.asarray(routing)
        last = self._last
        if last is not None and last[0] == pos - 1 and last[1].shape[0] == now.shape[0]:
            prev, k = last[1], now.shape[1]
            rows = np.repeat(prev, k, axis=1).reshape(-1)  # every (previous, current) pair of each token
            cols = np.tile(now, (1, prev.shape[1])).reshape(-1)
            np.add.at(self.counts[pos - 1], (rows, cols), 1.0)
        self._last = (pos, now)

    def predict_host(self, pos: int, routing: torch.Tensor | np.ndarray) -> dict[int, torch.Tensor]:
        out = {}
        dist = None  # [T, E], a distribution over the experts at the layer ahead
        routing = np.asarray(routing)
        for ahead in range(pos + 1, min(pos + 1 + self.depth, self.counts.shape[0] + 1)):
            step = self.counts[ahead - 1]
            if dist is None:
                dist = _transition_scores(step[routing])
            else:
                dist = dist @ (step / np.maximum(step.sum(-1, keepdims=True), 1))
            reach = int((dist > 0).sum(-1).max())
            if reach == 0:
                break
            width = min(self.width, reach)
            out[ahead] = torch.from_numpy(np.argsort(-dist, axis=-1, kind="stable")[:, :width].copy())
        return out


def _transition_scores(rows: np.ndarray) -> np.ndarray:
    """Scores [..., E] of the experts one layer ahead from the count rows [..., k, E] of a token's k experts.

    Each row is normalised to a distribution (an unseen expert's row stays zero) and the k are summed.
    """
    return (rows / np.maximum(rows.sum(-1, keepdims=True), 1)).sum(-2)


class HybridPredictor(Predictor):
    """``gate`` and ``transition`` together: the router's guess from the hidden states and the learned transitions."""

    name = "hybrid"

    def __init__(self, gate: GatePredictor, transition: TransitionPredictor):
        self.gate, self.transition = gate, transition

    def predict_device(self, pos: int, hidden: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.gate.predict_device(pos, hidden)

    def predict_host(self, pos: int, routing: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.transition.predict_host(pos, routing)

    def observe(self, pos: int, routing: torch.Tensor) -> None:
        self.transition.observe(pos, routing)


@dataclass
class PredictionScore:
    """How well predictions one layer ahead matched the routing that came."""

    predicted: int = 0  # distinct experts predicted, summed over layer calls
    needed: int = 0  # distinct experts needed
    correct: int = 0  # needed and predicted

    @property
    def recall(self) -> float:
        return self.correct / self.needed if self.needed else 0.0

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0


class Prefetcher:
    """Runs a predictor at every MoE layer, scores it, and names the loads for the layers ahead.

    It never calls the cache during a layer: the layer hands what ``after_routing`` names to its lease
    (``Lease.prefetch``). ``cache`` is there for predictors that prefetch between layers (``bind``).
    """

    def __init__(self, predictor: Predictor, layers: Sequence[int], cache=None):
        self.predictor = predictor
        self.layers = list(layers)  # model layer number of each MoE position
        self.cache = cache
        self.score = PredictionScore()
        self._expected: dict[int, set[int]] = {}  # pos -> experts predicted one layer ahead

    def predict_device(self, pos: int, hidden: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.predictor.predict_device(pos, hidden)

    def after_routing(self, pos: int, routing: torch.Tensor,
                      device_predictions: dict[int, torch.Tensor]) -> list[tuple[int, list[int]]]:
        """Score the prediction made for ``pos``, learn from its routing, and return the loads to start for the
        layers ahead: ``(layer, experts best first)``, nearest layer first."""
        needed = set(routing.unique().tolist())
        expected = self._expected.pop(pos, None)
        if expected is not None:
            self.score.needed += len(needed)
            self.score.predicted += len(expected)
            self.score.correct += len(needed & expected)
        self.predictor.observe(pos, routing)
        predictions = {ahead: [ids] for ahead, ids in device_predictions.items()}
        for ahead, ids in self.predictor.predict_host(pos, routing).items():
            predictions.setdefault(ahead, []).append(ids)
        loads = []
        for ahead in sorted(predictions):
            experts = _pooled(predictions[ahead])
            if ahead == pos + 1:
                self._expected[ahead] = set(experts)
            loads.append((self.layers[ahead], experts))
        return loads

    def reset(self) -> None:
        self.score = PredictionScore()


def _ranked(ids: torch.Tensor | np.ndarray) -> list[int]:
    """Distinct experts of ``ids`` [T, m] (each row best first), most strongly predicted first."""
    ids = np.asarray(ids)
    rows, width = ids.shape
    votes = np.bincount(ids.reshape(-1), weights=np.tile(np.arange(width, 0, -1.0), rows))
    ranked = np.argsort(-votes, kind="stable")
    return ranked[: int((votes > 0).sum())].tolist()


def _pooled(parts: list[torch.Tensor | np.ndarray]) -> list[int]:
    """``_ranked`` of several predictions [T, m_i] for the same layer, side by side (the first counts most).

    Predictions made from different token sets (a layer that dropped tokens) are ranked one after the other.
    """
    if len(parts) == 1:
        return _ranked(parts[0])
    if len({len(p) for p in parts}) == 1:
        return _ranked(np.concatenate([np.asarray(p) for p in parts], axis=1))
    return list(dict.fromkeys(e for p in parts for e in _ranked(p)))


def pooled_row(rows: Sequence[Sequence[int]]) -> list[int]:
    """``_pooled`` of one token's predictions (lists, best first), in plain Python: what profiling replays."""
    row = [e for r in rows for e in r]
    votes: dict[int, int] = {}
    for i, expert in enumerate(row):
        votes[expert] = votes.get(expert, 0) + len(row) - i
    return sorted(votes, key=lambda e: (-votes[e], e))


def make_predictor(name: str, *, routers: Sequence[nn.Module | None], num_experts: int, top_k: int,
                   margin: int = 1, depth: int = 1) -> Predictor:
    """A predictor by name: ``none``, ``gate``, ``transition`` or ``hybrid``. ``margin`` and ``depth`` are checked as
    ``OffloadConfig`` checks ``prefetch_margin`` and ``prefetch_depth``."""
    name = (name or "none").lower()
    check_prefetch_reach(margin, depth)
    if name == "none":
        return Predictor()
    if name in ("gate", "hybrid") and all(r is None for r in routers):
        raise ConfigError(f"prefetch={name!r} needs the model's router modules, and none was found; use 'transition'")
    if name == "gate":
        return GatePredictor(routers, top_k, margin, depth)
    if name == "transition":
        return TransitionPredictor(len(routers), num_experts, top_k, margin, depth)
    if name == "hybrid":
        return HybridPredictor(GatePredictor(routers, top_k, margin, depth),
                               TransitionPredictor(len(routers), num_experts, top_k, margin, depth))
    raise ConfigError(f"prefetch={name!r} is not a predictor; use one of {', '.join(PREDICTORS)}")
