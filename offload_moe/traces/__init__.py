"""Routing traces: which experts each token went to, recorded, imported, written, read, summarised and synthesised.

One module a concern:

- ``format``: ``Trace`` (vLLM's ``experts`` int16 ``[tokens, layers, top_k]`` plus optional scores,
  gate predictions, token ids and sequence lengths), its checks, ``save_trace`` and ``load_trace``, and
  ``TraceFile`` and ``read_trace_chunks`` (a long trace in pieces, in bounded memory; a file, or the parts
  folder of a chunked recording, ``parts_folder``);
- ``recording``: ``TraceRecorder``, ``record_trace``, ``read_prompts``, ``record_prompts``, and
  ``record_trace_file``/``record_prompts_file``, which write the trace in parts as they go;
- ``parts``: the parts folder of a chunked recording (``TraceParts``) and ``merge_trace_parts``;
- ``summaries``: ``expert_usage_entropy``, ``repeat_rate``, ``random_repeat_rate``;
- ``synthesis``: ``synthesize_trace``;
- ``imports``: ``import_routing``, the routed experts vLLM and SGLang return, as a trace.

Import the names from here:

    model = offload_moe.load(folder, cache_experts=32)
    trace = record_trace(model, [input_ids], source="held-out stdlib files")
    save_trace(trace, "profiles/traces/run.safetensors")
    trace = load_trace("profiles/traces/run.safetensors")
"""

from ..errors import TraceError
from .format import (FORMAT, MAX_EXPERTS, MAX_LAYER, PARTS_INDEX, REQUIRED_METADATA, TENSORS, VERSION, Trace, TraceFile,
                     load_trace, parts_folder, read_trace_chunks, save_trace)
from .parts import TraceParts, merge_trace_parts
from .recording import (RECORD_CHUNK_TOKENS, TraceRecorder, read_prompts, record_prompts, record_prompts_file,
                        record_trace, record_trace_file)
from .summaries import expert_usage_entropy, random_repeat_rate, repeat_rate
from .imports import import_routing, parse_layers
from .synthesis import synthesize_trace

__all__ = [
    "FORMAT", "MAX_EXPERTS", "MAX_LAYER", "PARTS_INDEX", "RECORD_CHUNK_TOKENS", "REQUIRED_METADATA", "TENSORS", "VERSION",
    "Trace", "TraceError", "TraceFile", "TraceParts", "TraceRecorder",
    "expert_usage_entropy", "import_routing", "load_trace", "merge_trace_parts", "parse_layers", "parts_folder", "random_repeat_rate", "read_trace_chunks", "read_prompts", "record_prompts", "record_prompts_file", "record_trace", "record_trace_file",
    "repeat_rate", "save_trace", "synthesize_trace",
]
