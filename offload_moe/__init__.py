"""offload_moe: run Mixture-of-Experts models whose experts do not fit on the device.

Routed experts stay in the checkpoint files and move on demand into a fixed
pool of expert slots on the compute device; everything else is loaded as usual.

    import offload_moe
    model = offload_moe.load("path/to/model", device="cuda", cache_memory="6GiB")
    # or: offload_moe.load("path/to/model", offload_moe.OffloadConfig.from_profile("gpu-24gb"))
    model.generate(input_ids, max_new_tokens=32)
    model.offload.stats()
"""

from ._version import __version__
from .errors import (
    BudgetError,
    CheckpointError,
    ConfigError,
    DeviceError,
    ExpertLoadError,
    ModelClosedError,
    ModelPathError,
    OffloadMoEError,
    OutputError,
    PolicyError,
    TraceError,
    UnsupportedModelError,
)
from .checkpoint import demo_model_path
from .config import OffloadConfig
from .generic import offload_experts, save_experts
from .loader import SUPPORTED_FAMILIES, load
from .planning import Plan, plan
from .checksums import verify
from .quantize import quantize_experts

__all__ = [
    "load",
    "OffloadConfig",
    "plan",
    "Plan",
    "demo_model_path",
    "offload_experts",
    "save_experts",
    "verify",
    "quantize_experts",
    "SUPPORTED_FAMILIES",
    "OffloadMoEError",
    "ModelPathError",
    "CheckpointError",
    "UnsupportedModelError",
    "BudgetError",
    "ConfigError",
    "DeviceError",
    "PolicyError",
    "ExpertLoadError",
    "ModelClosedError",
    "TraceError",
    "OutputError",
    "__version__",
]
