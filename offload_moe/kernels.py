"""Computing one expert from its tensors, wherever they are held.

The experts stand-in hands each expert's tensors to a kernel: a slot's views, or views of the mapped
checkpoint, where a weight may come as ``RowBlocks`` (a gate and an up projection stored apart). Kernels
for quantized formats belong here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RowBlocks:
    """A weight [out, in] (or a bias [out]) held as consecutive blocks of rows in different places.

    The mapped form of ``gate_up_proj`` in checkpoints that store the gate and up projections
    as separate tensors: ``linear`` computes each block and joins the outputs, so the
    weight is never assembled in memory.
    """

    blocks: tuple[torch.Tensor, ...]

    def joined(self) -> torch.Tensor:
        return torch.cat(self.blocks)


def linear(x: torch.Tensor, weight: torch.Tensor | RowBlocks, bias: torch.Tensor | RowBlocks | None) -> torch.Tensor:
    """``F.linear`` for a weight that may be split into row blocks."""
    if isinstance(bias, RowBlocks):
        bias = bias.joined()
    if isinstance(weight, RowBlocks):
        y = torch.cat([F.linear(x, w) for w in weight.blocks], dim=-1)
        return y + bias if bias is not None else y
    return F.linear(x, weight, bias)


class ExpertMLP:
    """One routed expert as transformers' experts modules compute it: the first projection (``gate_up_proj``,
    or ``up_proj`` without a gate), the gate (or the activation), ``down_proj``, then a post-expert norm if any.

    ``kernel(x [n, H], tensors) -> [n, H]``. Weights are [out, in] (maybe ``RowBlocks``), or [in, out] with
    ``transposed`` (GPT-OSS); biases are optional (``<name>_bias``). ``activation`` is the module's gate
    function (its clamped SwiGLU reads alpha and limit from the module) or its ``act_fn``.
    """

    def __init__(self, *, gated: bool, transposed: bool, activation: Callable[[torch.Tensor], torch.Tensor],
                 post_norm: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.first = "gate_up_proj" if gated else "up_proj"
        self.transposed = transposed
        self.activation = activation
        self.post_norm = post_norm

    def __call__(self, x: torch.Tensor, w: dict) -> torch.Tensor:
        h = self.activation(self._project(x, w, self.first))
        y = self._project(h, w, "down_proj")
        return self.post_norm(y) if self.post_norm is not None else y

    def _project(self, x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
        weight, bias = w[name], w.get(name + "_bias")
        if self.transposed:  # weight [in, out], never split into row blocks
            y = x @ weight
            return y + bias if bias is not None else y
        return linear(x, weight, bias)  # weight [out, in], maybe as row blocks
