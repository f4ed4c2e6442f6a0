"""Summaries of a trace: how evenly the experts are used, and how often a token repeats its predecessor's."""

from __future__ import annotations

import math

import torch

from ..errors import TraceError
from .format import Trace


def expert_usage_entropy(trace: Trace) -> list[float]:
    """Per layer, the entropy in bits of how often each expert is chosen (any of the top-k).

    ``log2(num_experts)`` means every expert is used equally; 0 means one expert takes everything.
    """
    out = []
    for layer in range(trace.experts.shape[1]):
        counts = torch.bincount(trace.experts[:, layer].reshape(-1).long(), minlength=trace.num_experts).double()
        p = counts[counts > 0] / counts.sum()
        out.append(float(-(p * p.log2()).sum()))
    return out


def repeat_rate(trace: Trace, *, first_choice: bool = True) -> list[float]:
    """Per layer, the share of consecutive token pairs (within a sequence) that repeat an expert.

    ``first_choice``: token t+1's top-1 expert equals token t's top-1 (Mixtral paper, Table 5,
    "first choice"). Otherwise: the two tokens' top-k sets share an expert ("first or second choice").
    """
    same, pairs = torch.zeros(trace.experts.shape[1], dtype=torch.float64), 0
    for start, end in trace.sequences():
        a, b = trace.experts[start:end - 1].long(), trace.experts[start + 1:end].long()  # [P, L, k]
        if len(a) == 0:
            continue
        if first_choice:
            hit = a[..., 0] == b[..., 0]  # [P, L]
        else:
            hit = (a.unsqueeze(-1) == b.unsqueeze(-2)).flatten(-2).any(-1)  # [P, L]
        same += hit.double().sum(0)
        pairs += len(a)
    return (same / pairs).tolist() if pairs else [0.0] * trace.experts.shape[1]


def random_repeat_rate(num_experts: int, top_k: int, *, first_choice: bool = True) -> float:
    """``repeat_rate`` of a router choosing uniformly at random: 1/E for the first choice,
    else the chance two random top-k sets overlap."""
    if not 1 <= top_k <= num_experts:
        raise TraceError(f"num_experts={num_experts}, top_k={top_k}: a router chooses 1 to num_experts experts")
    if first_choice:
        return 1 / num_experts
    return 1 - math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)
