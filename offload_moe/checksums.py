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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_write
from .errors import CheckpointError, ConfigError
from .loader import build_skeleton, checkpoint_renamer, load_config, resolve_model_path, swap_experts
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
    model = build_skeleton(load_config(folder, trust_remote_code=trust_remote_code), trust_remote_code=trust_remote_code)
    modules = swap_experts(model)
    store = ExpertStore(folder, [m.spec for m in modules], rename=checkpoint_renamer(model))
    try:
        digests = expert_digests(store, progress)
    finally:
        store.close()
    if not target.exists():
        if manifest_dir is None and not os.access(folder, os.W_OK):
            raise ConfigError(
                f"{folder} is read-only, so the checksum manifest cannot go beside the model; "
                "name a folder for it (manifest_dir= / --manifest-dir)"
            )
        manifest = {"format": FORMAT, "model": str(folder), "experts": digests}
        atomic_write(target, json.dumps(manifest, indent=1, sort_keys=True).encode())
        return VerifyResult(target, True, len(digests))
    try:
        manifest = json.loads(target.read_text())
        expected = manifest["experts"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checksum manifest {target} is unreadable ({e!r}); delete it to make a new one") from None
    bad = []
    for key in sorted(set(expected) | set(digests), key=lambda k: tuple(int(x) for x in k.split(":"))):
        if expected.get(key) != digests.get(key):
            layer, expert = (int(x) for x in key.split(":"))
            bad.append((layer, expert, store.describe(layer, expert)))
    return VerifyResult(target, False, len(digests), bad)
