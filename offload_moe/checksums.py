"""Checksums of every expert's bytes: a manifest made once, checked on demand.

``verify(path)`` reads each routed expert from the checkpoint and compares its
SHA-256 with the manifest. Without a manifest it writes one (atomically) beside
the model, or into ``manifest_dir`` when the model folder is read-only; the
model's own files are never written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_write
from .errors import CheckpointError, ConfigError
from .files import read_json
from .checkpoint import open_checkpoint, resolve_model_path
from .safetensors_io import short_repr
from .store import ExpertStore

MANIFEST = "offload_moe.manifest.json"
FORMAT = 1


@dataclass
class VerifyResult:
    """What ``verify`` found. ``bad`` lists (layer, expert, file) whose bytes differ from the manifest."""

    manifest: Path
    created: bool
    experts: int
    bad: list[tuple[int, int, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad


def expert_digests(store: ExpertStore, progress=None) -> dict[str, str]:
    """SHA-256 of each expert's checkpoint bytes (its pieces in index order), keyed ``"layer:expert"``."""
    digests = {}
    scratch = torch.empty(0, dtype=torch.uint8)
    for (layer, expert), pieces in sorted(store.pieces.items()):
        h = hashlib.sha256()
        for piece in pieces:
            if scratch.numel() < piece.nbytes:
                scratch = torch.empty(piece.nbytes, dtype=torch.uint8)
            buf = scratch[: piece.nbytes]
            store.read_piece(piece, buf)
            h.update(memoryview(buf.numpy()))
        digests[f"{layer}:{expert}"] = h.hexdigest()
        if progress is not None:
            progress(sum(p.nbytes for p in pieces))
    return digests


def manifest_path(folder: Path, manifest_dir: str | Path | None) -> Path:
    return Path(manifest_dir) / MANIFEST if manifest_dir is not None else folder / MANIFEST


def verify(path: str | Path, *, manifest_dir: str | Path | None = None, progress=None,
           trust_remote_code: bool = False) -> VerifyResult:
    """Check every expert's bytes against the manifest, creating the manifest on the first run.
    ``trust_remote_code`` as in ``offload_moe.load``: without it no code from the model folder runs."""
    folder = resolve_model_path(path)
    target = manifest_path(folder, manifest_dir)
    expected = read_manifest(target) if os.path.lexists(target) else None  # a bad manifest fails before the reads
    with open_checkpoint(folder, trust_remote_code=trust_remote_code) as checkpoint:
        digests = expert_digests(checkpoint.store, progress)
    store = checkpoint.store  # closed: its index still names each expert's files
    if expected is None:
        if manifest_dir is None and not os.access(folder, os.W_OK):
            raise ConfigError(
                f"{folder} is read-only, so the checksum manifest cannot go beside the model; "
                "name a folder for it (manifest_dir= / --manifest-dir)"
            )
        manifest = {"format": FORMAT, "model": str(folder), "experts": digests}
        atomic_write(target, json.dumps(manifest, indent=1, sort_keys=True).encode())
        return VerifyResult(target, True, len(digests))
    bad = []
    for key in sorted(set(expected) | set(digests), key=_expert_key):
        if expected.get(key) != digests.get(key):
            layer, expert = _expert_key(key)
            bad.append((layer, expert, store.describe(layer, expert)))
    return VerifyResult(target, False, len(digests), bad)


def read_manifest(path: Path) -> dict[str, str]:
    """The ``"layer:expert" -> SHA-256`` map of a checksum manifest, every key and digest checked."""
    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"checksum manifest {path} {why}; delete it to make a new one")

    try:
        manifest = read_json(path, "checksum manifest")
    except CheckpointError as e:
        raise CheckpointError(f"{e}; delete it to make a new one") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise refuse(f"is not a checksum manifest of format {FORMAT} (found {short_repr(manifest)})")
    experts = manifest.get("experts")
    if not isinstance(experts, dict):
        raise refuse(f"has experts {short_repr(experts)}, where an object of \"layer:expert\" to SHA-256 belongs")
    for key, digest in experts.items():
        if _KEY.fullmatch(key) is None or not isinstance(digest, str) or _DIGEST.fullmatch(digest) is None:
            raise refuse(f"has the entry {short_repr(key)}: {short_repr(digest)}, where \"layer:expert\": "
                         "\"<64 hex digits>\" belongs")
    return experts


_KEY = re.compile(r"[0-9]{1,9}:[0-9]{1,9}", re.ASCII)
_DIGEST = re.compile(r"[0-9a-f]{64}", re.ASCII)


def _expert_key(key: str) -> tuple[int, int]:
    layer, expert = key.split(":")
    return int(layer), int(expert)
