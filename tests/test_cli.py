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
    result = runner.invoke(app, ["demo", "--tokens", "6"])
    assert result.exit_code == 0, result.output
    assert "expert cache" in result.output and "misses" in result.output and "8 of 32" in result.output


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
