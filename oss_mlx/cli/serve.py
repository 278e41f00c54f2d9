"""`oss-mlx serve`: an OpenAI-compatible local HTTP server (oss_mlx/server/).

    oss-mlx serve                                           # gpt-oss-20b, http://127.0.0.1:8000/v1
    oss-mlx serve --model ./my-model --port 9000 --api-key sk-local
    oss-mlx serve --demo                                    # no download; answers are noise

What the server answers and the choices it makes (tool_choice, structured outputs, hosted
tools, stop strings, finish reasons, reasoning kept across tool calls): docs/serve.md.
"""


import logging
import sys

from oss_mlx.cli import options, tools as cli_tools
from oss_mlx.defaults import DEFAULT_MODEL, DEMO_MAX_TOKENS, MAX_BODY, parse_size

log = logging.getLogger("oss_mlx.server")
LOG_LEVELS = ("debug", "info", "warning", "error")


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a line is logged (a server run
    in-process, as the tests do, may outlive the stream that was stderr when it started)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: str):
    """oss-mlx's loggers ("oss_mlx.*": the server's line per request, the prompt cache, ...)
    to stderr at `level`; uvicorn's own at warning (its access log is off: the server writes a
    better line), at info with --log-level debug."""
    root = logging.getLogger("oss_mlx")
    root.setLevel(level.upper())
    if not any(h.get_name() == "oss-mlx" for h in root.handlers):
        handler = _Stderr()
        handler.set_name("oss-mlx")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               "%Y-%m-%d %H:%M:%S"))
        root.addHandler(handler)
    return "info" if level == "debug" else "warning"


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
    cli_tools.add_serve_arguments(parser)
    parser.add_argument("--max-body", default=MAX_BODY, metavar="SIZE", type=options.size,
                        help=f"largest request body, e.g. 64MB; a larger one is refused (413) "
                             f"before it is read (default: {MAX_BODY})")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS, metavar="LEVEL",
                        help="what the server logs (stderr): debug, info (one line per "
                             "request: status, prompt / cached / generated tokens, TTFT, "
                             "tok/s), warning or error (default: info)")
    options.add_loading(parser, cache=True)


def cache_dir(args, chosen):
    """Where the prompt cache is kept on disk (docs/serve.md): --cache-dir DIR as given, else
    $OSS_MLX_HOME/prompt-cache/<model> (disk_cache.PerModel); None (memory only) with
    --no-cache-dir, for --demo (a model made afresh each run: nothing to resume), and under
    mlx.launch, explicit --cache-dir included: each rank holds its own share of the K/V and
    must restore exactly what the others restore, which folders on several machines (or one
    shared by several ranks) cannot promise."""
    from oss_mlx.engine.distributed import launched

    if getattr(args, "no_cache_dir", False):
        return None
    if launched():
        if args.cache_dir:
            log.warning("under mlx.launch the prompt cache stays in memory (--cache-dir %s "
                        "ignored)", args.cache_dir)
        return None
    if args.cache_dir:
        return args.cache_dir
    if chosen.demo:
        return None
    from oss_mlx.engine.disk_cache import PerModel
    from oss_mlx.store import home

    return PerModel(home() / "prompt-cache", chosen.name)


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


def flush(engine):
    """Write what the prompt cache holds in memory to its disk folder, if it has one: on every
    way out of `serve` (Ctrl-C, SIGTERM, the server ending), so a restart resumes from it."""
    cache = getattr(engine, "prompt_cache", None)
    if cache is None or cache.disk is None:
        return
    pending = cache.unsaved()
    if pending:
        print(f"oss-mlx: writing the prompt cache ({len(pending)} "
              f"entr{'y' if len(pending) == 1 else 'ies'}) to {cache.disk.folder}", flush=True)
        cache.flush()


def main(args, engine_factory=None) -> int:
    """Serve until SIGINT/SIGTERM. engine_factory(model_dir) -> Engine (default: the memory
    check, then Engine.load) lets a caller serve another engine (tests serve a scripted model
    through this very path)."""
    import contextlib
    import signal

    import uvicorn

    from oss_mlx.cli.models import choose
    from oss_mlx.engine.threads import release_streams
    from oss_mlx.server.app import StoppingServer, create_app

    uvicorn_level = setup_logging(args.log_level)
    sock = _listen(args.host, args.port)
    tools = cli_tools.from_args(args)  # --builtin-tools, --browse: checked before the load
    for note in tools.notes:
        print(f"oss-mlx: note: {note}", flush=True)
    with contextlib.ExitStack() as stack:
        chosen = choose(args, stack)
        args.cache_dir = cache_dir(args, chosen)  # what load_options (and a factory) reads
        if engine_factory is None:
            from oss_mlx.engine.loading import load_engine

            engine = load_engine(str(chosen.folder), options.load_options(args))
        else:
            engine = engine_factory(str(chosen.folder))
        name = args.name or (DEFAULT_MODEL if chosen.demo else chosen.name)
        max_tokens = args.max_tokens or (DEMO_MAX_TOKENS if chosen.demo else None)
        app = create_app(engine, name, api_key=args.api_key, default_max_tokens=max_tokens,
                         constrain_tools=args.constrain_tools,
                         max_concurrency=args.max_concurrency,
                         builtin_tools=cli_tools.serve_tools(tools, engine.encoding, args),
                         max_body=parse_size(args.max_body, "--max-body"))
        port = sock.getsockname()[1]
        sock.listen(128)  # from here connections queue until uvicorn accepts them
        print(f"oss-mlx: serving {name!r} at http://{args.host}:{port}/v1"
              + (" (API key required)" if args.api_key else "")
              + (" (the demo model: random weights, its answers are noise)" if chosen.demo
                 else ""), flush=True)
        disk = getattr(getattr(engine, "prompt_cache", None), "disk", None)
        if disk is not None:
            kept = len(disk.entries())
            print(f"oss-mlx: prompt cache on disk in {disk.folder}"
                  + (f" ({kept} entr{'y' if kept == 1 else 'ies'} from earlier runs)" if kept
                     else ""), flush=True)
        if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
            print("oss-mlx: warning: listening beyond this machine without --api-key", flush=True)
        # Ctrl-C / SIGTERM: generations stop at their next token, so open requests end (with
        # what they have) well within the 2 s uvicorn then gives them.
        server = StoppingServer(uvicorn.Config(app, log_level=uvicorn_level, access_log=False,
                                               timeout_graceful_shutdown=2))
        # uvicorn handles SIGINT / SIGTERM while it runs, and re-raises the signal once it has
        # shut down gracefully: swallow that one (a handler that raised SystemExit there would
        # skip everything after `run`), then write the prompt cache (a second Ctrl-C while it
        # is written stops the writing; each file is written atomically) and end with status 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        try:
            server.run(sockets=[sock])
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                flush(engine)
            finally:
                release_streams()  # the main thread's (the worker released its own)
    return 0
