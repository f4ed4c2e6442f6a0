"""Regenerate the example outputs in README.md and docs/*.md from the code, or check that they have not drifted.

A block is marked by the line before it:

    <!-- example: offload-moe ARGS -->
    ```text
    $ offload-moe ARGS
    ...what the command printed...
    ```

The command runs as a user's shell would run it (so ``"$(python -c ...)"`` works), with ``offload-moe``
meaning ``python -m offload_moe`` from this repository, COLUMNS=80 and its output piped (not a terminal),
in a fresh empty folder that holds only ``demo_model``, a link to the bundled model (as docs/cli.md has
the reader make one), so what a command writes lands there and nowhere else. The block shows stdout and
stderr as they interleave (unbuffered), as a terminal would show them. The path of this repository is written as ``...`` and the folder's as ``.``, so no
machine's folder lands in the docs.

    python scripts/update_examples.py            # rewrite every marked block whose output drifted
    python scripts/update_examples.py --check    # exit 1, listing the blocks whose output drifted

``--check`` compares after one normalisation, the only one: figures that depend on the machine's speed,
a number before "tokens/s" and a number of seconds ("0.42 s", "in 3.1 s"), become "#". Everything else
(hits, misses, generated text, tables) must match exactly. A command that exits non-zero is reported
as a failure in both modes, unless the marker says ``exit=N`` after the command, e.g.
``<!-- example: offload-moe plan missing exit=1 -->``. A marker that ends in ``varies`` names output
that depends on thread timing (the demo's background prefetch moves its eviction count): it is
rewritten like the others but ``--check`` does not compare it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!-- example: offload-moe(?P<args>(?: .*?)?)(?: exit=(?P<exit>\d+))?(?P<varies> varies)? -->\s*$")
FENCE = "```"
TIMING = [re.compile(r"\d+(?:\.\d+)?(?= tokens/s)"), re.compile(r"\d+(?:\.\d+)?(?= s\b)")]


@dataclass
class Block:
    """A marked example: the file, the marker's line (0-based), the command's arguments, and the lines
    of the fenced block after the marker (``start``..``end``, the fences included; None when missing)."""

    path: Path
    marker: int
    args: str
    exit_code: int
    start: int | None
    end: int | None
    varies: bool = False  # timing-dependent output: rewritten, never compared by --check

    @property
    def where(self) -> str:
        return f"{self.path}:{self.marker + 1}"


def find_blocks(path: Path, lines: list[str]) -> list[Block]:
    """Every marked example in ``lines`` (the text of ``path``)."""
    blocks = []
    for i, line in enumerate(lines):
        match = MARKER.match(line)
        if not match:
            continue
        start = end = None
        if i + 1 < len(lines) and lines[i + 1].strip() == FENCE + "text":
            end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == FENCE), None)
            if end is None:
                raise SystemExit(f"{path}:{i + 2}: the ```text block after the example marker is never closed")
            start = i + 1
        blocks.append(Block(path, i, match["args"].strip(), int(match["exit"] or 0), start, end, bool(match["varies"])))
    return blocks


def run(args: str) -> tuple[int, str]:
    """Exit code and output of ``offload-moe ARGS`` as a shell runs it, at 80 columns, piped."""
    env = {**os.environ, "COLUMNS": "80", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("LINES", None)
    script = f'offload-moe() {{ "{sys.executable}" -m offload_moe "$@"; }}\noffload-moe {args}'
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "demo_model").symlink_to(ROOT / "offload_moe" / "demo_model")
        done = subprocess.run(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, cwd=work, timeout=600)
    output = done.stdout
    return done.returncode, output.replace(str(ROOT), "...").replace(work + os.sep, "").replace(work, ".")


def rendered(block: Block) -> list[str]:
    """The fenced block, as the command prints it today."""
    code, output = run(block.args)
    if code != block.exit_code:
        raise SystemExit(f"{block.where}: `offload-moe {block.args}` exited {code}, not {block.exit_code}:\n{output}")
    body = [line.rstrip() for line in output.rstrip("\n").split("\n")]
    return [FENCE + "text", f"$ offload-moe {block.args}".rstrip(), *body, FENCE]


def normalised(lines: list[str]) -> list[str]:
    """The lines with the machine-speed figures (before "tokens/s", before " s") replaced by "#"."""
    out = []
    for line in lines:
        for pattern in TIMING:
            line = pattern.sub("#", line)
        out.append(line)
    return out


def update(path: Path, check: bool) -> list[str]:
    """Rewrite the marked blocks of ``path`` (or, with ``check``, only compare them); the drifted blocks' places."""
    text = path.read_text()
    lines = text.split("\n")
    drifted = []
    for block in reversed(find_blocks(path, lines)):  # from the end, so earlier line numbers stay right
        if check and block.varies and block.start is not None:
            continue
        new = rendered(block)
        old = lines[block.start : block.end + 1] if block.start is not None else []
        if normalised(old) == normalised(new):
            continue  # a new timing alone is no reason to rewrite the docs
        drifted.append(block.where)
        if not check:
            lines[block.marker + 1 : (block.end + 1) if block.start is not None else block.marker + 1] = new
    if not check and "\n".join(lines) != text:
        path.write_text("\n".join(lines))
    return sorted(drifted)


def default_files() -> list[Path]:
    return [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if p.is_file()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="Markdown files; default: README.md and docs/*.md.")
    parser.add_argument("--check", action="store_true", help="Change nothing; exit 1 if a block's output drifted.")
    options = parser.parse_args(argv)
    drifted = []
    for path in options.files or default_files():
        drifted += update(path, options.check)
    if options.check and drifted:
        print("example outputs that drifted (run python scripts/update_examples.py):", file=sys.stderr)
        for where in drifted:
            print(f"  {where}", file=sys.stderr)
        return 1
    if not options.check and drifted:
        print(f"updated {len(drifted)} example block(s): {', '.join(drifted)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
