"""offload_moe.gemv: the bf16 GEMV's numbers against f32 and torch's bf16 kernel, where it fits, and the cached
per-machine choice (calibration stubbed: nothing here depends on timing)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from offload_moe import gemv, kernels
from offload_moe.errors import ConfigError
from offload_moe.kernels import ExpertMLP, RowBlocks
from offload_moe.memory import MemoryRoom

needs_numba = pytest.mark.skipif(not gemv.available(), reason="needs numba (pip install 'offload_moe[fast]')")
SHAPES = [(1, 8), (37, 100), (64, 256), (203, 96)]  # rows in and out of the kernels' groups of 8 and 4


def bf16(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def assert_rounded_once(y: torch.Tensor, exact: torch.Tensor) -> None:
    """y (bf16) is ``exact`` (f32) rounded to bf16, up to the order of the f32 sums: within half a bf16 step
    of it, and a hair for the summation order."""
    assert y.dtype == torch.bfloat16 and y.shape == exact.shape
    slack = exact.abs() * 2**-8 + 1e-5 * exact.abs().max()
    assert ((y.float() - exact).abs() <= slack).all()


@needs_numba
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_f32_rounded_once_and_torch(shape, tokens, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the row blocks are split among threads
    try:
        w, x, bias = bf16(*shape, seed=1), bf16(tokens, shape[1], seed=2), bf16(shape[0], seed=3)
        exact = F.linear(x.float(), w.float(), bias.float())
        for y in (gemv.bf16_linear(x, w, bias),
                  gemv.bf16_linear(x, w.t().contiguous(), bias, transposed=True)):
            assert_rounded_once(y, exact)
            torch.testing.assert_close(y, F.linear(x, w, bias), rtol=2**-7, atol=1e-5 * exact.abs().max().item())
        assert_rounded_once(gemv.bf16_linear(x, w), F.linear(x.float(), w.float()))
    finally:
        torch.set_num_threads(before)


@needs_numba
def test_keeps_leading_dimensions_and_reads_a_view_of_rows_in_place():
    w = bf16(48, 64)[8:40]  # rows of a bigger tensor, as a slot's or a mapped file's views are
    x = bf16(1, 2, 64, seed=1)
    y = gemv.bf16_linear(x, w)
    assert y.shape == (1, 2, 32)
    assert_rounded_once(y, F.linear(x.float(), w.float()))


def test_fits_only_bf16_cpu_few_tokens_and_contiguous_rows():
    w, x = bf16(16, 32), bf16(1, 32)
    assert gemv.fits(x, w) and gemv.fits(bf16(4, 32), w) and gemv.fits(bf16(2, 1, 32), w)
    assert not gemv.fits(bf16(5, 32), w)                    # prefill: torch's kernels
    assert not gemv.fits(x.float(), w.float())
    assert not gemv.fits(x, bf16(32, 16).t())               # columns contiguous, rows not
    assert not gemv.fits(x, bf16(16, 64)[:, :32])           # rows contiguous, not the whole
    assert not gemv.fits(x, bf16(16, 31))                   # inner sizes differ
    assert gemv.fits(x, bf16(32, 16), transposed=True)
    assert not gemv.fits(x, w, transposed=True)
    assert not gemv.fits(bf16(0, 32), w)


@needs_numba
@pytest.mark.parametrize("mode", ["on", "off"])
def test_expert_mlp_same_numbers_either_way(monkeypatch, mode):
    """An expert (gate and up as row blocks, or stored transposed with biases as GPT-OSS does) computes the
    same with the GEMV as with torch's kernels, to bf16 rounding."""
    monkeypatch.setenv(gemv.ENV, mode)
    calls = []
    real = gemv.bf16_linear
    monkeypatch.setattr(gemv, "bf16_linear", lambda *a, **k: calls.append(k) or real(*a, **k))
    h, i = 64, 40
    gate, up, down = bf16(i, h, seed=1), bf16(i, h, seed=2), bf16(h, i, seed=3)
    b1, b2 = bf16(2 * i, seed=4), bf16(h, seed=5)
    x = bf16(3, h, seed=6)
    gated = ExpertMLP(gated=True, transposed=False, activation=lambda t: F.silu(t[..., :i]) * t[..., i:])
    gated_t = ExpertMLP(gated=True, transposed=True, activation=lambda t: F.silu(t[..., :i]) * t[..., i:])
    gate_up = torch.cat([gate, up])
    want = F.linear(F.silu(F.linear(x.float(), gate.float())) * F.linear(x.float(), up.float()), down.float())
    got = gated(x, {"gate_up_proj": RowBlocks((gate, up)), "down_proj": down})
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2 * want.abs().max().item())
    exact_t = F.linear(x.float(), gate_up.float(), b1.float())
    want_t = F.linear(F.silu(exact_t[:, :i]) * exact_t[:, i:], down.float(), b2.float())
    got_t = gated_t(x, {"gate_up_proj": gate_up.t().contiguous(), "gate_up_proj_bias": b1,
                        "down_proj": down.t().contiguous(), "down_proj_bias": b2})
    torch.testing.assert_close(got_t.float(), want_t, rtol=3e-2, atol=3e-2 * want_t.abs().max().item())
    # on: each block, the down projection, and both transposed projections went through the GEMV
    assert [c.get("transposed", False) for c in calls] == ([False] * 3 + [True] * 2 if mode == "on" else [])


def test_without_numba_torch_computes(monkeypatch):
    monkeypatch.setattr(gemv, "_kernels", lambda: None)
    monkeypatch.setenv(gemv.ENV, "on")
    w, x = bf16(16, 32), bf16(1, 32)
    assert not gemv.available() and not gemv.wanted() and not gemv.use(x, w)
    torch.testing.assert_close(kernels.dense_linear(x, w), F.linear(x, w), rtol=0, atol=0)
    kernels.prepare_cpu_kernels([], {"down_proj": (16, 32)}, torch.bfloat16, torch.device("cpu"))  # no error


def test_bad_mode_is_a_config_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv(gemv.ENV, "fast")
    with pytest.raises(ConfigError, match="OFFLOAD_MOE_GEMV"):
        gemv.mode()


# ---- the cached choice ------------------------------------------------------------------------------------

@pytest.fixture
def auto(monkeypatch, tmp_path):
    """auto mode, an empty cache folder, no verdicts in memory."""
    monkeypatch.setenv(gemv.ENV, "auto")
    monkeypatch.setenv("OFFLOAD_MOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gemv, "_verdicts", {})
    if not gemv.available():
        pytest.skip("the verdict key names numba's version")
    return tmp_path / "kernels.json"


class Stub:
    """A calibration that records its calls and answers ``verdict``."""

    def __init__(self, verdict: bool):
        self.verdict, self.calls = verdict, []

    def __call__(self, shape, *, transposed=False, tokens=1):
        self.calls.append((shape, transposed, tokens))
        return {"gemv": self.verdict, "speedup": 1.5 if self.verdict else 0.9, "rounds": 5}


def test_choice_is_calibrated_once_then_read_from_the_file(auto):
    stub = Stub(True)
    assert gemv.choose((16, 32), calibrate_fn=stub) is True
    assert gemv.choose((16, 32), calibrate_fn=stub) is True  # this process's verdict
    assert stub.calls == [((16, 32), False, 1)]
    saved = json.loads(auto.read_text())
    (key, entry), = saved["verdicts"].items()
    assert entry["gemv"] is True and entry["speedup"] == 1.5
    assert "16x32 [out, in] | 1 token" in key and f"{torch.get_num_threads()} threads" in key and torch.__version__ in key
    gemv._verdicts.clear()  # a new process: the file answers
    assert gemv.choose((16, 32), calibrate_fn=Stub(False)) is True
    assert gemv.choose((16, 32), transposed=True, calibrate_fn=stub) is True  # another layout: measured
    assert stub.calls[-1] == ((16, 32), True, 1) and len(json.loads(auto.read_text())["verdicts"]) == 2
    assert gemv.choose((16, 32), tokens=4, calibrate_fn=stub) is True  # 2-4 tokens: another kernel, measured
    assert stub.calls[-1] == ((16, 32), False, 4)


def test_thread_count_is_part_of_the_key(auto):
    stub = Stub(False)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            assert gemv.choose((8, 8), calibrate_fn=stub) is False
    finally:
        torch.set_num_threads(before)
    assert len(stub.calls) == 2


@pytest.mark.parametrize("content", ["{not json", '{"version": 99, "verdicts": {}}', "[1, 2]",
                                     '{"version": 1, "verdicts": []}'])
def test_a_corrupt_file_is_ignored_and_rewritten(auto, content):
    auto.write_text(content)
    stub = Stub(True)
    assert gemv.choose((16, 32), calibrate_fn=stub) is True
    assert len(stub.calls) == 1
    assert json.loads(auto.read_text())["version"] == 1


def test_an_unwritable_cache_keeps_the_verdict_in_memory(auto, tmp_path, monkeypatch):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("OFFLOAD_MOE_CACHE_DIR", str(blocker / "below"))  # a folder under a file: cannot be made
    stub = Stub(True)
    assert gemv.choose((16, 32), calibrate_fn=stub) and gemv.choose((16, 32), calibrate_fn=stub)
    assert len(stub.calls) == 1


def test_use_follows_the_mode_and_the_verdict(auto, monkeypatch):
    stub = Stub(False)
    monkeypatch.setattr(gemv, "calibrate", stub)
    w, x = bf16(16, 32), bf16(1, 32)
    assert not gemv.use(x, w) and len(stub.calls) == 1
    assert not gemv.use(x.float(), w.float()) and not gemv.use(bf16(8, 32), w) and len(stub.calls) == 1
    assert not gemv.use(bf16(3, 32), w) and not gemv.use(bf16(2, 32), w)
    assert stub.calls == [((16, 32), False, 1), ((16, 32), False, 4)]  # 2 and 3 tokens share the verdict at 4
    monkeypatch.setenv(gemv.ENV, "on")
    assert gemv.use(x, w)
    monkeypatch.setenv(gemv.ENV, "off")
    assert not gemv.use(x, w)


def test_prepare_settles_each_shape_at_load(auto, monkeypatch):
    stub = Stub(True)
    monkeypatch.setattr(gemv, "calibrate", stub)
    shapes = {"gate_up_proj": (32, 16), "down_proj": (16, 16), "down_proj_bias": (16,)}
    transposed = ExpertMLP(gated=True, transposed=True, activation=F.silu)
    kernels.prepare_cpu_kernels([transposed, transposed], shapes, torch.float32, torch.device("cpu"))
    assert stub.calls == []  # f32 experts: MKL's GEMV already reads at the bound
    kernels.prepare_cpu_kernels([transposed, transposed], shapes, torch.bfloat16, torch.device("cpu"))
    assert sorted(stub.calls) == [((16, 16), True, 1), ((16, 16), True, 4), ((32, 16), True, 1), ((32, 16), True, 4)]
    stub.calls.clear()
    plain = ExpertMLP(gated=True, transposed=False, activation=F.silu)
    kernels.prepare_cpu_kernels([plain], shapes, torch.bfloat16, torch.device("cpu"))
    halves = [((16, 16), False, 1), ((16, 16), False, 4)]  # down_proj, and gate or up alone (mapped row blocks)
    assert sorted(stub.calls) == halves + [((32, 16), False, 1), ((32, 16), False, 4)]


def test_calibration_times_torch_then_ours_each_round():
    """A stubbed timer: each of torch's passes takes 3 ticks and each of ours 2 (the calls alternate, torch's
    first), so ours is 1.5x faster; then the other way round."""
    if not gemv.available():
        pytest.skip("needs numba")

    def timer_of(torch_ticks, our_ticks):
        steps = iter([torch_ticks, our_ticks] * 100)
        clock, started = [0.0], [False]

        def timer():
            if started[0]:  # the end of a pass
                clock[0] += next(steps)
            started[0] = not started[0]
            return clock[0]
        return timer

    found = gemv.calibrate((16, 32), timer=timer_of(3, 2), working_set=1, rounds=3)
    assert found == {"gemv": True, "speedup": 1.5, "rounds": 3}
    found = gemv.calibrate((32, 16), transposed=True, tokens=4, timer=timer_of(2, 3), working_set=1, rounds=3)
    assert found["gemv"] is False and found["speedup"] == pytest.approx(0.667)


def test_a_real_calibration_gives_a_verdict():
    """Unstubbed, on a tiny weight: only the form of the answer is checked (its verdict is the machine's)."""
    if not gemv.available():
        pytest.skip("needs numba")
    found = gemv.calibrate((24, 40), tokens=4, working_set=2**16, rounds=2)
    assert isinstance(found["gemv"], bool) and found["speedup"] > 0 and found["rounds"] == 2


def test_a_weight_larger_than_the_working_set_is_timed_on_its_first_rows(monkeypatch):
    """An lm_head [vocab, H] is not copied whole at load: each copy timed holds the rows that fill the working set."""
    if not gemv.available():
        pytest.skip("needs numba")
    timed = []
    real = gemv.bf16_linear
    monkeypatch.setattr(gemv, "bf16_linear", lambda x, w, *a, **k: timed.append(tuple(w.shape)) or real(x, w, *a, **k))
    gemv.calibrate((4096, 64), working_set=64 * 64 * 2, rounds=1)  # two copies of 32 rows fill the working set
    assert set(timed) == {(32, 64)}
    timed.clear()
    gemv.calibrate((4096, 64), transposed=True, working_set=64 * 64 * 2, rounds=1)  # [in, out]: fewer inputs
    assert set(timed) == {(32, 64)}
    timed.clear()
    gemv.calibrate((24, 40), working_set=2**16, rounds=1)  # smaller: whole, in copies
    assert set(timed) == {(24, 40)}


@needs_numba
def test_calls_from_several_threads_at_once_are_served_one_at_a_time():
    """numba's workqueue pool aborts the process if two threads launch kernels at once: gemv serialises them."""
    from concurrent.futures import ThreadPoolExecutor

    w, x = bf16(200, 64), bf16(1, 64, seed=1)
    want = gemv.bf16_linear(x, w)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: gemv.bf16_linear(x, w), range(64)))
    assert all(torch.equal(r, want) for r in results)


def test_a_process_short_of_memory_keeps_torchs_kernel_untimed_and_saves_no_verdict(monkeypatch, tmp_path):
    """Timing allocates CALIBRATION_BYTES of weights: a process near its memory limit (a cgroup) would be killed
    by it, so it keeps torch's kernel, and the verdict is left for a process with room."""
    monkeypatch.setenv("OFFLOAD_MOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gemv, "_verdicts", {})
    monkeypatch.setattr(gemv.memory, "memory_room", lambda: MemoryRoom(300 * 2**20, "cgroup memory.max 1.00 GiB"))
    monkeypatch.setattr(gemv, "calibrate", lambda *a, **k: pytest.fail("timed with 300 MiB of room"))
    assert gemv.choose((4096, 1024)) is False
    assert not (tmp_path / "kernels.json").exists()
    monkeypatch.setattr(gemv.memory, "memory_room", lambda: MemoryRoom(8 * 2**30, "MemAvailable"))
    monkeypatch.setattr(gemv, "_verdicts", {})
    monkeypatch.setattr(gemv, "calibrate", lambda *a, **k: {"gemv": True, "speedup": 1.5, "rounds": 5})
    assert gemv.choose((4096, 1024)) is True
    assert (tmp_path / "kernels.json").exists()
