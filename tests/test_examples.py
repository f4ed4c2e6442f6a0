"""scripts/update_examples.py: example outputs in the docs are generated from the code and checked for drift."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("update_examples", ROOT / "scripts" / "update_examples.py")
examples = importlib.util.module_from_spec(spec)
sys.modules["update_examples"] = examples  # its dataclass looks its module up
spec.loader.exec_module(examples)

DEMO = "\"$(python -c 'import offload_moe; print(offload_moe.demo_model_path())')\""
PLAN = f"plan {DEMO} --device-memory 1GiB"


@pytest.mark.slow
def test_a_stale_or_missing_block_is_listed_then_rewritten(tmp_path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\nbefore\n\n<!-- example: offload-moe profiles -->\n```text\n$ offload-moe profiles\nstale\n"
                   f"```\n\nmiddle\n\n<!-- example: offload-moe {PLAN} -->\n\nafter\n")
    assert examples.main(["--check", str(doc)]) == 1
    err = capsys.readouterr().err
    assert f"{doc}:5" in err and f"{doc}:13" in err
    assert "stale" in doc.read_text()  # --check changes nothing
    assert examples.main([str(doc)]) == 0
    text = doc.read_text()
    assert "stale" not in text and "gpu-8gb: cuda, 6.5GiB device memory" in text
    assert f"$ offload-moe {PLAN}\n" in text and "expert slots: 96 of 96" in text
    assert text.startswith("# Title\n\nbefore\n\n") and "\n\nmiddle\n\n" in text and text.endswith("\n\nafter\n")
    assert str(ROOT) not in text  # the repository's path is written as "..."
    assert examples.main(["--check", str(doc)]) == 0


def test_only_speed_figures_are_normalised():
    shown = ["4 tokens in 0.07 s (60.5 tokens/s); expert cache 24 of 96: 32 hits, 24 misses"]
    assert examples.normalised(shown) == examples.normalised(
        ["4 tokens in 1.93 s (2.1 tokens/s); expert cache 24 of 96: 32 hits, 24 misses"])
    assert examples.normalised(shown) != examples.normalised(
        ["4 tokens in 0.07 s (60.5 tokens/s); expert cache 24 of 96: 31 hits, 25 misses"])
    assert examples.normalised(["expert slots: 12 of 12"]) == ["expert slots: 12 of 12"]


def test_a_marked_block_in_a_copy_of_the_readme_changes_only_that_block(tmp_path):
    original = (ROOT / "README.md").read_text()
    lines = [line for line in original.split("\n") if not line.startswith("<!-- example:")]  # only ours is marked
    cut = next(i for i, line in enumerate(lines) if line.startswith("## "))
    stale = ["<!-- example: offload-moe profiles -->", "```text", "$ offload-moe profiles", "old", "```", ""]
    copy = tmp_path / "README.md"
    copy.write_text("\n".join(lines[:cut] + stale + lines[cut:]))
    assert examples.main([str(copy)]) == 0
    new = copy.read_text().split("\n")
    block_end = new.index("```", cut + 2)
    assert new[:cut] == lines[:cut] and new[block_end + 2:] == lines[cut:]
    assert new[cut + 2] == "$ offload-moe profiles" and "old" not in new[cut:block_end]


@pytest.mark.slow
def test_a_command_that_fails_is_reported_unless_its_exit_code_is_marked(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- example: offload-moe plan /no/such/model --device-memory 1GiB -->\n")
    with pytest.raises(SystemExit, match="exited 1, not 0"):
        examples.main([str(doc)])
    doc.write_text("<!-- example: offload-moe plan /no/such/model --device-memory 1GiB exit=1 -->\n")
    assert examples.main([str(doc)]) == 0
    assert "does not exist" in doc.read_text()


@pytest.mark.slow
def test_the_docs_examples_have_not_drifted():
    assert examples.main(["--check"]) == 0


def test_a_block_whose_output_varies_is_rewritten_but_not_checked(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- example: offload-moe --version varies -->\n```text\n$ offload-moe --version\nold\n```\n")
    assert examples.main(["--check", str(doc)]) == 0  # not compared
    assert examples.main([str(doc)]) == 0
    assert "old" not in doc.read_text() and "offload-moe " in doc.read_text()
