"""No code from a model folder runs unless the user asks (--trust-remote-code), and transformers' [y/N]
prompt never appears, even with "y" waiting on stdin."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import offload_moe
from offload_moe.cli import app
from offload_moe.errors import ModelPathError, UnsupportedModelError
from offload_moe.generation import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
PROMPT = "[y/N]"
runner = CliRunner()


def evil_code(folder: Path, marker: Path) -> None:
    """A Python file that, if ever imported, leaves ``marker`` behind (at an absolute path: transformers
    imports a copy of the file from its module cache)."""
    (folder / "evil.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('the model folder ran code')\n"
        "from transformers import PretrainedConfig, PreTrainedTokenizerFast\n"
        "class EvilConfig(PretrainedConfig):\n"
        "    model_type = 'evil_moe'\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n"
    )


@pytest.fixture
def evil_model(tmp_path):
    """A folder whose config has an unknown model_type and an auto_map naming its own Python file."""
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil_moe",
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
    }))
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)  # so nothing but the code stops a trusted load early
    evil_code(folder, tmp_path / "MARKER")
    return folder


@pytest.fixture
def evil_tokenizer(model_dir, tmp_path):
    """A real deepseek_v2 checkpoint (a family transformers has no tokenizer mapping for) whose
    tokenizer_config.json names a tokenizer class in the folder's own Python file."""
    folder = tmp_path / "deepseek"
    shutil.copytree(model_dir("deepseek_v2"), folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": [None, "evil.EvilTokenizer"]}}))
    evil_code(folder, tmp_path / "MARKER")
    return folder


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_MODULES_CACHE": str(home / "modules"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "offload_moe", *args], input="y\ny\ny\n", capture_output=True,
                          text=True, env=env, timeout=120)


def test_load_with_y_on_stdin_runs_no_code_and_never_asks(evil_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\ny\n"))
    with pytest.raises(UnsupportedModelError, match="config.json") as info:
        offload_moe.load(evil_model)
    assert "--trust-remote-code" in str(info.value) and "trust_remote_code=True" in str(info.value)
    with pytest.raises(UnsupportedModelError, match="config.json"):
        offload_moe.plan(evil_model, device_memory="1GiB")
    assert PROMPT not in capsys.readouterr().out
    assert not (tmp_path / "MARKER").exists()


def test_tokenizer_code_in_the_folder_is_not_run(evil_tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\ny\n"))
    with pytest.raises(ModelPathError, match="tokenizer"):
        load_tokenizer(evil_tokenizer)
    assert PROMPT not in capsys.readouterr().out
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("command", [
    ["verify"], ["plan", "--device-memory", "1GiB"], ["generate", "-p", "hi"], ["trace", "record"],
])
def test_cli_with_y_on_stdin_runs_no_code_and_never_asks(evil_model, tmp_path, command):
    (tmp_path / "prompts.txt").write_text("hello\n")
    extra = ["--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "t.safetensors")] \
        if command[0] == "trace" else []
    result = runner.invoke(app, [*command, str(evil_model), *extra], input="y\ny\ny\n")
    assert isinstance(result.exception, UnsupportedModelError), result.output
    assert "config.json" in str(result.exception) and "--trust-remote-code" in str(result.exception)
    assert PROMPT not in result.output
    assert not (tmp_path / "MARKER").exists()


def test_cli_generate_runs_no_tokenizer_code(evil_tokenizer, tmp_path):
    result = runner.invoke(app, ["generate", str(evil_tokenizer), "-p", "hi"], input="y\ny\ny\n")
    assert isinstance(result.exception, ModelPathError) and "tokenizer" in str(result.exception)
    assert PROMPT not in result.output
    assert not (tmp_path / "MARKER").exists()


def test_echo_y_into_verify_runs_no_code(evil_model, tmp_path):
    """The reported case, in a real process with a real stdin: `echo y | offload-moe verify DIR`."""
    result = run_cli("verify", str(evil_model), home=tmp_path)
    assert result.returncode == 1
    assert PROMPT not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert "config.json" in result.stderr and "--trust-remote-code" in result.stderr
    assert not (tmp_path / "MARKER").exists()


def test_trust_remote_code_is_passed_on_when_asked(evil_model, tmp_path):
    """With --trust-remote-code the folder's code does run (that is what the option is for): the marker appears."""
    result = run_cli("plan", str(evil_model), "--device-memory", "1GiB", "--trust-remote-code", home=tmp_path)
    assert result.returncode == 1  # evil.py defines no model class, so the load still fails, as one line
    assert PROMPT not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("command", [["verify"], ["plan"], ["generate"], ["chat"], ["profile"], ["trace", "record"]])
def test_the_option_says_it_runs_code_from_the_folder(command):
    out = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).output
    assert "--trust-remote-code" in out
    assert "Python code from the model folder" in " ".join(out.replace("│", " ").split())
