"""Running the app under uvicorn, and stopping it cleanly: what ``offload-moe serve`` calls.

SIGTERM or Ctrl-C (SIGINT) stops the listener at once and tells the engine to take nothing new; the
requests in flight go on and are cancelled if still running ``shutdown_timeout`` seconds later (their
streams end with an error event). Then the engine stops, the model closes, and ``run_server`` returns,
so the command exits 0. A second Ctrl-C stops without waiting. uvicorn would re-raise the signal once
it is done (exit status 143 for SIGTERM); the server class here does not.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable
from contextlib import contextmanager

from ..errors import ConfigError
from ..generation import load_with_tokenizer
from .app import create_app, require_serve_extra
from .engine import MAX_QUEUE, Engine

SHUTDOWN_TIMEOUT = 30.0


def serve_model(model_path=None, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                model_name: str | None = None, max_batch: int | None = None, max_queue: int = MAX_QUEUE,
                shutdown_timeout: float = SHUTDOWN_TIMEOUT, announce: Callable[[str], None] = print,
                **load_options) -> None:
    """Load ``model_path`` (default: the bundled model) with ``offload_moe.load(**load_options)`` and serve it
    until SIGTERM or Ctrl-C; ``model_name`` (default: the folder's name) is the name clients ask for."""
    require_serve_extra()  # before minutes of loading
    model, tokenizer = load_with_tokenizer(model_path, **load_options)
    try:
        engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
    except BaseException:
        model.offload.close()
        raise
    run_server(engine, model_name=model_name or model.offload.folder.name, host=host, port=port, api_key=api_key,
               shutdown_timeout=shutdown_timeout, announce=announce)


def build_server(engine: Engine, *, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, shutdown_timeout: float = SHUTDOWN_TIMEOUT, log_level: str = "warning"):
    """A uvicorn server for ``engine`` and the socket it listens on, bound now (``port`` 0: any free port).

    Run it with ``server.run(sockets=[sock])``; stop it with ``server.should_exit = True`` (signals do that
    on the main thread) and then ``engine.shutdown()``.
    """
    require_serve_extra()
    import uvicorn

    app = create_app(engine, model_name=model_name, api_key=api_key)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
    config = uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=shutdown_timeout + 5)
    server = _server_class()(config, lambda urgent: engine.stop_accepting(0 if urgent else shutdown_timeout))
    return server, sock


def run_server(engine: Engine, *, model_name: str, host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None, shutdown_timeout: float = SHUTDOWN_TIMEOUT,
               announce: Callable[[str], None] = print, log_level: str = "warning") -> None:
    """Serve ``engine`` over HTTP until SIGTERM or Ctrl-C, then shut the engine down (closing the model)."""
    try:
        server, sock = build_server(engine, model_name=model_name, host=host, port=port, api_key=api_key,
                                    shutdown_timeout=shutdown_timeout, log_level=log_level)
    except BaseException:
        engine.shutdown(0)
        raise
    bound = sock.getsockname()[1]
    announce(f"serving {model_name} on http://{host}:{bound}/v1 (batch {engine.max_batch}, queue {engine.max_queue}); "
             "Ctrl-C stops")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        engine.shutdown(shutdown_timeout)


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, with signal handling that tells the engine first and exits 0 afterwards."""

        def __init__(self, config, on_signal: Callable[[bool], None]):
            super().__init__(config)
            self.on_signal = on_signal

        @contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
                yield
                return

            def handle(signum, frame):
                urgent = self.should_exit  # a second signal: stop without waiting for the requests in flight
                self.force_exit = self.force_exit or urgent
                self.should_exit = True
                self.on_signal(urgent)

            previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return Server
