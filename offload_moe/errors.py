"""One exception hierarchy for everything offload_moe reports to a user.

Every message names the file, tensor or setting at fault and says what to do next.
"""

from __future__ import annotations


class OffloadMoEError(Exception):
    """Base class of every error offload_moe raises on purpose."""


class ModelPathError(OffloadMoEError, FileNotFoundError):
    """The path given is not a model folder offload_moe can read."""


class CheckpointError(OffloadMoEError):
    """A checkpoint file is missing, truncated, corrupted or disagrees with the config."""


class UnsupportedModelError(OffloadMoEError):
    """The model has no routed-experts module offload_moe knows how to offload."""


class BudgetError(OffloadMoEError, ValueError):
    """A memory or expert budget is malformed, too small, or does not fit."""


class ConfigError(OffloadMoEError, ValueError):
    """An option is unknown or malformed (policy name, dtype, profile...)."""


class DeviceError(OffloadMoEError):
    """The requested compute device does not exist or cannot be used."""


class PolicyError(OffloadMoEError):
    """An eviction policy was used against its contract (e.g. Belady given another future)."""


class ExpertLoadError(OffloadMoEError):
    """Reading or moving one expert failed; names the layer, the expert and the file."""


class ModelClosedError(ExpertLoadError):
    """The model was closed (``model.offload.close()``): nothing of it runs until it is loaded again."""


class TraceError(OffloadMoEError, ValueError):
    """A routing trace is missing, malformed, or disagrees with its own metadata."""


class OutputError(OffloadMoEError, OSError):
    """A file offload_moe was asked to write (results, traces, manifests) cannot be written there."""
