"""Running the server: bind the socket, start uvicorn, load the weights in the background.

The socket is bound before anything heavy happens, so a taken port fails at once; `/health`
answers 503 while the weights load (as llama-server does) and 200 once requests are taken.
SIGTERM or Ctrl-C: new requests and queued ones are refused (503), the request being generated
finishes and is delivered, then the process exits 0; a second Ctrl-C stops at once.
"""
from __future__ import annotations

import socket
import threading
from typing import Any, Callable

import uvicorn
from sse_starlette.sse import AppStatus

from ..errors import RuntimeFailure
from .runner import Runner, Settings
from .scheduler import Scheduler


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeFailure(f"cannot listen on {host}:{port}: {exc.strerror}",
                             fix="pick another --port, or stop what is using it") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(mf, settings: Settings, *, host: str, port: int, load: Callable[[], Any],
          log: Callable[[str], None], stop: threading.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or until `stop` is set, for a server run in a thread).
    `load()` returns the model (run in a thread); an error it raises stops the server and is
    raised here."""
    from .app import create_app

    sock = bind(host, port)
    bound = sock.getsockname()[1]
    scheduler = Scheduler(settings.max_queue, log=log)
    app = create_app(mf, settings, scheduler)
    # sse-starlette cuts every open stream on SIGTERM by default; the request in flight must finish.
    # Its flag is process-wide: a server stopped earlier in this process must not cut this one's.
    AppStatus.disable_automatic_graceful_drain()
    AppStatus.should_exit = False
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            server_header=False, timeout_graceful_shutdown=None)
    server = _Server(config, scheduler, log)
    failure: list[BaseException] = []

    def loader() -> None:
        try:
            model = load()
            vision = None
            if settings.mmproj is not None:
                from ..engine.images import open_vision
                vision = open_vision(settings.mmproj, model, mf.tokenizer)
                n = vision.config.n_layer
                log(f"diffcli serve: vision tower {settings.mmproj} ({n} layer{'s' * (n != 1)}, "
                    f"{settings.image_max_tokens} soft tokens per image)")
            scheduler.run = Runner(model, mf.tokenizer, mf.canvas_length,
                                   kv_cache=settings.kv_cache,
                                   log=log if settings.log_requests else None, vision=vision)
            log(f"diffcli serve: ready: {settings.model_name} at http://{_url_host(host)}:{bound}/v1 "
                f"(the canvas page at http://{_url_host(host)}:{bound}/)")
        except BaseException as exc:        # reported by serve() after the server stops
            failure.append(exc)
            server.should_exit = True

    log(f"diffcli serve: listening on http://{_url_host(host)}:{bound} (loading the model; "
        "/health answers 503 until it is ready)")
    if settings.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log(f"diffcli serve: warning: listening on {host} without --api-key; anyone who can reach "
            "this port can use the model")
    threading.Thread(target=loader, name="diffcli-loader", daemon=True).start()
    if stop is not None:
        def stopper() -> None:
            stop.wait()
            scheduler.drain()
            server.should_exit = True
        threading.Thread(target=stopper, name="diffcli-stopper", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.close(timeout=5.0)
        sock.close()
    if failure:
        raise failure[0]
    log("diffcli serve: stopped")


class _Server(uvicorn.Server):
    """uvicorn's Server, told about the scheduler: a stop signal first drains the queue."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, log: Callable[[str], None]):
        super().__init__(config)
        self.scheduler, self.log = scheduler, log

    def handle_exit(self, sig, frame) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after a graceful stop; the stop was graceful, so the process
        # ends normally instead (exit 0)
        self._captured_signals.clear()
        if first:
            self.log("diffcli serve: stopping: finishing the request in flight, refusing the rest "
                     "(Ctrl-C again to stop now)")
            self.scheduler.drain()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
