"""Ctrl-C during generation or loading, and deleting the model: threads, files and buffers are released."""

from __future__ import annotations

import gc
import os
import re
import shutil
import threading
from pathlib import Path

import psutil
import pytest
import torch

import offload_moe
from offload_moe.errors import ModelClosedError
from offload_moe.values import IO_MODES
from conftest import VERBS


def readers() -> int:
    gc.collect()
    return sum(1 for t in threading.enumerate() if t.name.startswith("offload-moe-reader"))


def fds() -> int:
    gc.collect()
    return psutil.Process().num_fds()


@pytest.mark.slow
def test_ctrl_c_during_generation_then_delete(model_dir, prompt):
    before_threads, before_fds = readers(), fds()
    model = offload_moe.load(model_dir("mixtral"), cache_experts=2, dtype="float32", progress=False)
    calls = [0]

    def interrupt(module, args):
        calls[0] += 1
        if calls[0] == 7:  # somewhere in the middle of a decode step
            raise KeyboardInterrupt

    handle = model.offload.modules[1].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        model.generate(prompt, max_new_tokens=16, do_sample=False)
    handle.remove()
    cache = model.offload.cache
    cache.drain()
    cache.residency.check()
    assert not cache.residency.pins  # the interrupted layer released what it held
    out = model.generate(prompt, max_new_tokens=4, do_sample=False)  # still usable
    assert out.shape[1] == prompt.shape[1] + 4
    del model, cache
    assert readers() == before_threads and fds() == before_fds


@pytest.mark.slow
def test_ctrl_c_during_loading_leaves_nothing(model_dir, monkeypatch):
    import accelerate.utils

    before_threads, before_fds = readers(), fds()
    real = accelerate.utils.set_module_tensor_to_device
    count = [0]

    def interrupted(*args, **kwargs):
        count[0] += 1
        if count[0] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(accelerate.utils, "set_module_tensor_to_device", interrupted)
    with pytest.raises(KeyboardInterrupt):
        offload_moe.load(model_dir("mixtral"), cache_experts=2, progress=False)
    assert readers() == before_threads and fds() == before_fds


@pytest.mark.slow
def test_ctrl_c_while_filling_the_host_tier(model_dir, monkeypatch):
    from offload_moe import attach

    before_threads, before_fds = readers(), fds()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(attach, "fill_host_tier", interrupted)
    with pytest.raises(KeyboardInterrupt):
        offload_moe.load(model_dir("mixtral"), cache_experts=2, host_memory="1GiB", progress=False)
    assert readers() == before_threads and fds() == before_fds


@pytest.mark.parametrize("verb", VERBS)
def test_no_temporary_files_left(verb, offloaded, tmp_path, monkeypatch, prompt):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = offloaded(verb, cache_experts=2)
    model.generate(prompt, max_new_tokens=4, do_sample=False)
    model.offload.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("verb", VERBS)
def test_deleting_the_model_closes_it_at_once_without_the_cycle_collector(verb, offloaded, prompt):
    """forward and generate take the model's lock through weak references, so the model holds no cycle
    through itself: its last reference going closes it there and then, not later on some other thread."""
    model = offloaded(verb, cache_experts=2)
    model.generate(prompt, max_new_tokens=3, do_sample=False)
    finalizer = model.offload._finalizer
    folder = model.offload.owned_folder
    gc.disable()
    try:
        del model
        assert not finalizer.alive
        assert folder is None or not folder.exists()  # offload_experts' own experts folder went with it
    finally:
        gc.enable()


@pytest.mark.parametrize("verb", VERBS)
def test_collected_on_a_reader_thread_the_close_moves_off_it(verb, offloaded):
    """Closing on one of the model's own reader threads (the cycle collector can run anywhere) must not wait
    for the read that thread is in the middle of."""
    from offload_moe.runtime import _close

    model = offloaded(verb, cache_experts=2)
    cache, folder = model.offload.cache, model.offload.owned_folder
    closing = cache.mover.pool.submit(_close, cache, (), folder)  # as if the collector ran inside a read
    closing.result(timeout=10)
    for thread in threading.enumerate():
        if thread.name == "offload-moe-close":
            thread.join(timeout=10)
    assert not any(t.is_alive() for t in cache.mover.pool.threads())
    assert folder is None or not folder.exists()
    with pytest.raises(offload_moe.ExpertLoadError, match="closed"):
        cache.mover.pool.submit(print)


# -- after close(): one clear error everywhere, nothing reopened, nothing left open ---------------------------------
def still_open(folder: Path) -> list[str]:
    """Descriptors and mappings of this process that point into ``folder``."""
    gc.collect()
    inside = str(folder.resolve())
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
        if target.startswith(inside):
            found.append(f"fd {fd} -> {target}")
    return found + [line for line in Path("/proc/self/maps").read_text().splitlines() if inside in line]


def closed_errors(*calls) -> set[str]:
    """The messages of the ModelClosedError each call raises (each must raise one)."""
    messages = set()
    for call in calls:
        with pytest.raises(ModelClosedError) as e:
            with torch.no_grad():
                call()
        messages.add(str(e.value))
        del e  # its traceback would keep the frames (and any tensor they hold) alive
    return messages


@pytest.fixture
def own_mixtral(model_dir, tmp_path):
    """A private copy of the tiny Mixtral: other tests' models may still hold the shared one open."""
    return Path(shutil.copytree(model_dir("mixtral"), tmp_path / "mixtral"))


@pytest.mark.parametrize("io", IO_MODES)
def test_after_close_every_path_of_a_loaded_model_raises_and_nothing_stays_open(io, own_mixtral, prompt):
    before = readers()
    model = offload_moe.load(own_mixtral, cache_experts=2, dtype="float32", io=io, prefetch="gate", progress=False)
    model.generate(prompt, max_new_tokens=3, do_sample=False)
    assert still_open(own_mixtral)  # the check sees the checkpoint while the model is open
    model.offload.close()
    assert still_open(own_mixtral) == [] and readers() == before
    cache = model.offload.cache
    messages = closed_errors(
        lambda: model.generate(prompt, max_new_tokens=3, do_sample=False),
        lambda: model(prompt),
        lambda: model.model(prompt),  # the inner model, past the top-level forward
        lambda: cache.prefetch(model.offload.modules[0].layer, [0, 1]),
    )
    assert len(messages) == 1 and re.search(r"closed \(model\.offload\.close\(\)\).*load it again", messages.pop())
    model.offload.close()  # a second close does nothing
    assert model.offload.stats()["capacity_experts"] == 2  # the statistics stay readable
    assert still_open(own_mixtral) == [] and readers() == before  # and nothing was reopened on the way


@pytest.mark.parametrize("io", IO_MODES)
def test_after_close_an_offload_experts_model_raises_and_nothing_stays_open(io, tmp_path):
    from test_generic import inputs, make_model

    folder = tmp_path / "experts"
    offload_moe.save_experts(make_model(), folder)
    model, x = make_model(), inputs()
    handle = offload_moe.offload_experts(model, store=folder, cache_experts=2, io=io)
    with torch.no_grad():
        model(x)
    assert still_open(folder)
    handle.close()
    assert still_open(folder) == []
    messages = closed_errors(lambda: model(x), lambda: model.blocks[1]["moe"](x),
                             lambda: handle.cache.prefetch(0, [0]))
    assert len(messages) == 1 and "load it again" in messages.pop()
    handle.close()
    assert still_open(folder) == []


def test_after_close_offloaded_transformers_experts_raise_the_same_error(model_dir, prompt):
    """offload_experts on a transformers model: its experts modules are the core ``OffloadedExperts``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir("mixtral"), dtype=torch.float32).eval()
    handle = offload_moe.offload_experts(model, cache_experts=2)
    with torch.no_grad():
        model(prompt)
    handle.close()
    assert len(closed_errors(lambda: model(prompt), lambda: model.model(prompt))) == 1
