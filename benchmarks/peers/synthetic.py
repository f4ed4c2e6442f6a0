"""A synthetic Mixtral checkpoint that both offload_moe and llama.cpp's converter read.

``offload_moe.synthetic`` writes transformers 5's names (``mlp.experts.E.gate_proj``) and a config without
``architectures``. llama.cpp's ``convert_hf_to_gguf.py`` knows Mixtral by the names the hub's checkpoints
carry (``block_sparse_moe.experts.E.w1``, ``block_sparse_moe.gate``), by ``architectures``, and needs a
tokenizer. ``prepare`` makes a folder meet all three, in place; offload_moe reads the hub's names through
transformers' renaming rules, so both sides read the same file bytes.

The tokenizer is synthetic: a Llama-style BPE with byte fallback (``<unk>``, ``<s>``, ``</s>``, the 256
``<0xNN>`` byte tokens, then characters and letter pairs and triples with their merges), exactly
``vocab_size`` tokens, written with the ``tokenizers`` library. The converter takes it by its Llama-HF path
(``tokenizer.json``, no ``tokenizer.model``), which needs no sentencepiece and no pre-tokenizer hash.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import string
import struct
from pathlib import Path

# transformers 5 name -> the hub's Mixtral name
HUB_NAMES = (
    (re.compile(r"\.mlp\.experts\.(\d+)\.gate_proj\."), r".block_sparse_moe.experts.\1.w1."),
    (re.compile(r"\.mlp\.experts\.(\d+)\.down_proj\."), r".block_sparse_moe.experts.\1.w2."),
    (re.compile(r"\.mlp\.experts\.(\d+)\.up_proj\."), r".block_sparse_moe.experts.\1.w3."),
    (re.compile(r"\.mlp\.gate\."), r".block_sparse_moe.gate."),
)


def hub_name(name: str) -> str:
    """A Mixtral tensor's name as the hub's checkpoints (and llama.cpp's converter) spell it."""
    for pattern, replacement in HUB_NAMES:
        name = pattern.sub(replacement, name)
    return name


def prepare(folder: str | Path) -> Path:
    """Give the Mixtral checkpoint at ``folder`` the hub's tensor names, ``architectures`` and, if it has no
    ``tokenizer.json``, the synthetic tokenizer. Idempotent; rewrites only shards whose names change."""
    folder = Path(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "mixtral":
        raise SystemExit(f"{config_file}: model_type {config.get('model_type')!r}; the llama.cpp side by side "
                         "writes and converts Mixtral-shaped checkpoints only (--shape mixtral or mini)")
    if fused_experts(folder):
        raise SystemExit(f"{folder}: fused experts (mlp.experts.gate_up_proj); llama.cpp's converter takes "
                         "per-expert Mixtral tensors: use a checkpoint written with layout='per_expert'")
    for shard in sorted(folder.glob("*.safetensors")):
        rename_tensors(shard, hub_name)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {hub_name(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=1))
    if config.get("architectures") != ["MixtralForCausalLM"]:
        config["architectures"] = ["MixtralForCausalLM"]
        config_file.write_text(json.dumps(config, indent=2))
    if not (folder / "tokenizer.json").exists():
        write_tokenizer(folder, config["vocab_size"])
    return folder


def fused_experts(folder: Path) -> bool:
    return any(name.endswith("experts.gate_up_proj") for shard in folder.glob("*.safetensors")
               for name in _header(shard)[0])


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


def rename_tensors(path: Path, rename) -> bool:
    """Rename the tensors of one safetensors file (a new header, the data bytes copied after it); False if no
    name changes. Written beside the file and renamed over it, so a stopped run leaves the old file whole."""
    header, data_start = _header(path)
    renamed = {(k if k == "__metadata__" else rename(k)): v for k, v in header.items()}
    if renamed == header:
        return False
    text = json.dumps(renamed, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned
    tmp = path.with_name(f".{path.name}.renaming")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(struct.pack("<Q", len(text)) + text)
        src.seek(data_start)
        shutil.copyfileobj(src, dst, 64 * 2**20)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)
    return True


def tokenizer_vocab(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The synthetic tokenizer's vocabulary (exactly ``vocab_size`` tokens) and its BPE merges."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    merges: list[tuple[str, str]] = []

    def add(piece: str, merge: tuple[str, str] | None = None) -> bool:
        if len(vocab) >= vocab_size:
            return False
        if piece not in vocab:
            vocab[piece] = len(vocab)
            if merge:
                merges.append(merge)
        return True

    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    for c in "\u2581" + chars:
        add(c)
    lower = string.ascii_lowercase
    for c in chars:
        add("\u2581" + c, ("\u2581", c))
    for a, b in itertools.product(lower, repeat=2):
        add(a + b, (a, b))
    for a, b in itertools.product(lower, repeat=2):
        add("\u2581" + a + b, ("\u2581" + a, b))
    for a, b, c in itertools.product(lower, repeat=3):
        if not add(a + b + c, (a + b, c)):
            break
    for a, b, c in itertools.product(lower, repeat=3):
        if not add("\u2581" + a + b + c, ("\u2581" + a + b, c)):
            break
    n = 0
    while len(vocab) < vocab_size:  # a vocabulary larger than the pieces above: unreachable filler tokens
        add(f"<extra_{n}>")
        n += 1
    return vocab, merges


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """Write the synthetic tokenizer (``tokenizer.json``, ``tokenizer_config.json``) into ``folder``."""
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 400:
        raise SystemExit(f"vocab_size {vocab_size}: the synthetic tokenizer needs at least 400 tokens "
                         "(259 special and byte tokens, then characters)")
    vocab, merges = tokenizer_vocab(vocab_size)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
