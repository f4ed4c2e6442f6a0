"""A model folder's ``config.json``: read as untrusted data, its values checked before anything is built.

transformers builds whatever ``config.json`` describes. A typo or a hostile file (``vocab_size`` of
10**12, ``num_experts_per_tok`` of 0, ``dtype: "banana"``) would crash deep in torch or ask for
terabytes, and an ``auto_map`` with an unknown ``model_type`` would run the folder's own Python
code. Here the file is read strictly, each size must be a positive whole number, and each size is
bounded by what the checkpoint files can hold: no checkpoint stores a weight in less than one bit,
so a config whose tensors need more than 8 weights per checkpoint byte does not describe it.

A ``quantization_config`` names how the weights are packed. Only the methods in ``QUANT_METHODS`` are read;
any other is refused before anything is built, since reading packed bytes as plain weights gives wrong
output without an error (a block-FP8 checkpoint read with its scales ignored is off by 96%).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .config import shown
from .errors import ConfigError, UnsupportedModelError
from .files import read_json
from .formats import quant_method
from .safetensors_io import checkpoint_files

CONFIG_LIMIT = 16 * 2**20  # the largest real configs (long label maps) are well under 1 MiB
WEIGHTS_PER_BYTE = 8  # a weight takes at least one bit in any checkpoint
HEADER_ENTRY_BYTES = 40  # the shortest safetensors header entry: '"a":{"dtype":"F8","shape":[],"data_offsets":[0,0]}'
REMOTE_CODE_HINT = ("offload_moe runs no code from a model folder unless asked: pass trust_remote_code=True "
                    "(--trust-remote-code) only if you trust every .py file in the folder")

EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")
TOP_K = ("num_experts_per_tok", "experts_per_token", "moe_top_k")
POSITIVE = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", *EXPERT_COUNTS, *TOP_K,
)
DTYPE_KEYS = ("dtype", "torch_dtype")

# The formats whose experts offload_moe reads (offload_moe.formats), by quant_method, as the refusal names them.
QUANT_FORMATS = {"mxfp4": "MXFP4 (gpt-oss)", "fp8": "block-scaled FP8 (DeepSeek-V3, Qwen3 FP8)",
                 "offload_moe": "offload_moe's own int8 and int4 (offload-moe quantize)"}
QUANT_METHODS: frozenset[str] = frozenset(QUANT_FORMATS)
UNREAD_FORMATS = "GPTQ, AWQ, bitsandbytes and GGUF"


def read_config(folder: Path, trust_remote_code: bool = False) -> dict:
    """``folder/config.json`` as a dict: a small regular file of strict JSON, refused if it would need the
    folder's own code (``auto_map`` with a ``model_type`` transformers lacks) and that was not asked for."""
    from transformers import CONFIG_MAPPING

    path = folder / "config.json"
    data = read_json(path, "config file", ConfigError, CONFIG_LIMIT)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} holds a JSON {type(data).__name__}, not an object of settings; "
                          "it is corrupted or not a transformers config")
    model_type = data.get("model_type")
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    if not trust_remote_code and not known and "auto_map" in data:
        raise UnsupportedModelError(
            f"config file {path}: model_type {model_type!r} is not an architecture transformers knows, and the "
            f"config names Python code in the folder to build it (auto_map). {REMOTE_CODE_HINT}"
        )
    return data


def check_config(data: dict, path: Path, checkpoint_bytes: int) -> None:
    """Refuse a config whose sizes are not positive whole numbers, whose top-k is not 1..experts, whose
    dtype is not a torch floating type, whose weights are quantized in a format offload_moe does not read, or
    whose tensors could not fit in ``checkpoint_bytes``."""
    if data.get("quantization_config") is not None:
        _check_quantization(data["quantization_config"], path)
    for key in POSITIVE:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"config file {path}: {key} = {shown(value)} must be a whole number, 1 or more; "
                              "the config is corrupted")
    for key in DTYPE_KEYS:
        if data.get(key) is not None:
            _check_dtype(data[key], key, path)
    experts = next((data[k] for k in EXPERT_COUNTS if data.get(k) is not None), None)
    for key in TOP_K:
        top_k = data.get(key)
        if top_k is not None and experts is not None and top_k > experts:
            raise ConfigError(f"config file {path}: {key} = {top_k} routes each token to more experts than the "
                              f"{experts} each layer has; it must be 1..{experts}")
    _check_fits(data, path, checkpoint_bytes)


def checkpoint_size(folder: Path) -> int:
    """Bytes in the checkpoint files of ``folder`` (a file that cannot be stat'ed counts 0; the reader reports it)."""
    total = 0
    for file in checkpoint_files(folder):
        try:
            total += os.stat(file).st_size
        except OSError:
            pass
    return total


def _check_dtype(value: object, key: str, path: Path) -> None:
    dtype = getattr(torch, value, None) if isinstance(value, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"config file {path}: {key} = {shown(value)} is not a torch floating dtype; "
                          "use e.g. 'bfloat16', 'float16' or 'float32'")


def _check_quantization(quantization_config: object, path: Path) -> None:
    method = quant_method(quantization_config, path)
    if method in QUANT_METHODS:
        return
    reads = ["bf16, fp16 and fp32 checkpoints", *(QUANT_FORMATS[m] for m in sorted(QUANT_METHODS))]
    raise UnsupportedModelError(
        f"config file {path}: the weights are quantized (quantization_config.quant_method = {shown(method)}), but "
        f"offload_moe reads only {', '.join(reads)}: {UNREAD_FORMATS} are not. "
        "Load the model's bf16 or fp16 release instead"
    )


def _check_fits(data: dict, path: Path, checkpoint_bytes: int) -> None:
    """Each tensor the config implies must fit in the checkpoint at one bit per weight, and each layer's
    tensors must fit in its header."""
    expert_size = "moe_intermediate_size" if data.get("moe_intermediate_size") else "intermediate_size"
    most = checkpoint_bytes * WEIGHTS_PER_BYTE
    rules = [(("vocab_size", "hidden_size"), 1, "the embedding"),
             (("num_hidden_layers", "hidden_size"), 2, "two norms a layer")]
    rules += [((key, "hidden_size", expert_size), 2, "one layer's experts, two matrices each") for key in EXPERT_COUNTS]
    for keys, factor, what in rules:
        if data.get(keys[0]) is None:
            continue
        weights = factor * math.prod(data.get(k) or 1 for k in keys)
        if weights > most:
            sizes = " x ".join(f"{k} = {shown(data.get(k) or 1)}" for k in keys)
            raise ConfigError(
                f"config file {path}: {sizes} need {shown(weights)} weights ({what}), but the checkpoint files "
                f"hold {checkpoint_bytes:,} bytes, at most {most:,} weights even at one bit each; "
                "the config does not describe this checkpoint"
            )
    layers = data.get("num_hidden_layers") or 0
    if layers * 2 * HEADER_ENTRY_BYTES > checkpoint_bytes:
        raise ConfigError(
            f"config file {path}: num_hidden_layers = {shown(layers)} needs at least two tensors a layer (its norms), "
            f"more than {checkpoint_bytes:,} bytes of checkpoint files can even list; "
            "the config does not describe this checkpoint"
        )
