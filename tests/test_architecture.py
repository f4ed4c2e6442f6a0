"""The package's shape: no import circle among its modules, imports at the top of a file, public names kept."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import offload_moe

PACKAGE = Path(offload_moe.__file__).parent

# The only imports a function may make: optional dependencies, and heavy ones the CLI keeps lazy for its startup.
LAZY = {
    "transformers": "about 1 s to import; the CLI's --help and plan of a small model need not wait for it",
    "accelerate": "imports transformers' stack; only loading dense weights and synthetic checkpoints need it",
    "huggingface_hub": "only a hub id (not a folder) needs it",
    "matplotlib": "optional (pip install offload_moe[plot])",
    "scipy": "optional (the balanced router's assignment)",
    "readline": "optional: not on every platform",
    "fastapi": "optional (pip install offload_moe[serve]); the serve engine and the rest of the CLI run without it",
    "uvicorn": "optional (pip install offload_moe[serve]), as fastapi",
    "prometheus_client": "optional (pip install offload_moe[serve]), as fastapi",
    "numba": "optional (pip install offload_moe[fast]): about 0.5 s to import; only the fast replay engine and the bf16 "
             "GEMV compile with it",
    "offload_moe._gemv_numba": "the bf16 GEMV's kernels: imports numba (optional), and only bf16 experts on a CPU need it",
    "ray": "optional (pip install offload_moe[cluster], about 240 MB): only sweeps on Ray need it",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import statement of module ``name``, wherever it is:
    at the top, inside a function, or under ``if TYPE_CHECKING``. ``from .x import y`` names ``x.y`` when that is
    a module, else ``x``."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names]
        else:
            continue
        found += [(t, node.lineno, id(node) in in_function) for t in dict.fromkeys(targets)]
    return found


def graph() -> dict[str, set[str]]:
    """Which of the package's modules each one imports (the package itself counts as ``offload_moe``)."""
    return {name: {t for t, _, _ in imports(name) if t in MODULES and t != name} for name in MODULES}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_scan_finds_a_circle_and_imports_inside_functions():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    found = {(t, inside) for t, _, inside in imports("offload_moe.checkpoint")}
    assert ("offload_moe.store", False) in found and ("transformers", True) in found


def test_no_import_circle_among_the_modules():
    """Counting imports inside functions and under TYPE_CHECKING too: a circle hidden in a function is still one."""
    assert cycles(graph()) == []


def test_imports_inside_functions_only_for_optional_or_heavy_dependencies():
    late = sorted((name, target, line) for name in MODULES for target, line, inside in imports(name) if inside)
    unexpected = [f"{MODULES[name].name}:{line} imports {target}" for name, target, line in late
                  if target.split(".")[0] not in LAZY and target not in LAZY]
    assert unexpected == [], "import at the top of the file (or add it to LAZY with the reason)"


PUBLIC = [
    # (module, name): names users and tests import; each stays importable from where it was
    *[("offload_moe", n) for n in offload_moe.__all__],
    ("offload_moe.loader", "load"), ("offload_moe.loader", "SUPPORTED_FAMILIES"),
    ("offload_moe.loader", "resolve_model_path"), ("offload_moe.loader", "load_config"),
    ("offload_moe.loader", "build_skeleton"), ("offload_moe.loader", "swap_experts"),
    ("offload_moe.loader", "checkpoint_renamer"), ("offload_moe.loader", "load_dense"),
    ("offload_moe.loader", "start_and_done_lines"), ("offload_moe.loader", "default_cache_bytes"),
    ("offload_moe.generic", "offload_experts"), ("offload_moe.generic", "save_experts"),
    ("offload_moe.generic", "find_moe_layers"), ("offload_moe.generic", "plan_layers"),
    ("offload_moe.generic", "LayerPlan"), ("offload_moe.generic", "OffloadedModuleList"),
    ("offload_moe.generic", "OffloadedModuleDict"), ("offload_moe.generic", "OffloadedFusedExperts"),
    ("offload_moe.demo", "demo_model_path"), ("offload_moe.demo", "run_demo"), ("offload_moe.demo", "DEMO_PROMPTS"),
    ("offload_moe.planning", "plan"), ("offload_moe.planning", "Plan"), ("offload_moe.planning", "kv_bytes_per_token"),
    ("offload_moe.planning", "WORKSPACE_MIN"),
    ("offload_moe.checksums", "verify"), ("offload_moe.checksums", "read_manifest"), ("offload_moe.checksums", "MANIFEST"),
    ("offload_moe.generation", "load_tokenizer"), ("offload_moe.generation", "generate_text"),
    ("offload_moe.generation", "kv_cache_kwargs"), ("offload_moe.generation", "kv_cache_of"),
    ("offload_moe.chat", "ChatSession"), ("offload_moe.traces", "record_prompts"),
    ("offload_moe.traces", "record_trace"), ("offload_moe.saved_experts", "SavedExperts"),
    ("offload_moe.cli", "app"), ("offload_moe.cli", "main"),
    # moved into stand_ins.py, traces/ and profiling/: still importable from the old address
    *[("offload_moe.generic", n) for n in ("LayerRuntime", "OffloadedExpert", "RoutedForward", "grouped")],
    *[("offload_moe.traces", n) for n in (
        "Trace", "TraceError", "TraceRecorder", "FORMAT", "TENSORS", "VERSION", "MAX_EXPERTS", "save_trace", "load_trace",
        "read_prompts", "expert_usage_entropy", "repeat_rate", "random_repeat_rate", "synthesize_trace")],
    *[("offload_moe.profiling", n) for n in (
        "ReplayResult", "ENGINES", "replay", "layer_groups", "predictions", "replay_predictor", "drive", "sweep",
        "sweep_size", "default_predictors", "default_workers", "trace_to_profile", "profile_capacities",
        "parse_capacities", "reference_trace_path", "recording_device", "activation_counts", "write_results")],
]


@pytest.mark.parametrize(("module", "name"), PUBLIC, ids=[f"{m}.{n}" for m, n in PUBLIC])
def test_public_names_stay_importable_from_where_they_were(module, name):
    assert getattr(importlib.import_module(module), name) is not None


def test_the_tests_import_only_names_that_exist():
    """Every ``from offload_moe.x import y`` in tests/ resolves: a name that moved keeps its old address or the
    test was changed with it."""
    missing = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("offload_moe"):
                module = importlib.import_module(node.module)
                missing += [f"{path.name}:{node.lineno} {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name) and f"{node.module}.{a.name}" not in MODULES]
    assert missing == []
