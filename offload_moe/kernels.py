"""Computing one expert from its tensors, wherever they are held.

The experts stand-in hands each expert's tensors to a kernel: a slot's views, or views of the mapped
checkpoint, where a weight may come as ``RowBlocks`` (a gate and an up projection stored apart) or as a
``formats.QuantizedWeight`` (packed: FP8, MXFP4, int8, int4), which ``quantized_linear`` computes with.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import gemv, quant
from .formats import ExpertFormat, QuantizedWeight

log = logging.getLogger(__name__)


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
        y = torch.cat([dense_linear(x, w) for w in weight.blocks], dim=-1)
        return y + bias if bias is not None else y
    return dense_linear(x, weight, bias)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 transposed: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, or ``x @ weight + bias`` for a weight stored [in, out] (``transposed``).

    bf16 on the CPU at 1 to 4 tokens goes to ``gemv.bf16_linear`` where ``gemv.use`` says it beats torch's kernel
    on this machine: torch's bf16 GEMV reads the weights at 0.4-0.7 of the read bandwidth, which bounds decode.
    """
    if gemv.use(x, weight, transposed=transposed):
        return gemv.bf16_linear(x, weight, bias, transposed=transposed)
    if transposed:
        y = x @ weight
        return y + bias if bias is not None else y
    return F.linear(x, weight, bias)


def prepare_cpu_kernels(kernels: list, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                        device: torch.device) -> None:
    """At load, for bf16 experts on the CPU: compile ``gemv``'s kernels and settle its verdicts (``gemv.choose``,
    at 1 token and at 2-4) for each 2-d tensor of ``shapes`` (an expert's, as its slots hold them), and for each half
    of a ``gate_up_proj`` [2I, H] (a mapped checkpoint's ``RowBlocks`` when gate and up are stored apart), so that
    neither the compiler nor a calibration runs in the middle of decoding. ``kernels`` are the stand-ins' ones (an
    ``ExpertMLP`` says whether its weights are stored transposed)."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not gemv.wanted():
        return
    layouts = {bool(getattr(k, "transposed", False)) for k in kernels} or {False}
    found = {(tuple(s), t) for s in shapes.values() if len(s) == 2 for t in layouts}
    found |= {((s[0] // 2, s[1]), False) for n, s in shapes.items() if n == "gate_up_proj" and False in layouts}
    _settle(found)


def _settle(found: set[tuple[tuple[int, ...], bool]]) -> None:
    """Settle ``gemv``'s verdicts for these (shape, transposed) weights at 1 token and at 2-4, and compile its
    kernels if any verdict uses them (loading numba's compiled code costs a second or two); in ``on`` mode every
    fitting weight uses them: compiled, nothing timed."""
    if gemv.mode() == "on":
        gemv.compile_kernels()
        return
    chosen = [gemv.choose(shape, transposed=transposed, tokens=tokens)
              for shape, transposed in sorted(found) for tokens in (1, gemv.MAX_TOKENS)]
    if any(chosen):
        gemv.compile_kernels()


def route_dense_linears(model: nn.Module, *, skip: Sequence[nn.Module], device: torch.device) -> Callable[[], None]:
    """Make the model's dense ``nn.Linear`` layers (attention projections, shared experts, dense MLPs, ``lm_head``)
    compute through ``dense_linear``, so bf16 on the CPU at 1-4 tokens may take ``gemv.bf16_linear`` as the experts
    do: torch's bf16 GEMV reads their weights at about half the bandwidth. Returns what undoes it.

    Only modules of exactly ``nn.Linear`` (not a subclass: a quantized or otherwise changed layer computes its own
    way) with a contiguous bf16 CPU weight, outside the modules of ``skip`` (the experts' stand-ins) and without a
    ``forward`` of their own already (an accelerate hook's, say), and only where ``device`` (the experts') is the
    CPU and ``gemv.wanted()``. Their verdicts are settled here (``gemv.choose``), so no calibration runs mid-decode.

    Each module gets an instance-level ``forward`` rather than being swapped for another module: the model's tree,
    its module types, ``state_dict``, parameters and hooks stay as they are (``nn.Module.__call__`` runs the hooks
    around whatever ``forward`` is), and undoing it is removing one attribute. A bound method, like accelerate's
    hooks: a deep copy of the model rebinds it to the copy. Each call still checks what ``gemv.use`` checks (dtype,
    1-4 tokens, shape), so prefill, other dtypes and a model moved elsewhere keep torch's kernel; with gradients
    enabled torch's computes (``bf16_linear`` has no backward). After the undo, a forward that something else has
    since wrapped (and so cannot be removed) hands every call to ``nn.Linear``'s own."""
    if device.type != "cpu" or not gemv.wanted():
        return _nothing
    inside = {id(m) for s in skip for m in s.modules()}
    linears = [m for m in model.modules() if type(m) is nn.Linear and id(m) not in inside
               and "forward" not in vars(m) and _bf16_cpu(m.weight)]
    if not linears:
        return _nothing
    _settle({(tuple(m.weight.shape), False) for m in linears})
    active = [True]  # emptied by the undo

    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if not active or torch.is_grad_enabled():
            return type(self).forward(self, x)
        bias = self.bias.detach() if self.bias is not None else None
        return dense_linear(x, self.weight.detach(), bias)  # detached: gemv.fits takes no weight that needs grad

    installed = []
    for m in linears:
        m.forward = method = types.MethodType(forward, m)
        installed.append((m, method))

    def undo() -> None:
        active.clear()
        for m, method in installed:
            if vars(m).get("forward") is method:
                del m.forward

    return undo


def _bf16_cpu(weight: object) -> bool:
    return (isinstance(weight, torch.Tensor) and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and weight.dim() == 2 and weight.is_contiguous())


def _nothing() -> None:
    pass


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
    363 and 1,100-1,500 ms (BENCHMARKS.md, "Expert kernels on CPU"). int4 bytes must be in the layout this
    torch's kernel reads (``int4_kernel_layout``): files hold AVX-512's, and slots on other CPUs the converted one
    (``held_format``). Everything else (FP8, MXFP4; CUDA; an int4 weight the kernel cannot take, or in another
    layout) is dequantized into ``scratch`` (the model's one), then the usual matmul.
    """
    scratch = scratch if scratch is not None else Scratch()
    if x.device.type == "cpu" and x.dtype in PACKED_DTYPES and _packed_kernel_fits(weight):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # the kernels take [tokens, in]
        ys = [_packed_matmul(x2, weight.kind, _aligned(part, weight.kind, scratch), weight.block) for part in weight.parts]
        y = (ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)).view(*x.shape[:-1], -1)
        return y + bias if bias is not None else y
    dense = weight.dequantize(scratch.take(weight.shape, x.dtype, x.device))
    return F.linear(x, dense, bias)


PACKED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # activations torch's CPU int8/int4 kernels take
INT4_KERNEL_ROWS = 16  # the kernel takes row counts (of each row part) that are multiples of this
_PROBE_ROWS = 112  # a tile of 64 and a last one of 48, or three of 32 and one of 16: tells the known layouts apart


@functools.cache
def int4_kernel_layout() -> quant.Int4Layout | None:
    """The byte layout torch's CPU int4 kernel reads in this process, found once from torch itself: codes packed by
    ``torch._convert_weight_to_int4pack_for_cpu``, compared with each layout offload_moe knows (``quant.INT4_LAYOUTS``).
    It follows the CPU code torch runs (AVX-512, AVX2 or plain; ``ATEN_CPU_CAPABILITY`` may lower it), fixed at
    torch's import. None where torch packs some other way or lacks the kernel: int4 is then dequantized to compute."""
    codes = torch.randint(0, 16, (_PROBE_ROWS, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        theirs = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    except (AttributeError, RuntimeError) as e:  # a torch without the kernel, or built without it
        log.info("int4 experts are dequantized to compute: torch's CPU int4 packing is unavailable (%s)", e)
        return None
    ours = codes.to(torch.uint8)
    for layout in quant.INT4_LAYOUTS:
        if theirs.shape == (_PROBE_ROWS, 32) and torch.equal(theirs, quant.pack_int4_tiles(ours, layout)):
            return layout
    log.info("int4 experts are dequantized to compute: torch %s packs int4 in a layout offload_moe does not know",
             torch.__version__)
    return None


def held_format(fmt: ExpertFormat, shapes: dict[str, tuple[int, ...]], device: torch.device) -> ExpertFormat:
    """The format slots on ``device`` hold experts of ``fmt`` in, their slot tensors being ``shapes``: ``fmt``, but
    for int4 on a CPU whose torch kernel reads another byte layout than the stored AVX-512 one (AVX2, plain) and
    takes every weight (``quant.INT4_KERNEL_GROUPS``, row parts of a multiple of ``INT4_KERNEL_ROWS``): then that
    layout. The mover rearranges each weight's bytes into it as it fills a slot (``quant.convert_int4_tiles``, once a
    fill, where dequantizing would cost every call), so hits run the kernel from the slot as it lies."""
    if fmt.kind != "int4" or device.type != "cpu":
        return fmt
    layout = int4_kernel_layout()
    parts = [shape[-2] for name, shape in shapes.items() if name.endswith(".scales_and_zeros")]  # [parts, G, rows, 2]
    if (layout is None or layout == fmt.int4_layout or fmt.block[0] not in quant.INT4_KERNEL_GROUPS
            or any(rows % INT4_KERNEL_ROWS for rows in parts)):
        return fmt
    return replace(fmt, int4_layout=layout)


PACKED_ALIGN = 64  # bytes: torch's CPU int8 kernel reads its weight with aligned vector loads (see _aligned)


def _aligned(part: dict[str, torch.Tensor], kind: str, scratch: Scratch) -> dict[str, torch.Tensor]:
    """``part`` with an int8 weight that does not start on a ``PACKED_ALIGN`` boundary copied into ``scratch``.

    ``torch._weight_int8pack_mm`` crashes the process (SIGSEGV, torch 2.13 on AVX-512) on a weight 8 bytes past a
    16-byte boundary once it gets 4 tokens or more: it assumes the alignment torch's allocator gives. Slots have it;
    a view of a mapped file has the file's (safetensors promises 8 bytes; ``write_safetensors`` gives 64, so files
    offload_moe wrote map in place). A copy costs a pass over the weight; a crash costs the process."""
    q = part["qweight"]
    if kind != "int8" or q.data_ptr() % PACKED_ALIGN == 0:
        return part
    staged = scratch.take(tuple(q.shape), q.dtype, q.device)
    staged.copy_(q)
    return {**part, "qweight": staged}


def _packed_kernel_fits(weight: QuantizedWeight) -> bool:
    if weight.kind == "int8":
        return all(p["qweight"].is_contiguous() for p in weight.parts)
    if weight.kind == "int4":
        return (weight.int4_layout == int4_kernel_layout() and weight.block[0] in quant.INT4_KERNEL_GROUPS
                and all(p["qweight"].shape[0] % INT4_KERNEL_ROWS == 0 and p["qweight"].is_contiguous()
                        for p in weight.parts))
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
                 post_norm: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.first = "gate_up_proj" if gated else "up_proj"
        self.transposed = transposed
        self.activation = activation
        self.post_norm = post_norm
        self.scratch = Scratch()  # where packed weights are dequantized; attach puts the model's one here

    def __call__(self, x: torch.Tensor, w: dict) -> torch.Tensor:
        h = self.activation(self._project(x, w, self.first))
        y = self._project(h, w, "down_proj")
        return self.post_norm(y) if self.post_norm is not None else y

    def _project(self, x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
        weight, bias = w[name], w.get(name + "_bias")
        if self.transposed and isinstance(weight, torch.Tensor):  # a plain weight [in, out], never in row blocks
            return dense_linear(x, weight, bias, transposed=True)
        return linear(x, weight, bias, self.scratch)  # weight [out, in], maybe as row blocks or packed
