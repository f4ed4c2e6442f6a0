"""llama.cpp as a peer: build it once, convert a checkpoint to GGUF, time its decode with llama-bench.

    python -m benchmarks.peers.llama_cpp build                       # ~/.cache/offload-moe/llama.cpp/<version>
    python -m benchmarks.peers.llama_cpp convert FOLDER --type q4_0  # FOLDER/../NAME-q4_0.gguf
    python -m benchmarks.peers.llama_cpp bench MODEL.gguf --threads 2 --tokens 16
    python -m benchmarks.peers.llama_cpp build-server                # llama-server too (for benchmarks/serve.py)

``build-server`` adds ``llama-server`` to a build: it configures the build again with the server on and builds
that one target, which needs the multimodal library (``mtmd``) too: about 50 minutes on 2 busy cores, no
network (the server's web UI, downloaded where there is a network, is left out).

``build`` needs the package index once: it fetches the ``llama-cpp-python`` source distribution (which vendors
llama.cpp with ``convert_hf_to_gguf.py``) with ``pip download``, installs what conversion imports and the build
tools that are missing (``cmake``, ``ninja``, ``sentencepiece``: ``pip install``), and builds ``llama-bench``
and ``llama-quantize`` in the cache folder. A second call finds them and does nothing. Conversion and timing
need no network. The converter imports the ``gguf`` package vendored beside it (``gguf-py``), not an installed
one, so that it matches the converter.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python; vendors llama.cpp commit 0c1e570
TARGETS = ("llama-bench", "llama-quantize")  # llama-cli needs the server's build in this version: not built
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF")
CONVERT_TYPES = ("f16", "bf16")  # written by convert_hf_to_gguf.py itself
# written by llama-quantize from the f16 file: its q8_0 is the converter's (round to nearest, blocks of 32), in C
QUANTIZE_TYPES = ("q8_0", "q4_0", "q4_k_m", "q5_0", "q6_k")
CONVERSION_MODULES = {"sentencepiece": "sentencepiece"}  # module -> package; numpy, torch, transformers: ours


def default_cache_dir(version: str = VERSION) -> Path:
    return Path.home() / ".cache" / "offload-moe" / "llama.cpp" / version


@dataclass(frozen=True)
class LlamaCpp:
    """A llama.cpp build in ``root`` (one cache folder per version)."""

    root: Path
    version: str = VERSION

    @property
    def sdist(self) -> Path:
        return self.root / f"llama_cpp_python-{self.version}.tar.gz"

    @property
    def source(self) -> Path:
        return self.root / f"llama_cpp_python-{self.version}" / "vendor" / "llama.cpp"

    @property
    def build_dir(self) -> Path:
        return self.root / "build"

    def binary(self, name: str) -> Path:
        return self.build_dir / "bin" / name

    @property
    def convert_script(self) -> Path:
        return self.source / "convert_hf_to_gguf.py"

    @property
    def built(self) -> bool:
        return all(self.binary(t).exists() for t in TARGETS) and self.convert_script.exists()

    def commit(self) -> str:
        """The llama.cpp commit built, as its build info records it (``unknown`` before the build)."""
        info = self.build_dir / "common" / "build-info.cpp"
        m = re.search(r'LLAMA_COMMIT\s*=\s*"([^"]+)"', info.read_text()) if info.exists() else None
        return m[1] if m else "unknown"


SERVER = "llama-server"


# -- command lines (pure: tested without a build) ------------------------------------------------------------
def download_command(version: str, dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
            f"llama-cpp-python=={version}", "-d", str(dest)]


def configure_command(llama: LlamaCpp) -> list[str]:
    return ["cmake", "-S", str(llama.source), "-B", str(llama.build_dir), "-G", "Ninja", *CMAKE_FLAGS]


def build_command(llama: LlamaCpp, jobs: int) -> list[str]:
    return ["cmake", "--build", str(llama.build_dir), "-j", str(jobs), "--target", *TARGETS]


def server_build_commands(llama: LlamaCpp, jobs: int) -> list[list[str]]:
    """Configure the build with the server on, then build ``llama-server``."""
    return [["cmake", "-S", str(llama.source), "-B", str(llama.build_dir), "-DLLAMA_BUILD_SERVER=ON"],
            ["cmake", "--build", str(llama.build_dir), "-j", str(jobs), "--target", SERVER]]


def server_command(llama: LlamaCpp, model: Path, *, port: int, threads: int, parallel: int,
                   context: int) -> list[str]:
    """llama-server on 127.0.0.1:``port`` with ``parallel`` slots (continuous batching, its default) of ``context``
    tokens each, ``threads`` threads, no web UI."""
    return [str(llama.binary(SERVER)), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(threads), "-np", str(parallel), "-c", str(parallel * context), "--no-webui"]


def convert_command(llama: LlamaCpp, hf_folder: Path, out: Path, outtype: str) -> list[str]:
    return [sys.executable, str(llama.convert_script), str(hf_folder), "--outfile", str(out), "--outtype", outtype]


def quantize_command(llama: LlamaCpp, source: Path, out: Path, qtype: str, threads: int) -> list[str]:
    return [str(llama.binary("llama-quantize")), str(source), str(out), qtype.upper(), str(threads)]


def bench_command(llama: LlamaCpp, model: Path, *, threads: int, tokens: int, repeats: int = 1,
                  warmup: bool = True, extra: tuple[str, ...] = ()) -> list[str]:
    """llama-bench decoding ``tokens`` tokens (no prompt) ``repeats`` times with ``threads`` threads, as JSON;
    ``extra``: more llama-bench options (``("--repack", "0")``)."""
    command = [str(llama.binary("llama-bench")), "-m", str(model), "-p", "0", "-n", str(tokens),
               "-t", str(threads), "-r", str(repeats), "-o", "json", *extra]
    return command if warmup else [*command, "--no-warmup"]


def parse_bench(text: str) -> dict:
    """llama-bench's JSON output (``-o json``) -> the decode test's tokens/s and what it ran on.

    ``tokens_per_s`` is llama-bench's mean over its repetitions; ``samples_tokens_per_s`` each one."""
    start = text.find("[")
    if start < 0:
        raise ValueError("no JSON array in llama-bench's output; was it run with -o json?")
    tests = [t for t in json.loads(text[start:]) if t.get("n_gen", 0) > 0 and t.get("n_prompt", 0) == 0]
    if not tests:
        raise ValueError("llama-bench's output has no decode test (n_gen > 0, n_prompt 0)")
    t = tests[0]
    return {"tokens": t["n_gen"], "tokens_per_s": t["avg_ts"], "s_per_token": 1.0 / t["avg_ts"],
            "samples_tokens_per_s": t["samples_ts"], "threads": t["n_threads"], "model_type": t["model_type"],
            "model_bytes": t["model_size"], "build_commit": t["build_commit"], "cpu": t.get("cpu_info", ""),
            "load_mode": t.get("load_mode"), "repack": t.get("repack")}


# -- build ----------------------------------------------------------------------------------------------------
def build(cache_dir: str | Path | None = None, *, version: str = VERSION, jobs: int | None = None) -> LlamaCpp:
    """Build llama.cpp's ``llama-bench`` and ``llama-quantize`` from the ``llama-cpp-python`` source distribution
    into ``cache_dir`` (default ``~/.cache/offload-moe/llama.cpp/<version>``); returns the build. Does nothing
    when they are built. Network: the package index, once (``pip download``, ``pip install``)."""
    llama = LlamaCpp(Path(cache_dir).expanduser() if cache_dir else default_cache_dir(version), version)
    if llama.built:
        return llama
    llama.root.mkdir(parents=True, exist_ok=True)
    if not llama.source.exists():
        if not llama.sdist.exists():
            _run(download_command(version, llama.root), "downloading the llama-cpp-python source distribution")
        with tarfile.open(llama.sdist) as tar:
            tar.extractall(llama.root, filter="data")
        if not llama.convert_script.exists():
            raise SystemExit(f"{llama.sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py inside; pick a "
                             "llama-cpp-python version that vendors llama.cpp's converter")
    ensure_tools()
    log = llama.root / "build.log"
    print(f"building llama.cpp {version} in {llama.build_dir} (log: {log}); about 10 minutes on 2 cores",
          file=sys.stderr)
    _run_logged([configure_command(llama), build_command(llama, jobs or os.cpu_count() or 2)], log, "llama.cpp")
    return llama


def build_server(llama: LlamaCpp, *, jobs: int | None = None) -> Path:
    """Build ``llama-server`` in ``llama``'s build (once); returns the binary."""
    binary = llama.binary(SERVER)
    if binary.exists():
        return binary
    if not llama.built:
        raise SystemExit(f"llama.cpp is not built in {llama.root}; run: python -m benchmarks.peers.llama_cpp build")
    log = llama.root / "build.log"
    print(f"building {SERVER} in {llama.build_dir} (log: {log}); about 50 minutes on 2 busy cores", file=sys.stderr)
    _run_logged(server_build_commands(llama, jobs or os.cpu_count() or 2), log, SERVER)
    return binary


def _run_logged(commands: list[list[str]], log: Path, what: str) -> None:
    """Run ``commands`` in turn, their output appended to ``log``; the first that fails stops with its last lines."""
    with open(log, "a") as out:
        for command in commands:
            out.write("$ " + " ".join(command) + "\n")
            out.flush()
            if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"building {what} failed: {' '.join(command)}; the last lines of {log}:\n"
                                 + "".join(log.read_text().splitlines(keepends=True)[-20:]))


def missing_conversion_packages() -> list[str]:
    """The packages the converter imports that this environment lacks."""
    return [pkg for module, pkg in CONVERSION_MODULES.items() if importlib.util.find_spec(module) is None]


def ensure_tools() -> None:
    """``pip install`` what the build and the converter need and this environment lacks."""
    missing = [tool for tool in ("cmake", "ninja") if shutil.which(tool) is None]
    missing += missing_conversion_packages()
    if missing:
        _run([sys.executable, "-m", "pip", "install", *missing], f"installing {', '.join(missing)}")


def _run(command: list[str], what: str) -> None:
    print(f"{what}: {' '.join(command)}", file=sys.stderr)
    if subprocess.run(command).returncode:
        raise SystemExit(f"{what} failed: {' '.join(command)}")


# -- convert ----------------------------------------------------------------------------------------------------
def gguf_path(hf_folder: Path, gguf_type: str, out_dir: Path | None = None) -> Path:
    return (out_dir or hf_folder.parent) / f"{hf_folder.name}-{gguf_type}.gguf"


def convert(llama: LlamaCpp, hf_folder: str | Path, gguf_type: str, *, out: str | Path | None = None,
            threads: int = 2) -> Path:
    """Convert the transformers checkpoint at ``hf_folder`` to GGUF of ``gguf_type`` (f16 and bf16 by the
    converter; q8_0, q4_0 and the k-quants by llama-quantize from the f16 file, which is made first); returns
    the file. Skips a file that exists. The folder needs a tokenizer the converter takes: see
    ``benchmarks.peers.synthetic.prepare`` for synthetic checkpoints."""
    hf_folder = Path(hf_folder)
    out = Path(out) if out else gguf_path(hf_folder, gguf_type)
    if not out.exists() and missing_conversion_packages():  # llama.cpp built from another environment
        ensure_tools()
    if out.exists():
        return out
    if not llama.built:
        raise SystemExit(f"llama.cpp is not built in {llama.root}; run: python -m benchmarks.peers.llama_cpp build")
    tmp = out.with_name(f".{out.name}.partial")
    if gguf_type in CONVERT_TYPES:
        _run(convert_command(llama, hf_folder, tmp, gguf_type), f"converting {hf_folder} to {gguf_type}")
    elif gguf_type in QUANTIZE_TYPES:
        f16 = convert(llama, hf_folder, "f16", out=out.with_name(f"{hf_folder.name}-f16.gguf"), threads=threads)
        _run(quantize_command(llama, f16, tmp, gguf_type, threads), f"quantizing {f16.name} to {gguf_type}")
    else:
        raise SystemExit(f"GGUF type {gguf_type!r}: use one of {', '.join(CONVERT_TYPES + QUANTIZE_TYPES)}")
    os.replace(tmp, out)
    return out


# -- bench ------------------------------------------------------------------------------------------------------
def bench(llama: LlamaCpp, model: str | Path, *, threads: int, tokens: int, repeats: int = 1,
          memory_limit: int | None = None, extra: tuple[str, ...] = ()) -> dict:
    """Time llama.cpp's decode of ``model``: llama-bench, ``tokens`` tokens, ``repeats`` times (after its warmup).
    ``memory_limit``: run it in a fresh memory cgroup of that many bytes. Returns ``parse_bench``'s dict, or
    ``{"error": ...}`` if llama-bench failed (killed for memory, say)."""
    from benchmarks.cgroups import run_limited

    command = bench_command(llama, Path(model), threads=threads, tokens=tokens, repeats=repeats, extra=extra)
    done = run_limited(command, memory_limit)
    if done.returncode != 0:
        return {"error": done.error("llama-bench exit status", tail=3), "peak_bytes": done.peak_bytes}
    result = parse_bench(done.stdout)
    result["peak_bytes"] = done.peak_bytes
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", help="the build's folder (default ~/.cache/offload-moe/llama.cpp/VERSION)")
    parser.add_argument("--version", default=VERSION, help="llama-cpp-python version whose llama.cpp is built")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download, build (once)")
    b.add_argument("--jobs", type=int, help="parallel compile jobs (default: the CPU count)")
    bs = sub.add_parser("build-server", help="add llama-server to the build (once)")
    bs.add_argument("--jobs", type=int, help="parallel compile jobs (default: the CPU count)")
    c = sub.add_parser("convert", help="a transformers checkpoint folder to GGUF")
    c.add_argument("folder")
    c.add_argument("--type", default="f16", choices=CONVERT_TYPES + QUANTIZE_TYPES)
    c.add_argument("--out", help="the .gguf file (default: beside the folder, NAME-TYPE.gguf)")
    c.add_argument("--synthetic", action="store_true",
                   help="first give a synthetic Mixtral checkpoint the hub's names and a synthetic tokenizer")
    t = sub.add_parser("bench", help="decode tokens/s of a GGUF file")
    t.add_argument("model")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--tokens", type=int, default=16)
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--memory-limit", help="run in a memory cgroup of this size (4GiB)")
    args = parser.parse_args(argv)
    root = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir(args.version)
    if args.command == "build":
        llama = build(root, version=args.version, jobs=args.jobs)
        print(f"llama.cpp {llama.commit()} built in {llama.build_dir / 'bin'}")
    elif args.command == "build-server":
        print(build_server(LlamaCpp(root, args.version), jobs=args.jobs))
    elif args.command == "convert":
        if args.synthetic:
            from benchmarks.peers.synthetic import prepare

            prepare(args.folder)
        print(convert(LlamaCpp(root, args.version), args.folder, args.type, out=args.out))
    else:
        from offload_moe.values import parse_bytes

        limit = parse_bytes(args.memory_limit, "--memory-limit") if args.memory_limit else None
        result = bench(LlamaCpp(root, args.version), args.model, threads=args.threads, tokens=args.tokens,
                       repeats=args.repeats, memory_limit=limit)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
