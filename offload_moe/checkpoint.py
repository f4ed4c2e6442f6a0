"""A checkpoint folder opened once: its path, its config, the model skeleton and the index of its tensors.

``open_checkpoint`` does what ``load``, ``plan`` and ``verify`` all need before they part ways:

1. resolve the path: a model folder, or a hub id found in the local Hugging Face cache (never downloaded);
   ``demo_model_path()`` is the bundled model's folder;
2. read ``config.json`` as untrusted data and check its values (``model_config``), then let transformers
   parse it; code from the folder runs only with ``trust_remote_code``;
3. build the model on the meta device (no memory) and replace every routed-experts module with
   ``OffloadedExperts``;
4. index the safetensors files: routed experts by (layer, expert), everything else as dense tensors.

``Checkpoint.load_dense`` then reads the dense weights onto the compute device. Nothing is written to the
model folder; a checkpoint that fails to open leaves no file open.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, ModelPathError, UnsupportedModelError
from .experts import OffloadedExperts, expert_params, find_experts_modules, layer_number
from .formats import expert_format
from .model_config import REMOTE_CODE_HINT, check_config, checkpoint_size, read_config
from .progress import progress_bar
from .store import ExpertsSpec, ExpertStore

log = logging.getLogger("offload_moe")

BUFFER_LIMIT = 2**30  # rotary tables are kilobytes; more is a config out of range

# Families with a parity test against transformers (tests/test_families.py).
SUPPORTED_FAMILIES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
    "glm4_moe", "phimoe", "granitemoe", "gpt_oss",
)


@dataclass(eq=False)
class Checkpoint:
    """An opened checkpoint: ``model`` is built on the meta device with its experts swapped (``modules``, in
    layer order), ``store`` indexes the files and holds them open until ``close``. A context manager."""

    folder: Path
    config: object  # transformers' PretrainedConfig
    model: nn.Module
    modules: list[OffloadedExperts]
    store: ExpertStore

    @property
    def total_experts(self) -> int:
        return sum(m.num_experts for m in self.modules)

    def dense_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of every tensor but the routed experts; with ``dtype``, floating tensors counted in it."""
        if dtype is None:
            return sum(info.nbytes for info in self.store.dense.values())
        itemsize = torch.empty((), dtype=dtype).element_size()
        return sum(info.nbytes // info.dtype.itemsize * (itemsize if info.dtype.is_floating_point else info.dtype.itemsize)
                   for info in self.store.dense.values())

    def load_dense(self, device: torch.device, dtype: torch.dtype, progress: bool) -> None:
        """Read the dense weights onto ``device`` (see ``load_dense``)."""
        load_dense(self.model, self.store, device, dtype, progress)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_checkpoint(path: str | Path, *, trust_remote_code: bool = False, io: str = "buffered",
                    model_config=None) -> Checkpoint:
    """Resolve ``path``, read and check its config, build the skeleton, swap the experts and index the files;
    ``io`` is how the store reads them (see ``offload_moe.load``). ``model_config``: the config ``load_config``
    already read from ``path`` (config.json is then not read again)."""
    folder = resolve_model_path(path)
    config = model_config if model_config is not None else load_config(folder, trust_remote_code=trust_remote_code)
    packing = expert_format(getattr(config, "quantization_config", None), str(folder / "config.json"))
    model = build_skeleton(config, trust_remote_code=trust_remote_code)
    modules = swap_experts(model)
    store = ExpertStore(folder, [m.spec for m in modules], rename=checkpoint_renamer(model), io=io, format=packing)
    return Checkpoint(folder, config, model, modules, store)


def demo_model_path() -> Path:
    """The folder of the small MoE model bundled with offload_moe: config, bf16 weights, tokenizer, model card.

    It loads with ``offload_moe.load(demo_model_path(), ...)`` or with transformers'
    ``from_pretrained``; no download is needed.
    """
    folder = Path(__file__).resolve().parent / "demo_model"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ModelPathError(
            f"{folder} lacks config.json or model.safetensors, so the bundled model is incomplete; reinstall "
            "offload_moe (`pip install --force-reinstall .` from the repository) or train it again with "
            "scripts/train_demo_model.py"
        )
    return folder


def resolve_model_path(path: str | Path) -> Path:
    """A local model folder; a hub id is looked up in the local Hugging Face cache only, never downloaded."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise ModelPathError(f"{folder} is not a model folder: it has no config.json")
        return folder
    if folder.exists():
        raise ModelPathError(f"{folder} is a file; pass the model folder that holds config.json and *.safetensors")
    if str(path).count("/") == 1 and not str(path).startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download  # heavy: lazy for the CLI's startup

            cached = Path(snapshot_download(str(path), local_files_only=True))
            return resolve_model_path(cached)
        except Exception:
            raise ModelPathError(
                f"{path!r} is not a folder, and no copy of that hub model is in the local Hugging Face cache. "
                f"offload_moe never downloads: fetch it first (`hf download {path}`) and pass the folder"
            ) from None
    raise ModelPathError(f"{folder} does not exist; pass the folder of a model saved with save_pretrained")


def load_config(folder: Path, *, trust_remote_code: bool = False):
    """The transformers config of ``folder``: ``config.json`` read strictly and its values checked against the
    checkpoint first (see ``model_config``); code from the folder runs only with ``trust_remote_code``."""
    from transformers import AutoConfig  # transformers takes ~1 s to import: lazy for the CLI's startup

    data = read_config(folder, trust_remote_code)
    check_config(data, folder / "config.json", checkpoint_size(folder))
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises ValueError, TypeError, AttributeError... for a config it cannot take
        reason = " ".join(str(e).split())  # transformers' message spans lines; an error here is one line
        hint = f" {REMOTE_CODE_HINT}" if "trust_remote_code" in reason else ""
        raise UnsupportedModelError(f"{folder / 'config.json'} cannot be read by transformers: {reason}{hint}") from None


def build_skeleton(config, *, trust_remote_code: bool = False) -> nn.Module:
    """The model with every parameter and persistent buffer on the meta device: built there from the first
    tensor, so no size in the config allocates memory. Non-persistent buffers (rotary tables), which no
    checkpoint holds, are then computed on the CPU by transformers' own weight init, as its from_pretrained does."""
    from transformers import AutoModelForCausalLM  # lazy for the CLI's startup, as above
    from transformers.initialization import meta_device_safe_creation_ops

    try:
        with torch.device("meta"), meta_device_safe_creation_ops(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:  # no class for the model_type; with trust_remote_code, whatever the folder's code raises
        reason = " ".join(str(e).split())
        raise UnsupportedModelError(
            f"transformers cannot build a causal LM for model_type {config.model_type!r} ({reason}). "
            f"Supported families: {', '.join(SUPPORTED_FAMILIES)}"
        ) from None
    _compute_buffers(model)
    return model


def _compute_buffers(model: nn.Module) -> None:
    """Give each non-persistent buffer real memory and let the model's ``_init_weights`` compute it; one it
    leaves unset (still NaN) is refused rather than used with arbitrary values."""
    owners: dict[nn.Module, list[str]] = {}
    for module in model.modules():
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None and buffer.is_meta:
                owners.setdefault(module, []).append(name)
    total = sum(module._buffers[n].nbytes for module, names in owners.items() for n in names)
    if total > BUFFER_LIMIT:
        raise UnsupportedModelError(f"{type(model).__name__} asks for {total:,} bytes of computed buffers (rotary "
                                    "tables...), more than such tables take; check the sizes in config.json")
    for module, names in owners.items():
        for name in names:
            buffer = module._buffers[name]
            module._buffers[name] = torch.full_like(buffer, math.nan, device="cpu") if buffer.is_floating_point() \
                else torch.zeros_like(buffer, device="cpu")
        model._init_weights(module)
        unset = [n for n in names if module._buffers[n].is_floating_point() and module._buffers[n].isnan().any()]
        if unset:
            raise UnsupportedModelError(f"{type(model).__name__}: transformers does not compute the buffer(s) "
                                        f"{', '.join(unset)} of {type(module).__name__} when building on the meta "
                                        "device, so offload_moe cannot build this model")


def swap_experts(model: nn.Module) -> list[OffloadedExperts]:
    """Replace each routed-experts module by an ``OffloadedExperts``; returns them in layer order."""
    found = find_experts_modules(model)
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({model.config.model_type}) has no routed-experts module in the "
            "transformers 5 experts layout, so there is nothing to offload. Supported families: "
            f"{', '.join(SUPPORTED_FAMILIES)}; other families decorated with use_experts_implementation "
            "should work too"
        )
    swapped = []
    for ordinal, (name, module) in enumerate(found):
        spec = ExpertsSpec(
            layer=layer_number(name, ordinal),
            prefix=name,
            num_experts=module.num_experts,
            shapes={n: tuple(p.shape[1:]) for n, p in expert_params(module).items()},
            is_transposed=bool(module.is_transposed),
            is_concatenated=bool(getattr(module, "is_concatenated", True)),
        )
        offloaded = OffloadedExperts(module, spec)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, offloaded)
        swapped.append(offloaded)
    return swapped



def checkpoint_renamer(model: nn.Module) -> Callable[[str], str]:
    """Map checkpoint names to the model's parameter names with transformers' own renaming rules.

    Only renamings are applied (e.g. Mixtral's ``block_sparse_moe`` -> ``mlp``); the rules that
    fuse per-expert tensors are not, since the store reads experts one at a time instead.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping  # lazy, as above
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # an older transformers: names are used as they are
        return lambda key: key
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    names = dict.fromkeys(_tensor_names(model), True)
    prefix = getattr(model, "base_model_prefix", None)
    return lambda key: rename_source_key(key, renamings, [], prefix, names)[0]


def _tensor_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]


def _keep_fp32(model: nn.Module) -> set[str]:
    return set(getattr(model, "_keep_in_fp32_modules", None) or []) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or []
    )


def load_dense(model: nn.Module, store: ExpertStore, device: torch.device, dtype: torch.dtype, progress: bool) -> None:
    """Read every non-expert tensor onto ``device``, one at a time, then tie weights and check nothing is missing."""
    from accelerate.utils import set_module_tensor_to_device  # imports transformers' peers: lazy, as above

    expected = dict(model.named_parameters())
    expected.update(model.named_buffers())
    keep_fp32 = _keep_fp32(model) if dtype in (torch.float16, torch.bfloat16) else set()
    unexpected = []
    items = sorted(store.dense.items(), key=lambda kv: (str(kv[1].file), kv[1].offset))
    with progress_bar(progress, "loading dense weights", sum(info.nbytes for _, info in items)) as advance:
        for key, info in items:
            target = expected.get(key)
            if target is None:
                unexpected.append(info.name)
                continue
            if target.is_floating_point() != info.dtype.is_floating_point:
                raise CheckpointError(
                    f"{info.file}: tensor {info.name!r} has dtype {str(info.dtype).removeprefix('torch.')} but the "
                    f"model expects {str(target.dtype).removeprefix('torch.')}; the checkpoint is corrupted"
                )
            if tuple(target.shape) != info.shape:
                raise CheckpointError(
                    f"{info.file}: tensor {info.name!r} has shape {list(info.shape)} but the model built from "
                    f"config.json expects {list(target.shape)}; the checkpoint does not match its config"
                )
            value = store.read_dense(info)
            cast = torch.float32 if keep_fp32 and keep_fp32 & set(key.split(".")) else dtype
            set_module_tensor_to_device(model, key, device, value=value, dtype=cast if value.is_floating_point() else None)
            advance(info.nbytes)
    if unexpected:
        log.warning("ignored %d checkpoint tensors the model does not use, e.g. %s", len(unexpected), unexpected[:3])
    model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if missing:
        raise CheckpointError(
            f"{store.folder}: the checkpoint lacks {len(missing)} weight(s) the model needs, e.g. "
            f"{', '.join(missing[:5])}; a shard may be missing or the checkpoint may not match config.json"
        )
    for name, buf in list(model.named_buffers()):
        if buf.device != device:
            module_name, _, buf_name = name.rpartition(".")
            model.get_submodule(module_name)._buffers[buf_name] = buf.to(device)
