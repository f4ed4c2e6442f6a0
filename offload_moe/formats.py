"""Expert weight formats: how the tensors of a slot (or of the mapped checkpoint) become the weights an expert
computes with.

A slot holds an expert's weights as the checkpoint stores them. A plain weight is one tensor in the compute
dtype. A quantized weight is several packed tensors, its components, named ``"<param>.<component>"`` in the
slot (``"down_proj.weight"`` float8 and ``"down_proj.scale_inv"`` float32): they move as they are, so a miss
moves the packed bytes. ``ExpertFormat.weights`` wraps a weight's components in a ``QuantizedWeight``, and
``kernels.linear`` computes with one through ``kernels.quantized_linear``, the one place that picks the kernel.

The formats, each component per expert, logical weight W [out, in] (``F.linear``'s layout):

- ``fp8`` (DeepSeek-V3, Qwen3 FP8): ``weight`` float8_e4m3fn [out, in]; ``scale_inv`` float32 (or uint8
  E8M0) [parts, ceil(out_part / bm), ceil(in / bn)], one block of scales per row part: checkpoints store the
  gate and up projections apart, and blocks of 128 rows do not tile their concatenation when the expert
  width is not a multiple of 128. W[i, j] = q[i, j] * scale_inv[i // bm, j // bn] within each part.
- ``mxfp4`` (gpt-oss): ``blocks`` uint8 [out, in / 32, 16] and ``scales`` uint8 [out, in / 32].
- ``int8`` (offload_moe's own store, docs/quantization.md): ``qweight`` int8 [out, in], ``scales`` float32 [out].
- ``int4`` (offload_moe's own): ``qweight`` uint8 [out, in/2] in torch's CPU tile layout (``quant.pack_int4_tiles``),
  ``scales_and_zeros`` bfloat16 (or float32) [parts, in/G, out_part, 2], one entry per row part as FP8's scales, as
  ``torch._weight_int4pack_mm_for_cpu`` takes them: each row part is a matrix that kernel computes as it lies.
  Stored in the kernel's AVX-512 layout; slots on a CPU whose torch packs another way hold that one instead
  (``int4_layout``: the mover converts each weight as it fills a slot, ``kernels.held_format``).

Components stored per row part (``PER_PART``) lead with the part in a slot, so a slot's weight still knows its parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import quant
from .errors import ConfigError
from .values import shown

FP8 = torch.float8_e4m3fn
FP8_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)  # uint8: the "ue8m0" variant, 2**(b - 127)
MXFP4_GROUP = quant.MXFP4_GROUP
FORMAT_VERSIONS = (1,)  # the versions of offload_moe's own format (quantize.py writes them) read here
INT4_SCALE_DTYPES = (torch.float32, torch.bfloat16)
COMPONENTS = {"fp8": ("weight", "scale_inv"), "mxfp4": ("blocks", "scales"), "int8": ("qweight", "scales"),
              "int4": ("qweight", "scales_and_zeros")}
PER_PART = ("scale_inv", "scales_and_zeros")  # components a slot holds one entry per row part of


@dataclass(frozen=True)
class ExpertFormat:
    """How a checkpoint stores its experts: ``kind`` None (plain tensors), ``fp8``, ``mxfp4``, ``int8`` or ``int4``;
    ``block`` is FP8's block (rows, columns) or int4's group size (one number). ``int4_layout``: the byte layout of
    int4's ``qweight`` (``quant.Int4Layout``): files store ``AVX512``; slots may hold another
    (``kernels.held_format``)."""

    kind: str | None = None
    block: tuple[int, ...] = ()
    int4_layout: quant.Int4Layout = quant.AVX512

    @property
    def name(self) -> str:
        if self.kind == "fp8":
            return f"fp8 (blocks of {self.block[0]}x{self.block[1]})"
        if self.kind == "int4":
            return f"int4 (groups of {self.block[0]})"
        return self.kind or "dense"

    @property
    def component_names(self) -> tuple[str, ...]:
        """The components a packed weight is stored as (none for plain tensors)."""
        return COMPONENTS.get(self.kind, ())

    def components(self, rows: int, cols: int, parts: int = 1) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
        """Each component of a weight [rows, cols] stored as ``parts`` row blocks: its shape and its allowed dtypes.
        Raises ValueError (said by the caller with the file and tensor) for a width the format cannot hold."""
        if self.kind == "fp8":
            bm, bn = self.block
            return {"weight": ((rows, cols), (FP8,)),
                    "scale_inv": ((parts, -(-rows // parts // bm), -(-cols // bn)), FP8_SCALE_DTYPES)}
        if self.kind == "mxfp4":
            if cols % MXFP4_GROUP:
                raise ValueError(f"MXFP4 packs groups of {MXFP4_GROUP} values, which do not divide its {cols} columns")
            return {"blocks": ((rows, cols // MXFP4_GROUP, MXFP4_GROUP // 2), (torch.uint8,)),
                    "scales": ((rows, cols // MXFP4_GROUP), (torch.uint8,))}
        if self.kind == "int8":
            return {"qweight": ((rows, cols), (torch.int8,)), "scales": ((rows,), (torch.float32,))}
        if self.kind == "int4":
            if cols % 2:
                raise ValueError(f"int4 packs two columns a byte, and {cols} columns are odd")
            group = self.block[0]
            if group % 2 or cols % group:
                raise ValueError(f"int4 groups of {group} columns (config.json's group_size) do not divide its {cols} "
                                 "columns into even groups")
            groups = cols // group
            return {"qweight": ((rows, cols // 2), (torch.uint8,)),
                    "scales_and_zeros": ((parts, groups, rows // parts, 2), INT4_SCALE_DTYPES)}
        return {}

    def component_of(self, name: str, dtype: torch.dtype) -> tuple[str, str | None]:
        """A checkpoint tensor's name (within its experts module) -> (the tensor it is a part of, which component);
        (``name``, None) for a plain tensor."""
        if self.kind == "fp8":
            if name.endswith("weight_scale_inv"):
                return name.removesuffix("_scale_inv"), "scale_inv"
            if name.endswith("weight") and dtype == FP8:
                return name, "weight"
        elif self.kind == "mxfp4":
            for component in ("blocks", "scales"):
                if name.endswith("_" + component):
                    return name.removesuffix("_" + component), component
        elif self.kind in ("int8", "int4"):
            for component in ("qweight", "scales_and_zeros" if self.kind == "int4" else "scales"):
                if name.endswith("." + component):
                    return name.removesuffix("." + component), component
        return name, None

    def weights(self, tensors: dict) -> dict:
        """A slot's (or a mapping's) tensors -> what the expert computes with: plain tensors as they are, each
        packed weight's components as one ``QuantizedWeight``. A component may be a tuple of row blocks (a
        mapped checkpoint that stores the gate and up projections apart)."""
        if self.kind is None:
            return tensors
        out, packed = {}, {}
        for name, t in tensors.items():
            param, _, component = name.rpartition(".")  # a parameter's name may hold dots ("0.weight.qweight")
            if param and component in self.component_names:
                packed.setdefault(param, {})[component] = t
            else:
                out[name] = t
        for param, components in packed.items():
            out[param] = QuantizedWeight(self.kind, _parts(components), self.block, self.int4_layout)
        return out


DENSE = ExpertFormat()


def expert_format(quantization_config: object, where: str) -> ExpertFormat:
    """The format a config's ``quantization_config`` names (None: plain tensors); ``where`` names the config."""
    if quantization_config is None:
        return DENSE
    if not isinstance(quantization_config, dict):
        quantization_config = getattr(quantization_config, "to_dict", lambda: quantization_config)()
    method = quant_method(quantization_config, where)
    if method == "fp8":
        block = quantization_config.get("weight_block_size") or list(quant.FP8_BLOCK)
        return ExpertFormat("fp8", quant.check_fp8_block(block, f"config file {where}: quantization_config", ConfigError))
    if method == "mxfp4":
        return ExpertFormat("mxfp4")
    if method == "offload_moe":
        version = quantization_config.get("format_version")
        if type(version) is not int or version not in FORMAT_VERSIONS:
            raise ConfigError(f"config file {where}: quantization_config.format_version = {shown(version)} is not a "
                              f"version of offload_moe's format this offload_moe reads "
                              f"({', '.join(map(str, FORMAT_VERSIONS))}); a newer offload_moe wrote it, or the config "
                              "is corrupted: upgrade offload_moe, or quantize the bf16 checkpoint again")
        bits = quantization_config.get("bits")
        if bits == 8:
            return ExpertFormat("int8")
        group = quantization_config.get("group_size")
        if bits == 4 and isinstance(group, int) and not isinstance(group, bool) and group > 0:
            return ExpertFormat("int4", (group,))
        raise ConfigError(f"config file {where}: quantization_config of offload_moe needs bits 8, or bits 4 with a "
                          f"positive group_size (got bits={bits!r}, group_size={group!r}); rewrite it with offload-moe "
                          "quantize")
    raise ConfigError(f"config file {where}: quantization_config.quant_method = {method!r} is not a format offload_moe "
                      "reads (fp8, mxfp4, offload_moe)")


def quant_method(quantization_config: object, path: object) -> str:
    """The ``quant_method`` a ``quantization_config`` names (an old bitsandbytes config names none but sets
    ``load_in_4bit`` / ``load_in_8bit``); ``path`` names the config file. The one parser of it."""
    if not isinstance(quantization_config, dict):
        raise ConfigError(f"config file {path}: quantization_config = {shown(quantization_config)} must be an object "
                          "with a quant_method; the config is corrupted")
    method = quantization_config.get("quant_method")
    if method is None and (quantization_config.get("load_in_4bit") or quantization_config.get("load_in_8bit")):
        return "bitsandbytes"
    if not isinstance(method, str):
        raise ConfigError(f"config file {path}: quantization_config.quant_method = {shown(method)} must be the name "
                          "of a quantization method such as 'fp8'; the config is corrupted")
    return method


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A weight [out, in] in a packed ``kind``, as consecutive blocks of rows (``parts``), each its components;
    int4's bytes in ``int4_layout``."""

    kind: str
    parts: tuple[dict[str, torch.Tensor], ...]
    block: tuple[int, ...] = ()
    int4_layout: quant.Int4Layout = quant.AVX512

    @property
    def shape(self) -> tuple[int, int]:
        return sum(_rows(self.kind, p) for p in self.parts), _cols(self.kind, self.parts[0])

    def dequantize(self, out: torch.Tensor) -> torch.Tensor:
        """Write the weight into ``out`` [out, in] (any floating dtype); returns ``out``."""
        row = 0
        for part in self.parts:
            rows = _rows(self.kind, part)
            _dequantize_into(self.kind, part, self.block, out[row : row + rows], self.int4_layout)
            row += rows
        return out


def _parts(components: dict) -> tuple[dict[str, torch.Tensor], ...]:
    """Components (tensors, or tuples of row blocks) -> one dict of tensors per row block."""
    blocks = [len(c) for c in components.values() if isinstance(c, tuple)]
    per_part = {name: c for name, c in components.items() if name in PER_PART and isinstance(c, torch.Tensor)}
    in_slot = {name: c.dim() == (4 if name == "scales_and_zeros" else 3) for name, c in per_part.items()}
    n = blocks[0] if blocks else next((c.shape[0] for name, c in per_part.items() if in_slot[name]), 1)
    split = {}
    for name, c in components.items():
        if isinstance(c, tuple):
            split[name] = c
        elif name in per_part:
            split[name] = tuple(c.unbind(0)) if in_slot[name] else (c,)
        else:
            split[name] = c.chunk(n, dim=0)
    return tuple({name: split[name][i] for name in components} for i in range(n))


def _rows(kind: str, part: dict[str, torch.Tensor]) -> int:
    return part["weight" if kind == "fp8" else "blocks" if kind == "mxfp4" else "qweight"].shape[0]


def _cols(kind: str, part: dict[str, torch.Tensor]) -> int:
    if kind == "fp8":
        return part["weight"].shape[1]
    if kind == "mxfp4":
        return part["blocks"].shape[1] * MXFP4_GROUP
    return part["qweight"].shape[1] * (2 if kind == "int4" else 1)


def _dequantize_into(kind: str, part: dict[str, torch.Tensor], block: tuple[int, ...], out: torch.Tensor,
                     int4_layout: quant.Int4Layout) -> None:
    if kind == "fp8":
        quant.dequantize_fp8_blocks(part["weight"], part["scale_inv"], block, out.dtype, out=out)
    elif kind == "mxfp4":
        quant.dequantize_mxfp4(part["blocks"], part["scales"], out.dtype, out=out)
    elif kind == "int8":
        quant.dequantize_int8(part["qweight"], part["scales"], out.dtype, out=out)
    else:
        quant.dequantize_int4(part["qweight"], part["scales_and_zeros"], out.dtype, out=out, layout=int4_layout)


def dequantize_dense(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, ...], name: str,
                     file: object) -> torch.Tensor:
    """A dense (non-expert) block-FP8 weight and its scales -> the weight in float32, as transformers dequantizes
    it at load on the CPU (then cast to the model's dtype); a scale of the wrong shape is refused naming
    ``file`` and ``name``."""
    return quant.dequantize_fp8_blocks(weight, scale_inv, block, torch.float32, name=f"{file}: {name}")
