"""Ctrl-C during generation or loading, and deleting the model: threads, files and buffers are released."""

from __future__ import annotations

import gc
import threading

import psutil
import pytest

import offload_moe


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
    from offload_moe import loader

    before_threads, before_fds = readers(), fds()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "fill_host_tier", interrupted)
    with pytest.raises(KeyboardInterrupt):
        offload_moe.load(model_dir("mixtral"), cache_experts=2, host_memory="1GiB", progress=False)
    assert readers() == before_threads and fds() == before_fds


def test_no_temporary_files_left(model_dir, tmp_path, monkeypatch, prompt):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = offload_moe.load(model_dir("mixtral"), cache_experts=2, progress=False)
    model.generate(prompt, max_new_tokens=4, do_sample=False)
    model.offload.close()
    assert list(tmp_path.iterdir()) == []


def test_deleting_the_model_closes_it_at_once_without_the_cycle_collector(model_dir, prompt):
    """forward and generate take the model's lock through weak references, so the model holds no cycle
    through itself: its last reference going closes it there and then, not later on some other thread."""
    model = offload_moe.load(model_dir("mixtral"), cache_experts=2, dtype="float32", progress=False)
    model.generate(prompt, max_new_tokens=3, do_sample=False)
    finalizer = model.offload._finalizer
    gc.disable()
    try:
        del model
        assert not finalizer.alive
    finally:
        gc.enable()


def test_collected_on_a_reader_thread_the_close_moves_off_it(model_dir):
    """Closing on one of the model's own reader threads (the cycle collector can run anywhere) must not wait
    for the read that thread is in the middle of."""
    from offload_moe.runtime import _close

    model = offload_moe.load(model_dir("mixtral"), cache_experts=2, dtype="float32", progress=False)
    cache = model.offload.cache
    closing = cache.mover.pool.submit(_close, cache)  # as if the collector ran inside a read
    closing.result(timeout=10)
    for thread in threading.enumerate():
        if thread.name == "offload-moe-close":
            thread.join(timeout=10)
    assert not any(t.is_alive() for t in cache.mover.pool.threads())
    with pytest.raises(offload_moe.ExpertLoadError, match="closed"):
        cache.mover.pool.submit(print)
