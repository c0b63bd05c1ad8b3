"""``kiln serve``, added to kiln's command line by ``add_parser``."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from pathlib import Path

from kiln.errors import ConfigError, KilnError
from kiln.flags import add_runtime_flags, given_runtime_flags, runtime_config_from_args

logger = logging.getLogger(__name__)

API_KEY_ENV = "KILN_API_KEY"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve an engine over OpenAI's HTTP API: /v1/completions, /v1/chat/completions, /v1/models, "
                    "plus /health, /metrics (Prometheus) and /version. Given a Hugging Face folder it builds and "
                    "caches an engine first; given nothing it serves the bundled stories260K model.")
    # Each help string states its default itself: ArgumentDefaultsHelpFormatter would repeat the ones that a
    # sentence explains ("default: the model folder's name") and add "(default: None)" to the rest.
    p.add_argument("model", nargs="?", help="engine folder or Hugging Face model folder (default: stories260K)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on, 0.0.0.0 for every interface (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="TCP port, 0 for any free port (default: %(default)s)")
    p.add_argument("--served-model-name", help="the model name clients send (default: the model folder's name)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV})")
    p.add_argument("--max-queue-size", type=int,
                   help="answer 429 when this many requests already wait for the engine (default: no limit)")
    p.add_argument("--chat-template", help="Jinja chat template file (default: the model's, else a plain one)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds that SIGTERM / Ctrl-C waits for requests in flight before cancelling them "
                        "(default: %(default)s)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="server log level (default: %(default)s)")
    add_runtime_flags(p)
    p.set_defaults(func=cmd_serve)


def _check_args(args) -> None:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a TCP port; use 0 to 65535")
    if args.max_queue_size is not None and args.max_queue_size < 1:
        raise ConfigError(f"--max-queue-size must be at least 1, got {args.max_queue_size}; leave it out for no "
                          "limit")
    if args.shutdown_timeout < 0:
        raise ConfigError(f"--shutdown-timeout must be 0 or more seconds, got {args.shutdown_timeout}")


def _read_chat_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"--chat-template {path}: cannot read it ({e.strerror}); give a Jinja template file") from None


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the engine loads so that a taken port fails at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise KilnError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host") from None
    return sock


def cmd_serve(args) -> int:
    from kiln.runtime.executor import Executor
    from kiln.runtime.llm import DEFAULT_MODEL_NAME, ensure_engine

    _check_args(args)
    chat_template = _read_chat_template(args.chat_template)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    config = runtime_config_from_args(args)
    sock = _listen(args.host, args.port)
    try:
        logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
        progress = sys.stderr.isatty()
        executor = Executor(ensure_engine(args.model, progress=progress), config, progress=progress)
        try:
            name = args.served_model_name or (Path(args.model).name if args.model else DEFAULT_MODEL_NAME)
            _serve(executor, sock, name, args, api_key, chat_template)
        finally:
            executor.shutdown()
    finally:
        sock.close()
    return 0


def _serve(executor, sock: socket.socket, name: str, args, api_key: str | None, chat_template: str | None) -> None:
    import uvicorn

    from kiln.serve.app import create_app

    if "kv_cache_free_gpu_mem_fraction" in given_runtime_flags(args) and executor.engine.device.type != "cuda":
        logger.warning("--kv-cache-free-gpu-mem-fraction has no effect on %s: the KV cache there holds "
                       "full batches at max_seq_len", executor.engine.device.type)
    app = create_app(executor, name, api_key=api_key, max_queue_size=args.max_queue_size,
                     chat_template=chat_template)
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    url_host = f"[{host}]" if ":" in host else host
    sock.listen()  # before the URL is announced: a client that connects at once waits for uvicorn, not refused
    print(f"kiln serve: {name} on http://{url_host}:{port}{' (API key required)' if api_key else ''}", flush=True)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again to end the process; by
    # then every request has finished or been cancelled, so the repeat is ignored and serve returns 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
