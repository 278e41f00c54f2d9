"""`oss-mlx serve`: an OpenAI-compatible local HTTP server (oss_mlx/server/).

    oss-mlx serve                                           # gpt-oss-20b, http://127.0.0.1:8000/v1
    oss-mlx serve --model ./my-model --port 9000 --api-key sk-local
    oss-mlx serve --demo                                    # no download; answers are noise

What the server answers and the choices it makes (tool_choice, structured outputs, hosted
tools, stop strings, finish reasons, reasoning kept across tool calls): docs/serve.md.
"""


import logging

from oss_mlx.cli import options
from oss_mlx.defaults import DEFAULT_MODEL, DEMO_MAX_TOKENS

log = logging.getLogger("oss_mlx.server")


def add_arguments(parser):
    options.add_model(parser)
    parser.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                        help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, metavar="PORT",
                        help="port; 0 picks a free one")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="require `Authorization: Bearer KEY` on every /v1 request")
    parser.add_argument("--name", default=None, metavar="NAME",
                        help=f"the model id clients send (default: the --model argument's last "
                             f"path part; {DEFAULT_MODEL} with --demo, as clients' examples use)")
    parser.add_argument("--max-tokens", type=options.positive_int, default=None, metavar="N",
                        help=f"token budget of a request that sets none (default: the rest of "
                             f"the context; {DEMO_MAX_TOKENS} with --demo)")
    parser.add_argument("--no-constrain-tools", dest="constrain_tools", action="store_false",
                        help="do not constrain tool-call arguments to each tool's JSON schema "
                             "(on by default: arguments always parse and have their required "
                             "fields)")
    parser.add_argument("--max-concurrency", type=options.positive_int, default=4, metavar="N",
                        help="requests decoded at once in one batched model step; more wait "
                             "their turn in arrival order (1: one at a time)")
    options.add_loading(parser, cache=True)


def _listen(host: str, port: int):
    """A socket bound before the model loads: a taken port is a one-line error, not a wasted
    load."""
    import socket

    from oss_mlx.errors import OssMlxError

    if not 0 <= port < 65536:
        raise OssMlxError(f"--port {port}: not a port number")
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise OssMlxError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def main(args, engine_factory=None) -> int:
    """Serve until SIGINT/SIGTERM. engine_factory(model_dir) -> Engine (default: the memory
    check, then Engine.load) lets a caller serve another engine (tests serve a scripted model
    through this very path)."""
    import contextlib
    import signal
    import sys

    import uvicorn

    from oss_mlx.cli.models import choose
    from oss_mlx.engine.threads import release_streams
    from oss_mlx.server.app import StoppingServer, create_app

    sock = _listen(args.host, args.port)
    with contextlib.ExitStack() as stack:
        chosen = choose(args, stack)
        if engine_factory is None:
            from oss_mlx.engine.loading import load_engine

            engine = load_engine(str(chosen.folder), options.load_options(args))
        else:
            engine = engine_factory(str(chosen.folder))
        name = args.name or (DEFAULT_MODEL if chosen.demo else chosen.name)
        max_tokens = args.max_tokens or (DEMO_MAX_TOKENS if chosen.demo else None)
        app = create_app(engine, name, api_key=args.api_key, default_max_tokens=max_tokens,
                         constrain_tools=args.constrain_tools,
                         max_concurrency=args.max_concurrency)
        port = sock.getsockname()[1]
        sock.listen(128)  # from here connections queue until uvicorn accepts them
        print(f"oss-mlx: serving {name!r} at http://{args.host}:{port}/v1"
              + (" (API key required)" if args.api_key else "")
              + (" (the demo model: random weights, its answers are noise)" if chosen.demo
                 else ""), flush=True)
        if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
            print("oss-mlx: warning: listening beyond this machine without --api-key", flush=True)
        # Ctrl-C / SIGTERM: generations stop at their next token, so open requests end (with
        # what they have) well within the 2 s uvicorn then gives them.
        server = StoppingServer(uvicorn.Config(app, log_level="warning",
                                               timeout_graceful_shutdown=2))
        # uvicorn re-raises SIGTERM / SIGINT once it has shut down gracefully; end with exit
        # status 0 then instead of dying there, so the demo model's temporary folder is removed.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: sys.exit(0))
        try:
            server.run(sockets=[sock])
            if hasattr(engine, "prompt_cache"):
                engine.prompt_cache.flush()  # --cache-dir: what is in memory survives a restart
        finally:
            release_streams()  # the main thread's (the worker released its own)
    return 0
