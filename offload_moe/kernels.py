"""Computing one expert from its tensors, wherever they are held.

The experts stand-in hands each expert's tensors to a kernel: a slot's views, or views of the mapped
checkpoint, where a weight may come as ``RowBlocks`` (a gate and an up projection stored apart) or as a
``formats.QuantizedWeight`` (packed: FP8, MXFP4, int8, int4), which ``quantized_linear`` computes with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .formats import QuantizedWeight


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


def linear(x: torch.Tensor, weight: torch.Tensor | RowBlocks | QuantizedWeight, bias: torch.Tensor | RowBlocks | None,
           scratch: "Scratch | None" = None) -> torch.Tensor:
    """``F.linear`` for a weight that may be split into row blocks or packed (dequantized into ``scratch``)."""
    if isinstance(bias, RowBlocks):
        bias = bias.joined()
    if isinstance(weight, QuantizedWeight):
        return quantized_linear(x, weight, bias, scratch)
    if isinstance(weight, RowBlocks):
        y = torch.cat([F.linear(x, w) for w in weight.blocks], dim=-1)
        return y + bias if bias is not None else y
    return F.linear(x, weight, bias)


class Scratch:
    """One buffer the model's layers share for their dequantized weights, grown to the largest one asked for.

    Safe to share: layers run one at a time (under the cache's lock); on the CPU each matmul ends before the
    next weight is written; on CUDA the writes and matmuls are ordered on the compute stream. ``attach`` makes
    one for the model and hands it to every stand-in's ``ExpertMLP``.
    """

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def take(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = shape[0] * shape[1]
        b = self.buffer
        if b is None or b.numel() < n or b.dtype != dtype or b.device != device:
            b = self.buffer = torch.empty(n, dtype=dtype, device=device)
        return b[:n].view(shape)


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None,
                     scratch: Scratch | None) -> torch.Tensor:
    """``F.linear`` with a packed weight: the one place that picks the kernel.

    On the CPU, int8 and int4 go to torch's weight-only kernels, which read the packed bytes as they lie (a
    slot's, or the mapped file's with ``io="mmap"``): ``torch._weight_int8pack_mm`` and
    ``torch._weight_int4pack_mm_for_cpu`` took 57 and 60-67 ms per Mixtral expert where dequantizing first took
    363 and 1,100-1,500 ms (BENCHMARKS.md, "Expert kernels on CPU"). Everything else (FP8, MXFP4; CUDA; an int4
    weight the kernel cannot take) is dequantized into ``scratch`` (the model's one), then the usual matmul.
    """
    if x.device.type == "cpu" and x.dtype in PACKED_DTYPES and _packed_kernel_fits(weight):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # the kernels take [tokens, in]
        ys = [_packed_matmul(x2, weight.kind, part, weight.block) for part in weight.parts]
        y = (ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)).view(*x.shape[:-1], -1)
        return y + bias if bias is not None else y
    scratch = scratch if scratch is not None else Scratch()
    dense = weight.dequantize(scratch.take(weight.shape, x.dtype, x.device))
    return F.linear(x, dense, bias)


PACKED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # activations torch's CPU int8/int4 kernels take
INT4_KERNEL_GROUPS = (32, 64, 128, 256)
# The int4 kernel's layout is the AVX-512 one only when torch runs its AVX-512 code (ATEN_CPU_CAPABILITY may lower it)
INT4_KERNEL_LAYOUT = torch.backends.cpu.get_cpu_capability() == "AVX512"


def _packed_kernel_fits(weight: QuantizedWeight) -> bool:
    if weight.kind == "int8":
        return all(p["qweight"].is_contiguous() for p in weight.parts)
    if weight.kind == "int4":
        return (INT4_KERNEL_LAYOUT and weight.block[0] in INT4_KERNEL_GROUPS
                and all(p["qweight"].shape[0] % 16 == 0 and p["qweight"].is_contiguous() for p in weight.parts))
    return False


def _packed_matmul(x: torch.Tensor, kind: str, part: dict[str, torch.Tensor], block: tuple[int, ...]) -> torch.Tensor:
    """x [T, in] @ one row part's packed weight.T -> [T, rows], with torch's CPU weight-only kernels; their scales
    come in x's dtype (a cast of one value a row, or a group's two: small)."""
    if kind == "int8":
        return torch._weight_int8pack_mm(x, part["qweight"], part["scales"].to(x.dtype))
    scales_and_zeros = part["scales_and_zeros"].to(x.dtype).contiguous()  # [in/G, rows, 2]
    return torch._weight_int4pack_mm_for_cpu(x, part["qweight"], block[0], scales_and_zeros)


class ExpertMLP:
    """One routed expert as transformers' experts modules compute it: the first projection (``gate_up_proj``,
    or ``up_proj`` without a gate), the gate (or the activation), ``down_proj``, then a post-expert norm if any.

    ``kernel(x [n, H], tensors) -> [n, H]``. Weights are [out, in] (maybe ``RowBlocks``), or [in, out] with
    ``transposed`` (GPT-OSS); biases are optional (``<name>_bias``). ``activation`` is the module's gate
    function (its clamped SwiGLU reads alpha and limit from the module) or its ``act_fn``. ``scratch`` is
    where packed weights are dequantized: the model's one, shared by its layers (``attach`` sets it).
    """

    def __init__(self, *, gated: bool, transposed: bool, activation: Callable[[torch.Tensor], torch.Tensor],
                 post_norm: Callable[[torch.Tensor], torch.Tensor] | None = None, scratch: Scratch | None = None):
        self.first = "gate_up_proj" if gated else "up_proj"
        self.transposed = transposed
        self.activation = activation
        self.post_norm = post_norm
        self.scratch = scratch if scratch is not None else Scratch()  # where packed weights are dequantized

    def __call__(self, x: torch.Tensor, w: dict) -> torch.Tensor:
        h = self.activation(self._project(x, w, self.first))
        y = self._project(h, w, "down_proj")
        return self.post_norm(y) if self.post_norm is not None else y

    def _project(self, x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
        weight, bias = w[name], w.get(name + "_bias")
        if self.transposed and isinstance(weight, torch.Tensor):  # a plain weight [in, out], never in row blocks
            y = x @ weight
            return y + bias if bias is not None else y
        return linear(x, weight, bias, self.scratch)  # weight [out, in], maybe as row blocks or packed
