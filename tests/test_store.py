"""The expert store: both on-disk layouts, byte-exact reads, index checks."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from offload_moe.loader import build_skeleton, checkpoint_renamer, load_config, swap_experts
from offload_moe.store import ExpertStore
from offload_moe.transfer import Mover


def open_store(folder):
    model = build_skeleton(load_config(folder))
    modules = swap_experts(model)
    return ExpertStore(folder, [m.spec for m in modules], rename=checkpoint_renamer(model)), modules


def read_expert(store, spec, layer, expert, dtype=torch.float32):
    views = {n: torch.full(s, float("nan"), dtype=dtype) for n, s in spec.shapes.items()}
    mover = Mover(store, readers=1)
    nbytes = mover.from_disk(layer, expert, views).transfer().disk_bytes
    mover.close()
    return views, nbytes


def test_per_expert_layout_mixtral(model_dir):
    folder = model_dir("mixtral")
    store, modules = open_store(folder)
    spec = modules[1].spec
    assert spec.prefix == "model.layers.1.mlp.experts"  # block_sparse_moe renamed as transformers does
    views, nbytes = read_expert(store, spec, 1, 3)
    with safe_open(folder / "model.safetensors", "pt") as f:
        w1 = f.get_tensor("model.layers.1.block_sparse_moe.experts.3.w1.weight")
        w3 = f.get_tensor("model.layers.1.block_sparse_moe.experts.3.w3.weight")
        w2 = f.get_tensor("model.layers.1.block_sparse_moe.experts.3.w2.weight")
    assert torch.equal(views["gate_up_proj"], torch.cat([w1, w3]))  # rows: gate then up
    assert torch.equal(views["down_proj"], w2)
    assert nbytes == (w1.numel() + w3.numel() + w2.numel()) * 4
    assert not any("experts" in k for k in store.dense)
    store.close()


def test_fused_transposed_layout_gpt_oss(model_dir):
    folder = model_dir("gpt_oss")
    store, modules = open_store(folder)
    spec = modules[2].spec
    assert spec.is_transposed and not spec.is_concatenated
    views, _ = read_expert(store, spec, 2, 1)
    with safe_open(folder / "model.safetensors", "pt") as f:
        for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
            want = f.get_tensor(f"model.layers.2.mlp.experts.{name}")[1].float()
            assert torch.equal(views[name], want), name
    store.close()


def test_fused_renamed_layout_granitemoe(model_dir):
    folder = model_dir("granitemoe")
    store, modules = open_store(folder)
    views, _ = read_expert(store, modules[0].spec, 0, 2)
    with safe_open(folder / "model.safetensors", "pt") as f:
        want = f.get_tensor("model.layers.0.block_sparse_moe.input_linear.weight")[2]
    assert torch.equal(views["gate_up_proj"], want)
    store.close()


def test_qwen_style_names_and_shared_expert_is_dense(model_dir):
    store, modules = open_store(model_dir("qwen2_moe"))
    assert any("shared_expert." in k for k in store.dense)
    assert any(k.endswith("mlp.gate.weight") for k in store.dense)
    assert len(store.pieces) == sum(m.num_experts for m in modules)
    store.close()


def test_first_dense_layers_have_no_experts(model_dir):
    store, modules = open_store(model_dir("deepseek_v3"))
    assert [m.layer for m in modules] == [1, 2]  # first_k_dense_replace=1
    store.close()


def test_dtype_conversion_on_read(model_dir):
    folder = model_dir("mixtral")
    store, modules = open_store(folder)
    views, _ = read_expert(store, modules[0].spec, 0, 0, dtype=torch.bfloat16)
    with safe_open(folder / "model.safetensors", "pt") as f:
        w2 = f.get_tensor("model.layers.0.block_sparse_moe.experts.0.w2.weight")
    assert torch.equal(views["down_proj"], w2.to(torch.bfloat16))
    store.close()


def test_expert_number_of_5000_digits_is_refused(model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from offload_moe.errors import CheckpointError

    folder = tmp_path / "model"
    shutil.copytree(model_dir("mixtral"), folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.block_sparse_moe.experts." + "7" * 5000 + ".w1.weight"] = torch.zeros(48, 32)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"for expert 777777777777\.\.\. \(5000 digits\), but the config gives 4"):
        open_store(folder)


def test_non_ascii_digits_are_not_an_expert_number(model_dir, tmp_path):
    """int() reads '٣' as 3; a checkpoint name with it is not expert 3 of the layer (it stays a dense tensor)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(model_dir("mixtral"), folder)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.block_sparse_moe.experts.\u0663.w1.weight"
    tensors[name] = torch.zeros(48, 32)
    save_file(tensors, folder / "model.safetensors")
    store, _ = open_store(folder)
    assert name.replace("block_sparse_moe", "mlp") in store.dense
    store.close()
