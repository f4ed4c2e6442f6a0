"""Serving: an engine that batches requests over one offloaded model, and an OpenAI-compatible HTTP server.

``Engine`` (engine.py) needs only what offload_moe needs; ``create_app`` (app.py), ``run_server``
(server.py) and the metrics (metrics.py) need the ``serve`` extra: ``pip install "offload_moe[serve]"``.
"""

from .app import create_app, require_serve_extra
from .engine import MAX_BATCH, MAX_QUEUE, Completion, Engine, EngineClosedError, Event, Job, Params, QueueFullError, default_max_batch
from .server import SHUTDOWN_TIMEOUT, build_server, run_server, serve_model

__all__ = ["MAX_BATCH", "MAX_QUEUE", "SHUTDOWN_TIMEOUT", "Completion", "Engine", "EngineClosedError", "Event", "Job", "Params", "QueueFullError", "build_server",
           "create_app", "default_max_batch", "require_serve_extra", "run_server",
           "serve_model"]
