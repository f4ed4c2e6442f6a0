"""The offload-moe command: --help, --version, demo, plan, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from offload_moe import __version__
from offload_moe.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_help_lists_commands_with_examples():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "demo" in result.output and "plan" in result.output
    for command in ("demo", "plan"):
        sub = runner.invoke(app, [command, "--help"])
        assert sub.exit_code == 0 and "Example:" in sub.output


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


def test_errors_are_one_line_without_traceback(tmp_path):
    result = run_cli("plan", str(tmp_path / "missing"), "--device-memory", "1GiB")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    debug = run_cli("--debug", "plan", str(tmp_path / "missing"), "--device-memory", "1GiB")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_model_that_does_not_fit_exits_nonzero(model_dir):
    result = run_cli("plan", str(model_dir("mixtral")), "--device-memory", "1MiB")
    assert result.returncode == 1 and "does not fit" in result.stderr


def test_profiles_command_and_plan_with_profile(model_dir):
    result = runner.invoke(app, ["profiles"])
    assert result.exit_code == 0 and "gpu-24gb" in result.output
    result = runner.invoke(app, ["plan", str(model_dir("mixtral")), "--profile", "gpu-12gb"])
    assert result.exit_code == 0, result.output
    assert "bfloat16" in result.output


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


def test_generate_streams_and_reports(tmp_path):
    result = runner.invoke(app, ["generate", "--prompt", "import os", "--max-new-tokens", "6", "--cache-experts", "24"])
    assert result.exit_code == 0 and result.output.startswith("import os")


def test_generate_needs_a_tokenizer(model_dir):
    result = run_cli("generate", str(model_dir("mixtral")), "--prompt", "hi")
    assert result.returncode == 1 and "tokenizer" in result.stderr and "Traceback" not in result.stderr
