"""`oss-mlx serve`: an OpenAI-compatible local HTTP server (FastAPI + uvicorn).

    oss-mlx serve --model gpt-oss-20b                       # http://127.0.0.1:8000/v1
    oss-mlx serve --model ./my-model --port 9000 --api-key sk-local

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/responses, GET and DELETE
/v1/responses/{id}, GET /health, GET /openapi.json.

Requests wait in a FIFO queue and a worker thread runs them through the engine (which reuses its
KV cache when a conversation grows): one at a time, or with --max-concurrency N up to N decoding
together in one batched model step (oss_mlx.scheduler, oss_mlx.batch). Tokens travel from the
worker to the request's coroutine through an asyncio queue, so streaming never blocks the event
loop. A client that goes away sets the generation's cancel event; the engine stops at the next
token.

Harmony in, OpenAI out: the final channel becomes `content` (Chat) or a `message` item
(Responses), the analysis channel `reasoning_content` or a `reasoning` item, and a message to a
declared tool a structured tool call with finish_reason "tool_calls". No harmony markup ever
reaches the client: the engine's parser splits the channels, and we only forward their text.

Where things live: this module holds the command; scheduler.py the job queue (Job, Scheduler,
events: one at a time, or up to --max-concurrency N decoding together in one batched step,
batch.py); app.py builds the FastAPI app around a serving.Service; chat_completions.py and responses.py are
the two generation routes; wire.py turns engine events into a client's view of the turn;
openai_api.py maps the request shapes onto harmony.

Choices worth knowing:
- tool_choice "none" renders no tools; "auto" and "required" render them all (harmony cannot
  force a call, so "required" is a request, not a guarantee); a named tool renders that one
  tool alone.
- Structured outputs (Chat `response_format`, Responses `text.format`) and every tool call's
  arguments (unless `--no-constrain-tools`) are grammar-constrained to their JSON schema on the
  final channel / the tool-call message only (oss_mlx.constrain); a schema keyword the grammar
  cannot enforce is a 400 naming it.
- Responses tools: `function`; `namespace` (its tools become a harmony namespace, calls come back
  with `namespace`); `custom` (freeform: declared as one string argument, the grammar in its
  description); `local_shell`; hosted tools (`web_search`, ...) have no backend here: they are
  left out of the prompt and logged once.
- `stop` strings cut the user-visible text (not the reasoning) and end the generation.
- max_tokens or a full context give "length" (Responses: incomplete, max_output_tokens); a turn
  the model breaks (a stray control token) keeps what was parsed and ends as "content_filter"
  (Responses: incomplete, content_filter), so a client can tell it from a clean answer.
- The server remembers the reasoning before each tool call it made, and puts it back when a
  client returns the call without it (harmony keeps a tool chain's analysis; spec 5.7); with
  `include: ["reasoning.encrypted_content"]` the reasoning also travels sealed in the item.
- `store` keeps the last 256 responses in memory for `previous_response_id`.
- `seed`: 0..2**64-1, or -1 meaning random (as no seed); others are a 400. A `top_p` that is 0
  in float32 samples greedily.
"""

import logging


# --------------------------------------------------------------------------------------------
# The generation queue lives in oss_mlx.scheduler: one at a time, or --max-concurrency N
# decoding together in one batched step (oss_mlx.batch).

from .scheduler import release_streams  # noqa: E402

log = logging.getLogger("oss_mlx.server")


def create_app(engine, model_name: str, api_key: str | None = None,
               default_max_tokens: int | None = None, constrain_tools: bool = True,
               max_concurrency: int = 1):
    """The FastAPI app serving `engine` as `model_name` (see oss_mlx.app.create_app)."""
    from .app import create_app as build

    return build(engine, model_name, api_key=api_key, default_max_tokens=default_max_tokens,
                 constrain_tools=constrain_tools, max_concurrency=max_concurrency)


# --------------------------------------------------------------------------------------------
# Command line.


def add_arguments(parser):
    parser.add_argument("--model", default="gpt-oss-20b",
                        help="converted model folder or name in the model store "
                             "(default: gpt-oss-20b)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--api-key", default=None,
                        help="require `Authorization: Bearer KEY` on every /v1 request")
    parser.add_argument("--name", default=None,
                        help="the model id clients send (default: the --model argument's "
                             "last path part, e.g. gpt-oss-20b)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="token budget of a request that sets none (default: the rest of "
                             "the context; 64 with --demo)")
    parser.add_argument("--no-constrain-tools", dest="constrain_tools", action="store_false",
                        help="do not constrain tool-call arguments to each tool's JSON schema "
                             "(on by default: arguments always parse and have their required "
                             "fields)")
    parser.add_argument("--max-concurrency", type=int, default=4, metavar="N",
                        help="requests decoded at once in one batched model step; more wait "
                             "their turn in arrival order (default: 4; 1: one at a time)")
    parser.add_argument("--demo", action="store_true",
                        help="serve a tiny random-weight model made on the spot, as "
                             "'tiny-random' (no download; its output is noise)")
    from .prompt_cache import add_cache_arguments

    add_cache_arguments(parser)
    from . import memory

    memory.add_memory_arguments(parser)
    memory.add_decode_arguments(parser)


def _concurrency(requested: int) -> int:
    """Requests decoded at once. Under mlx.launch the ranks follow rank 0's requests one at a
    time (oss_mlx.distributed's LeaderEngine); the batcher drives the model directly, which
    the other ranks would not follow, so a launched server serves one request at a time."""
    from .distributed import launched

    if requested > 1 and launched():
        log.warning("under mlx.launch requests are served one at a time "
                    "(--max-concurrency %d ignored)", requested)
        return 1
    return requested


def main(args, engine_factory=None) -> int:
    """Serve until SIGINT/SIGTERM. engine_factory(model_dir) -> Engine (default Engine.load):
    lets a caller serve another engine (tests serve a scripted model through this very path)."""
    import contextlib
    import signal
    import socket
    import sys
    from pathlib import Path

    import uvicorn

    from . import memory
    from .errors import OssMlxError

    if not 0 <= args.port < 65536:
        raise OssMlxError(f"--port {args.port}: not a port number")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise OssMlxError(f"--max-tokens {args.max_tokens}: must be at least 1")
    if args.max_concurrency < 1:
        raise OssMlxError(f"--max-concurrency {args.max_concurrency}: must be at least 1")
    # Bind before loading the model: a taken port is a one-line error, not a wasted load.
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except OSError as e:
        raise OssMlxError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    with contextlib.ExitStack() as stack:
        if args.demo:
            from .demo import demo_model

            model_dir, default_name = stack.enter_context(demo_model()), "tiny-random"
            max_tokens = args.max_tokens or 64  # random weights never stop by themselves
        else:
            model_dir, default_name = args.model, Path(str(args.model).rstrip("/")).name
            max_tokens = args.max_tokens
        from .prompt_cache import cache_options

        engine = (engine_factory(str(model_dir)) if engine_factory
                  else memory.load_engine(str(model_dir), args, **cache_options(args)))
        name = args.name or default_name
        app = create_app(engine, name, api_key=args.api_key, default_max_tokens=max_tokens,
                         constrain_tools=args.constrain_tools,
                         max_concurrency=_concurrency(args.max_concurrency))
        port = sock.getsockname()[1]
        sock.listen(128)  # from here connections queue until uvicorn accepts them
        print(f"oss-mlx: serving {name!r} at http://{args.host}:{port}/v1"
              + (" (API key required)" if args.api_key else ""), flush=True)
        if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
            print("oss-mlx: warning: listening beyond this machine without --api-key", flush=True)
        # Ctrl-C / SIGTERM: generations stop at their next token, so open requests end (with
        # what they have) well within the 2 s uvicorn then gives them.
        from .app import StoppingServer

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
