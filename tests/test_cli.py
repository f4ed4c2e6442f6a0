"""The offload-moe command: --help, --version, demo, plan, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from offload_moe import __version__
from offload_moe.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


COMMANDS = [["demo"], ["plan"], ["generate"], ["chat"], ["verify"], ["quantize"], ["profiles"], ["profile"], ["trace"],
            ["trace", "record"], ["trace", "synth"], ["trace", "show"]]


def test_help_lists_commands_with_examples():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "Example: offload-moe demo" in result.output
    for command in {c[0] for c in COMMANDS}:
        assert command in result.output, command
    for command in COMMANDS:
        sub = runner.invoke(app, [*command, "--help"])
        assert sub.exit_code == 0 and "Example: offload-moe " + command[0] in sub.output, command


def test_demo_runs_and_prints_stats():
    from offload_moe.demo import DEMO_PROMPTS

    result = runner.invoke(app, ["demo", "--tokens", "4"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "expert cache" in out and "24 of 96" in out
    for row in ("hits", "misses", "hit rate", "evictions", "bytes loaded", "tokens/s"):
        assert row in out, row
    assert all(prompt.splitlines()[0] in out for prompt in DEMO_PROMPTS)  # the prompts were completed


def test_plan_prints_table(model_dir):
    result = runner.invoke(app, ["plan", str(model_dir("mixtral")), "--device-memory", "1GiB"])
    assert result.exit_code == 0, result.output
    assert "expert slots: 12 of 12" in result.output


def run_cli(*args):
    return subprocess.run([sys.executable, "-c", "from offload_moe.cli import main; main()", *args],
                          capture_output=True, text=True)


@pytest.mark.slow
def test_errors_are_one_line_without_traceback(tmp_path):
    result = run_cli("plan", str(tmp_path / "missing"), "--device-memory", "1GiB")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    debug = run_cli("--debug", "plan", str(tmp_path / "missing"), "--device-memory", "1GiB")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.slow
def test_model_that_does_not_fit_exits_nonzero(model_dir):
    result = run_cli("plan", str(model_dir("mixtral")), "--device-memory", "1MiB")
    assert result.returncode == 1 and "does not fit" in result.stderr


def test_profiles_command_and_plan_with_profile(model_dir):
    result = runner.invoke(app, ["profiles"])
    assert result.exit_code == 0 and "gpu-24gb" in result.output
    result = runner.invoke(app, ["plan", str(model_dir("mixtral")), "--profile", "gpu-12gb"])
    assert result.exit_code == 0, result.output
    assert "bfloat16" in result.output


@pytest.mark.slow
def test_verify_command(model_dir, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model_dir("mixtral"), folder)
    first = runner.invoke(app, ["verify", str(folder)])
    assert first.exit_code == 0 and "wrote checksums of 12 experts" in first.output
    again = runner.invoke(app, ["verify", str(folder)])
    assert again.exit_code == 0 and "all 12 experts match" in again.output
    from offload_moe.safetensors_io import read_header

    info = read_header(folder / "model.safetensors")["model.layers.0.block_sparse_moe.experts.3.w1.weight"]
    with open(folder / "model.safetensors", "r+b") as f:
        f.seek(info.offset)
        f.write(b"\xff\xff")
    bad = run_cli("verify", str(folder))
    assert bad.returncode == 1 and "expert 3 of layer 0 differs" in bad.stderr and "Traceback" not in bad.stderr


def test_generate_json_is_stable_and_has_stats():
    import json

    args = ["generate", "--prompt", "def read_lines(path):", "--max-new-tokens", "12", "--cache-experts", "24", "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    data = json.loads(first.output)
    assert data["new_tokens"] == 12 and data["text"] and data["tokens_per_s"] > 0
    assert data["stats"]["capacity_experts"] == 24 and data["stats"]["misses"] > 0
    again = json.loads(runner.invoke(app, args).output)
    assert again["text"] == data["text"]  # greedy: the same text every time
    mapped = json.loads(runner.invoke(app, [*args, "--io", "mmap"]).output)
    assert mapped["text"] == data["text"] and mapped["stats"]["io"] == "mmap"
    assert mapped["stats"]["mapped_experts"] == mapped["stats"]["misses"] > 0


@pytest.mark.slow
def test_threads_sets_the_compute_threads():
    import json

    result = run_cli("--threads", "1", "generate", "--prompt", "x = ", "--max-new-tokens", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["threads"] == 1
    bad = run_cli("--threads", "0", "plan")
    assert bad.returncode != 0 and "--threads" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_a_bad_io_mode_is_named():
    result = run_cli("generate", "--prompt", "x", "--io", "aio")
    assert result.returncode == 1 and "io='aio' is not an I/O mode" in result.stderr and "Traceback" not in result.stderr


def test_generate_streams_and_reports(tmp_path):
    result = runner.invoke(app, ["generate", "--prompt", "import os", "--max-new-tokens", "6", "--cache-experts", "24"])
    assert result.exit_code == 0 and result.stdout.startswith("import os")  # the load lines go to stderr


@pytest.mark.slow
def test_generate_needs_a_tokenizer(model_dir):
    result = run_cli("generate", str(model_dir("mixtral")), "--prompt", "hi")
    assert result.returncode == 1 and "tokenizer" in result.stderr and "Traceback" not in result.stderr


def test_plan_with_host_memory_and_json(model_dir):
    import json

    result = runner.invoke(app, ["plan", str(model_dir("mixtral")), "--device-memory", "1GiB", "--host-memory", "1GiB"])
    assert result.exit_code == 0, result.output
    # every expert fits in the device slots: no host tier is reserved
    assert "host tier: none" in result.output and "experts read from disk on a miss: 0" in result.output
    data = json.loads(runner.invoke(app, ["plan", str(model_dir("mixtral")), "--device-memory", "1GiB", "--json"]).output)
    assert data["expert_slots"] == 12 and data["host_slots"] == 0 and data["fits"] is True


def test_profiles_shows_one_profile_in_full():
    result = runner.invoke(app, ["profiles", "--profile", "gpu-8gb"])
    assert result.exit_code == 0 and "host_memory" in result.output and "16GiB" in result.output
    listing = runner.invoke(app, ["profiles"])
    for name in ("gpu-8gb", "gpu-16gb", "gpu-80gb", "cpu-16gb"):
        assert name in listing.output


@pytest.mark.slow
def test_profiles_and_version_as_subprocesses():
    assert __version__ in run_cli("--version").stdout
    listing = run_cli("profiles")
    assert listing.returncode == 0 and "cpu-32gb" in listing.stdout


def test_demo_takes_a_profile(tmp_path):
    profile = tmp_path / "box.toml"
    profile.write_text('description = "x"\ndevice = "cpu"\ndevice_memory = "1GiB"\n')
    result = runner.invoke(app, ["demo", "--tokens", "2", "--profile", str(profile)])
    assert result.exit_code == 0, result.output
    assert "24 of 96" in result.output  # the demo keeps its 25% cache whatever the profile's memory


# ---------------------------------------------------------------- traces and profiling


def hand_trace(path):
    """One layer, top-1, experts 0 1 0 2 0 1 2 2 1 0. With 2 slots, by hand:

    LRU hits at accesses 3, 5, 8, 9 (4); FIFO at 3, 8, 9 (3); LFU (ties to the least recently used)
    at 3, 5, 8 (3); Belady at 3, 5, 7, 8, 9 (5).
    """
    import json

    import torch

    from offload_moe.traces import Trace, save_trace

    experts = torch.tensor([0, 1, 0, 2, 0, 1, 2, 2, 1, 0], dtype=torch.int16).view(10, 1, 1)
    meta = {"model": "hand", "num_experts": "3", "top_k": "1", "layers": json.dumps([0]), "source": "by hand"}
    return save_trace(Trace(experts=experts, metadata=meta), path)


def test_profile_replays_a_hand_worked_trace(tmp_path):
    import csv
    import json

    trace = hand_trace(tmp_path / "hand.safetensors")
    out = tmp_path / "out"
    result = runner.invoke(app, ["profile", "--trace", str(trace), "--policies", "lru,fifo,lfu", "--capacities", "2",
                                 "--predictors", "none", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["results"]
    hits = {r["policy"]: r["hits"] for r in rows}
    assert hits == {"belady": 5, "lru": 4, "fifo": 3, "lfu": 3}
    assert {r["policy"]: r["misses_over_belady"] for r in rows}["lru"] == 6 / 5
    with open(out / "results.csv") as f:
        assert {r["policy"]: int(r["hits"]) for r in csv.DictReader(f)} == hits
    assert (out / "hit_rate.png").exists() and (out / "activations.png").exists()
    assert "Belady" in result.output and "1.20" in result.output  # the table's ratio to Belady


@pytest.mark.slow
def test_trace_synth_show_and_profile_as_subprocesses(tmp_path):
    path = tmp_path / "synth.safetensors"
    made = run_cli("trace", "synth", "--out", str(path), "--tokens", "300", "--layers", "4", "--experts", "8",
                   "--top-k", "2", "--skew", "1.5", "--locality", "0.5")
    assert made.returncode == 0, made.stderr
    assert "300 tokens x 4 layers x top-2 of 8 experts" in made.stdout
    shown = run_cli("trace", "show", str(path))
    assert shown.returncode == 0 and "skew=1.5" in shown.stdout and "repeat rate" in shown.stdout
    out = tmp_path / "results"
    profiled = run_cli("profile", "--trace", str(path), "--capacities", "25%,50%", "--out", str(out), "--no-plots")
    assert profiled.returncode == 0, profiled.stderr
    assert "transition" in profiled.stdout and (out / "results.json").exists() and not (out / "hit_rate.png").exists()


def test_profile_without_arguments_profiles_the_bundled_reference_trace(tmp_path):
    import json

    result = runner.invoke(app, ["profile", "--policies", "lru", "--capacities", "25%", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert {r["predictor"] for r in rows if r["policy"] == "lru"} == {"none", "transition", "gate", "hybrid"}
    assert all(r["capacity"] == 24 for r in rows)


@pytest.mark.slow
def test_trace_record_as_a_subprocess_and_profile_of_a_model(tmp_path):
    import json

    from offload_moe import demo_model_path
    from offload_moe.traces import load_trace

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def read_lines(path):\nimport os\n")
    out = tmp_path / "t.safetensors"
    recorded = run_cli("trace", "record", "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "3",
                       "--margin", "1")
    assert recorded.returncode == 0, recorded.stderr
    trace = load_trace(out)
    assert len(trace.sequences()) == 2 and trace.prediction_margin == 1 and trace.layers == list(range(6))
    assert "2 prompts from prompts.txt, 3 greedy tokens after each" in trace.metadata["source"]
    # profile MODEL records first; the hardware profile adds the capacity its device memory would give
    box = tmp_path / "box.toml"
    box.write_text('description = "x"\ndevice = "cpu"\ndevice_memory = "300MiB"\n')
    result = runner.invoke(app, ["profile", str(demo_model_path()), "--prompts", str(prompts), "--policies", "lru",
                                 "--capacities", "24", "--profile", str(box), "--out", str(tmp_path / "p"), "--no-plots"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p" / "trace.safetensors").exists()
    rows = json.loads((tmp_path / "p" / "results.json").read_text())["results"]
    assert {r["capacity"] for r in rows} == {24, 96}  # 300 MiB holds all 96 experts of the bundled model
    # a GPU profile on a machine without one still records (on the CPU) and adds the GPU's capacity
    result = runner.invoke(app, ["profile", str(demo_model_path()), "--prompts", str(prompts), "--policies", "lru",
                                 "--capacities", "24", "--profile", "gpu-8gb", "--out", str(tmp_path / "g"), "--no-plots"])
    assert result.exit_code == 0, result.output
    assert {r["capacity"] for r in json.loads((tmp_path / "g" / "results.json").read_text())["results"]} == {24, 96}


def test_profile_and_trace_errors_are_one_line(tmp_path):
    cases = [
        (["profile", "--trace", str(tmp_path / "missing.safetensors")], "does not exist"),
        (["profile", "somewhere", "--trace", "x.safetensors"], "not both"),
        (["profile", "somewhere"], "--prompts"),
        (["profile", "--capacities", "lots"], "neither a number"),
        (["profile", "--policies", "mru"], "unknown policies"),
        (["trace", "record", "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "t.safetensors")],
         "none.txt does not exist"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code != 0, args
        assert message in str(result.exception), (args, result.exception)
    bad = run_cli("profile", "--capacities", "lots", "--out", str(tmp_path))
    assert bad.returncode == 1 and "neither a number" in bad.stderr and "Traceback" not in bad.stderr
    # a run that fails leaves no empty output folder behind (it made it only to check it is writable)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f():\n")
    for args in (["profile", str(tmp_path / "no-model"), "--prompts", str(prompts), "--out", str(tmp_path / "new" / "p")],
                 ["trace", "record", str(tmp_path / "no-model"), "--prompts", str(prompts),
                  "--out", str(tmp_path / "new2" / "t.safetensors")]):
        result = runner.invoke(app, args)
        assert result.exit_code != 0 and "does not exist" in str(result.exception), (args, result.output)
    assert not (tmp_path / "new").exists() and not (tmp_path / "new2").exists()


@pytest.mark.slow
def test_demo_as_a_subprocess():
    result = run_cli("demo", "--tokens", "2")
    assert result.returncode == 0, result.stderr
    assert "24 of 96" in result.stdout and "hit rate" in result.stdout


@pytest.mark.slow
def test_brackets_in_messages_survive_the_terminal(tmp_path):
    """Rich markup must not eat text such as "offload_moe[plot]" or "[tokens, layers, top_k]"."""
    import json

    from safetensors.torch import save_file
    import torch

    bad = tmp_path / "bad.safetensors"
    save_file({"other": torch.zeros(1)}, bad, metadata={"model": "m"})
    result = run_cli("profile", "--trace", str(bad))
    assert result.returncode == 1 and "int16 [tokens, layers, top_k]" in result.stderr
    from offload_moe.traces import load_trace, save_trace

    odd = load_trace(hand_trace(tmp_path / "h.safetensors"))
    odd.metadata["model"] = "run[/]b [draft]"  # a folder name that looks like markup
    save_trace(odd, tmp_path / "odd.safetensors")
    shown = runner.invoke(app, ["profile", "--trace", str(tmp_path / "odd.safetensors"), "--capacities", "2",
                                "--out", str(tmp_path / "odd"), "--no-plots"])
    assert shown.exit_code == 0, shown.output
    assert "run[/]b [draft]" in shown.output.replace("\n", "")
    trace = hand_trace(tmp_path / "hand.safetensors")
    out = runner.invoke(app, ["profile", "--trace", str(trace), "--capacities", "2", "--policies", "lru",
                              "--out", str(tmp_path / "o")])
    assert out.exit_code == 0
    assert json.loads((tmp_path / "o" / "results.json").read_text())["results"]


def test_missing_matplotlib_message_keeps_the_extra_name(tmp_path, monkeypatch):
    import offload_moe.cli as cli
    import offload_moe.profiling as profiling

    real = profiling.write_results
    monkeypatch.setattr(cli, "write_results", lambda *a, **k: {**real(*a, **{**k, "plots": False}),
                                                                     "plots": "pip install 'offload_moe[plot]'"})
    trace = hand_trace(tmp_path / "hand.safetensors")
    result = runner.invoke(app, ["profile", "--trace", str(trace), "--capacities", "2", "--policies", "lru",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 0 and "offload_moe[plot]" in result.output


@pytest.mark.slow
def test_an_output_that_cannot_be_written_is_a_one_line_error_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("profile", "--out", str(blocker / "results"))
    assert result.returncode == 1 and "cannot write into" in result.stderr and "Traceback" not in result.stderr
    assert "replays" not in result.stdout  # it stopped before replaying
    result = run_cli("trace", "synth", "--out", str(blocker / "t.safetensors"), "--tokens", "4", "--layers", "2")
    assert result.returncode == 1 and "cannot write" in result.stderr


@pytest.mark.slow
def test_a_profile_given_before_the_command_applies_to_it(model_dir, tmp_path):
    import json

    box = tmp_path / "box.toml"
    box.write_text('description = "x"\ndevice = "cpu"\ndevice_memory = "300MiB"\nhost_memory = "1GiB"\n')
    result = runner.invoke(app, ["--profile", str(box), "plan", str(model_dir("mixtral")), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["device_memory"] == 300 * 2**20 and data["host_memory"] == 2**30  # both from the profile
    own = runner.invoke(app, ["--profile", str(box), "plan", str(model_dir("mixtral")), "--profile", "gpu-12gb", "--json"])
    assert json.loads(own.output)["device_memory"] == int(10.5 * 2**30)  # the command's own --profile wins
    later = runner.invoke(app, ["plan", str(model_dir("mixtral")), "--device-memory", "1GiB", "--json"])
    assert json.loads(later.output)["host_memory"] == 0  # a profile from an earlier invocation does not linger
    bad = run_cli("--profile", "no-such-profile", "profiles")
    assert bad.returncode == 1 and "no hardware profile named 'no-such-profile'" in bad.stderr


def test_profile_max_tokens_replays_the_start_of_the_trace(tmp_path):
    import json

    trace = hand_trace(tmp_path / "hand.safetensors")  # 0 1 0 2 0 1 2 2 1 0
    result = runner.invoke(app, ["profile", "--trace", str(trace), "--max-tokens", "5", "--capacities", "2",
                                 "--policies", "lru", "--out", str(tmp_path / "o"), "--no-plots"])
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "o" / "results.json").read_text())
    assert document["trace"]["tokens"] == 5
    assert {r["policy"]: r["hits"] for r in document["results"]} == {"belady": 2, "lru": 2}  # 0 1 0 2 0


@pytest.mark.slow
def test_a_bad_sampling_option_is_named_alone():
    result = run_cli("generate", "--prompt", "hi", "--top-p", "0")
    assert result.returncode == 2 and "'--top-p': 0.0 must be above 0" in result.stderr
    assert "temperature" not in result.stderr and "repetition" not in result.stderr
    result = run_cli("generate", "--prompt", "hi", "--repetition-penalty", "0")
    assert result.returncode == 2 and "'--repetition-penalty': 0.0 must be above 0" in result.stderr
    assert "top-p" not in result.stderr


# every numeric option of every command, with a value out of its range: a usage error, exit code 2
OUT_OF_RANGE = [
    (["demo"], "--tokens", "0"),
    (["plan", "m"], "--context", "-1"),
    *[(command, option, value) for command in (["generate", "-p", "x"], ["chat"])
      for option, value in (("--max-new-tokens", "0"), ("--temperature", "-1"), ("--top-p", "0"), ("--top-p", "1.5"),
                            ("--repetition-penalty", "0"), ("--cache-experts", "-5"), ("--cache-experts", "1"))],
    *[(["trace", "record", "--prompts", "p", "--out", "t"], option, value)
      for option, value in (("--max-new-tokens", "-1"), ("--margin", "-1"), ("--cache-experts", "-5"))],
    *[(["trace", "synth", "--out", "t"], option, value)
      for option, value in (("--tokens", "0"), ("--layers", "0"), ("--experts", "0"), ("--top-k", "0"), ("--skew", "-1"),
                            ("--locality", "1.5"), ("--sequences", "0"))],
    *[(["profile"], option, value)
      for option, value in (("--margin", "-1"), ("--max-new-tokens", "-1"), ("--workers", "0"), ("--max-tokens", "0"))],
]


@pytest.mark.parametrize("command, option, value", OUT_OF_RANGE)
def test_an_out_of_range_option_is_a_usage_error(command, option, value):
    result = runner.invoke(app, [*command, option, value])
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert f"Invalid value for '{option}'" in result.output


@pytest.mark.slow
def test_a_broken_config_json_is_named_not_blamed_on_the_tokenizer(model_dir, tmp_path):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(model_dir("mixtral"), folder)
    (folder / "config.json").write_text('{"model_type": ')
    result = run_cli("generate", str(folder), "--prompt", "hi")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "config.json is not valid JSON" in result.stderr and "tokenizer" not in result.stderr


@pytest.mark.slow
def test_generate_that_fails_to_load_prints_nothing_on_stdout(tmp_path):
    result = run_cli("generate", str(tmp_path / "missing"), "--prompt", "def f():")
    assert result.returncode == 1 and "does not exist" in result.stderr
    assert result.stdout == ""  # not the prompt, echoed before the load failed


def test_help_keeps_the_plot_extra_name():
    result = runner.invoke(app, ["profile", "--help"], terminal_width=200)
    assert result.exit_code == 0 and "offload_moe[plot]" in result.output  # not eaten as rich markup


def test_an_unexpected_exception_is_one_line_too():
    # A gap in the input checks must be ugly but never a traceback wall: patch one in and run the command.
    code = ("import offload_moe.hardware as h\n"
            "def boom(*a, **k): raise KeyError('patched in')\n"
            "h.list_profiles = boom\n"
            "from offload_moe.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code, "profiles"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "unexpected KeyError" in result.stderr and "--debug" in result.stderr
    debug = subprocess.run([sys.executable, "-c", code, "--debug", "profiles"], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "patched in" in debug.stderr


# ---------------------------------------------------------------- rough edges of a first hour (issue 14)


def run_cli_env(*args, **env):
    import os

    return subprocess.run([sys.executable, "-m", "offload_moe", *args], capture_output=True, text=True,
                          env={**os.environ, **env})


@pytest.mark.slow
def test_profiles_listing_cuts_no_value_at_80_columns_or_piped():
    import os

    from offload_moe.hardware import list_profiles

    piped = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    for env in ({"COLUMNS": "80"}, piped):
        result = subprocess.run([sys.executable, "-m", "offload_moe", "profiles"], capture_output=True, text=True,
                                env={**piped, **env})
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert max(len(line) for line in lines[2:]) <= 80  # the first line is the (machine-dependent) folder
        flat = " ".join(result.stdout.split())
        for p in list_profiles():
            prefetch = p.prefetch or "none"
            if prefetch != "none" and p.prefetch_margin is not None:
                prefetch += f" (margin {p.prefetch_margin})"
            assert any(line.startswith(f"{p.name}: {p.device}, {p.device_memory} device memory") for line in lines)
            assert any(f"io {p.io or 'auto'}, policy {p.policy or 'lru'}, prefetch {prefetch}" in line
                       for line in lines), p.name
            assert " ".join(p.description.split()) in flat, p.name
        assert "…" not in result.stdout


@pytest.mark.slow
def test_ctrl_c_during_a_multi_process_profile_exits_130_at_once(tmp_path):
    """Ctrl-C goes to the whole process group: the workers ignore it, the parent stops them and exits 130."""
    import os
    import signal
    import time

    import psutil

    from offload_moe.traces import save_trace, synthesize_trace

    trace = save_trace(synthesize_trace(tokens=20000, layers=16, num_experts=16, top_k=2, seed=0),
                       tmp_path / "big.safetensors")
    proc = subprocess.Popen([sys.executable, "-m", "offload_moe", "profile", "--trace", str(trace), "--workers", "2",
                             "--policies", "lru,lfu,fifo,random", "--out", str(tmp_path / "out"), "--no-plots"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:  # until both workers are replaying
            children = psutil.Process(proc.pid).children(recursive=True)
            if sum(c.cpu_times().user > 0.5 for c in children) >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)
        start = time.monotonic()
        _, stderr = proc.communicate(timeout=20)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert took < 5, took
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr


@pytest.mark.parametrize("option", [{"temperature": float("nan")}, {"temperature": float("inf")},
                                    {"repetition_penalty": float("nan")}, {"top_p": float("nan")}])
def test_generate_text_refuses_nan_and_infinite_sampling_before_loading(option):
    from offload_moe.errors import ConfigError
    from offload_moe.generation import generate_text, sampling_options
    from offload_moe.serve import Params

    name = next(iter(option))
    with pytest.raises(ConfigError, match=name):
        sampling_options(8, **{"temperature": 0.0, "top_p": 1.0, **option})
    with pytest.raises(ConfigError, match=name):
        generate_text("/nonexistent/model", "hi", **option)  # refused before the path is read
    with pytest.raises(ConfigError, match=name):
        Params(**option)


@pytest.mark.slow
def test_generate_refuses_a_prompt_longer_than_the_context():
    result = run_cli("generate", "--prompt", "def " + "very_long_name_" * 400)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "the prompt is" in result.stderr and "reads at most 1024" in result.stderr
    assert "Token indices sequence length" not in result.stderr
    assert result.stdout == ""


def test_generate_stops_at_the_end_of_the_context():
    import json

    from offload_moe import demo_model_path
    from offload_moe.generation import load_tokenizer

    prompt = "x = 1\n" * 250
    room = 1024 - len(load_tokenizer(demo_model_path())(prompt, verbose=False).input_ids)
    assert 0 < room < 200
    result = runner.invoke(app, ["generate", "--prompt", prompt, "--max-new-tokens", "200", "--json",
                                 "--repetition-penalty", "1", "--cache-experts", "96"])
    assert result.exit_code == 0, result.output
    assert 0 < json.loads(result.output)["new_tokens"] <= room


def test_hit_rate_plot_has_a_panel_per_predictor_and_its_legend_outside_them():
    from offload_moe.profiling import reference_trace_path as _reference_trace
    from offload_moe.profiling import default_predictors, sweep
    from offload_moe.profiling.results import _hit_rate_figure
    from offload_moe.traces import load_trace

    trace = load_trace(_reference_trace()).first(200)
    predictors = default_predictors(trace)
    assert len(predictors) == 4
    results = sweep(trace, policies=["lru", "lfu", "fifo", "random"], capacities=[12, 24, 48], predictors=predictors)
    figure = _hit_rate_figure(results, trace)
    figure.draw_without_rendering()  # lays the figure out
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["no prefetch", "prefetch: transition", "prefetch: gate",
                                                 "prefetch: hybrid"]
    assert all(len(ax.get_lines()) == 5 for ax in panels)  # four policies and Belady, one style each
    (legend,) = figure.legends
    assert len(legend.get_texts()) == 5
    box = legend.get_window_extent()
    assert not any(box.overlaps(ax.get_window_extent()) for ax in panels)


def test_help_shows_on_off_options_as_plain_flags(model_dir):
    import json

    for command in [[], *COMMANDS]:
        result = runner.invoke(app, [*command, "--help"], terminal_width=120)
        assert result.exit_code == 0, command
        valued = [line for line in result.output.splitlines() if "<bool>" in line and "--help" not in line]
        assert not valued, (command, valued)  # typer's own --help is the one left
    plan = runner.invoke(app, ["plan", str(model_dir("mixtral")), "--device-memory", "1GiB", "--json"])
    assert plan.exit_code == 0 and json.loads(plan.output)["expert_slots"] == 12


def test_demo_prints_the_exact_load_call_it_made_at_80_columns(monkeypatch):
    import ast

    import offload_moe.demo as demo

    made = {}
    real = demo.load

    def spy(folder, **options):
        made.update(options)
        return real(folder, **options)

    monkeypatch.setattr(demo, "load", spy)
    result = CliRunner().invoke(app, ["demo", "--tokens", "2"], terminal_width=80, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    tail = result.output.split("Load it yourself, with the demo's settings:\n", 1)[1].rstrip("\n")
    assert all(len(line) <= 80 for line in tail.splitlines()), tail
    call = ast.parse(tail, mode="eval").body
    assert ast.unparse(call.func) == "offload_moe.load" and ast.unparse(call.args[0]) == "offload_moe.demo_model_path()"
    shown = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    made.pop("progress")
    assert shown == made and shown["prefetch"] == "gate" and shown["prefetch_margin"] == 0


def test_trace_record_takes_cache_memory(tmp_path, monkeypatch):
    import offload_moe.generation as generation

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\n")
    seen = {}
    real = generation.load

    def spy(folder, **options):  # record_prompts loads through generation.load_with_tokenizer
        seen.update(options)
        return real(folder, **options)

    monkeypatch.setattr(generation, "load", spy)
    result = runner.invoke(app, ["trace", "record", "--prompts", str(prompts), "--out", str(tmp_path / "t.safetensors"),
                                 "--cache-memory", "40MiB"])
    assert result.exit_code == 0, result.output
    assert seen["config"].cache_memory == "40MiB"  # the command passes one OffloadConfig down
    both = runner.invoke(app, ["trace", "record", "--prompts", str(prompts), "--out", str(tmp_path / "u.safetensors"),
                               "--cache-memory", "40MiB", "--cache-experts", "24"])
    assert both.exit_code != 0 and "not both" in str(both.exception)


@pytest.mark.slow
def test_a_piped_load_prints_a_start_and_a_done_line_on_stderr():
    result = run_cli("generate", "--prompt", "import os", "--max-new-tokens", "2", "--cache-experts", "24")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    for what in ("dense weights",):  # with 24 of 96 experts in the cache, none is loaded up front
        assert any(line.startswith(f"loading {what} (") and line.endswith("...") for line in lines), lines
        assert any(line.startswith(f"loading {what}: done in ") for line in lines), lines
    assert result.stdout.startswith("import os")


@pytest.mark.slow
def test_plan_warns_of_a_host_tier_no_larger_than_the_device_slots():
    import json

    from offload_moe import demo_model_path, plan

    p = plan(demo_model_path(), device_memory="280MiB", host_memory="2MiB", dtype="float32")
    assert 0 < p.host_slots <= p.expert_slots < p.total_experts
    assert p.warnings and "adds nothing" in p.warnings[0] and "adds nothing" in str(p)
    result = run_cli("plan", str(demo_model_path()), "--device-memory", "280MiB", "--host-memory", "2MiB",
                     "--dtype", "float32")
    assert result.returncode == 0 and "warning:" in result.stderr and "adds nothing" in result.stderr
    useful = plan(demo_model_path(), device_memory="270MiB", host_memory="5MiB", dtype="float32")
    assert useful.host_slots > useful.expert_slots and useful.warnings == []
    data = json.loads(runner.invoke(app, ["plan", str(demo_model_path()), "--device-memory", "280MiB",
                                          "--host-memory", "2MiB", "--dtype", "float32", "--json"]).stdout)
    assert data["warnings"] == p.warnings


def test_plan_reserves_no_host_tier_when_every_expert_fits_and_kv_for_the_models_context_only():
    from offload_moe import demo_model_path, load, plan

    p = plan(demo_model_path(), profile="gpu-8gb")
    assert p.expert_slots == p.total_experts == 96
    assert p.host_slots == 0 and "host tier: none" in str(p)
    assert p.context_length == 1024 == p.model_context  # not the 4096 asked for by default
    assert p.kv_reserve_bytes == 1024 * p.kv_bytes_per_token
    assert plan(demo_model_path(), device_memory="1GiB", context_length=100).context_length == 100
    model = load(demo_model_path(), cache_experts=96, host_memory="1GiB", progress=False)
    try:
        assert model.offload.stats()["capacity_experts"] == 96
        assert model.offload.cache.host is None  # no pinned copy of experts the device already holds
    finally:
        model.offload.close()


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["chat"]])
def test_a_command_loads_with_one_config_from_its_profile_and_flags(tmp_path, monkeypatch, command):
    import offload_moe.generation as generation
    from offload_moe import OffloadConfig, OffloadMoEError

    box = tmp_path / "box.toml"
    box.write_text('description = "x"\ndevice = "cpu"\ndevice_memory = "1GiB"\npolicy = "fifo"\nio = "buffered"\n')
    seen = {}

    def spy(folder, **options):  # stops before loading: only the settings passed down matter here
        seen.update(options)
        raise OffloadMoEError("stopped by the test")

    monkeypatch.setattr(generation, "load", spy)  # generate and chat load through generation.load_with_tokenizer
    result = runner.invoke(app, ["--profile", str(box), *command, "--policy", "lru", "--cache-experts", "4"], input="")
    assert "stopped by the test" in str(result.exception)
    assert seen["config"] == OffloadConfig.from_profile(box, policy="lru", cache_experts=4)
    assert (seen["config"].policy, seen["config"].io, seen["config"].profile.name) == ("lru", "buffered", "box")


def test_verify_piped_prints_a_start_and_a_done_line(model_dir, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model_dir("mixtral"), folder)
    result = runner.invoke(app, ["verify", str(folder)])  # CliRunner's stderr is no terminal, as a pipe
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "hashing experts..." in lines and any(line.startswith("hashing experts: done in ") for line in lines), lines
