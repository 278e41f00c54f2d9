"""The FastAPI app of `oss-mlx serve`: one `Service` on `app.state`, module-level routes.

Routes: GET /health (open), and behind the API key GET /v1/models, GET /v1/models/{name},
POST /v1/chat/completions (chat_completions.py), POST /v1/responses, GET and DELETE
/v1/responses/{id} (responses.py). GET /openapi.json publishes the schema, request bodies
included. Errors are OpenAI error objects; a 405 keeps its `Allow` header.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations at run time.

import functools
import hmac
import threading
from contextlib import asynccontextmanager

import uvicorn
from fastapi import Request

from oss_mlx.server.chat_completions import chat_completions
from oss_mlx.server.protocol import APIError, ChatRequest, ErrorResponse, ResponsesRequest
from oss_mlx.server.responses import create_response, delete_response, retrieve_response
from oss_mlx.engine.scheduler import Scheduler
from oss_mlx.server.service import Service


# --------------------------------------------------------------------------------------------
# The app: a Service on app.state, module-level routes (chat_completions.py, responses.py).


@asynccontextmanager
async def lifespan(app):
    service = app.state.service
    service.scheduler = Scheduler(service.engine, service.max_concurrency)
    # The grammar library's view of the vocabulary takes a second or so: build it now. Joined
    # at shutdown: a thread still inside llguidance while the interpreter finalizes can crash
    # the process (SIGSEGV on a Ctrl-C that comes right after start-up).
    from oss_mlx.harmony import constrain

    warm = threading.Thread(target=constrain.tokenizer, args=(service.engine.encoding,),
                            name="oss-mlx-grammar-vocab")
    warm.start()
    yield
    service.scheduler.close()
    if service.builtins is not None:
        service.builtins.close()  # the python workers and their folders
    warm.join()


async def authorize(request: Request):
    # A dependency, not an HTTP middleware: Starlette's BaseHTTPMiddleware would hide the
    # client's disconnect from the routes, and disconnects cancel generations.
    api_key = request.app.state.service.api_key
    if api_key:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 api_key.encode()):
            raise APIError(401, "invalid or missing API key: send "
                                "`Authorization: Bearer <key>`", code="invalid_api_key")


def error_response(e: APIError, headers=None):
    from fastapi.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def api_error(request, e: APIError):
    request.state.error = e.message
    return error_response(e)


def allowed_methods(request) -> str:
    """The methods some route serves at this path (for a 405's `Allow` header)."""
    from starlette.routing import Match

    methods = set()
    for route in request.app.routes:
        if route.matches(request.scope)[0] != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


async def http_error(request, e):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    headers = {"Allow": allowed_methods(request)} if e.status_code == 405 else None
    request.state.error = str(e.detail)
    return error_response(APIError(e.status_code, f"{request.method} {request.url.path}: "
                                                  f"{e.detail}", code=code), headers=headers)


async def internal_error(request, e):  # a bug of ours: say so, keep serving
    return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}",
                                   type="server_error"))


async def health(request: Request):
    return {"status": "ok", "model": request.app.state.service.model_name}


def model_card(service: Service) -> dict:
    return {"id": service.model_name, "object": "model", "created": service.created,
            "owned_by": "oss-mlx"}


async def list_models(request: Request):
    return {"object": "list", "data": [model_card(request.app.state.service)]}


async def get_model(request: Request, name: str):
    service = request.app.state.service
    service.check_model(name)
    return model_card(service)


# What each error status means, as /openapi.json documents it (every one is an ErrorResponse).
ERRORS = {
    400: "Invalid request: the message and `param` name the field (a wrong type, a tool whose "
         "`parameters` is not a JSON Schema, a prompt longer than the context, ...)",
    401: "Invalid or missing API key (when the server was started with --api-key)",
    404: "No such model, stored response or route",
    405: "Method not allowed at this path (the `Allow` header lists those that are)",
    413: "Request body over the server's limit (--max-body), refused before it is read",
    500: "Internal error, or the generation failed",
    503: "The server is shutting down: the answer was cut (send the request again)",
}
_READ = (401, 404, 405, 500)
_GENERATE = (400, 401, 404, 405, 413, 500, 503)

# (path, methods, route, the request model documented in /openapi.json, its error statuses); a
# path may have one route per method.
ROUTES = [
    ("/v1/models", ["GET"], list_models, None, (401, 405, 500)),
    ("/v1/models/{name:path}", ["GET"], get_model, None, _READ),
    ("/v1/chat/completions", ["POST"], chat_completions, ChatRequest, _GENERATE),
    ("/v1/responses", ["POST"], create_response, ResponsesRequest, _GENERATE),
    ("/v1/responses/{response_id}", ["GET"], retrieve_response, None, _READ),
    ("/v1/responses/{response_id}", ["DELETE"], delete_response, None, _READ),
]


def request_body(model) -> dict:
    """The OpenAPI `requestBody` of a route whose JSON body `model` describes."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def error_responses(statuses) -> dict:
    return {s: {"model": ErrorResponse, "description": ERRORS[s]} for s in statuses}


def openapi(app) -> dict:
    """FastAPI's schema plus the request bodies (the routes parse their JSON themselves, to
    answer with OpenAI error objects, so FastAPI does not see them), without the 422 FastAPI
    adds for its own validation, which this server never answers."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ChatRequest, ResponsesRequest):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        for ops in schema["paths"].values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(engine, model_name: str, api_key: str | None = None,
               default_max_tokens: int | None = None, constrain_tools: bool = True,
               max_concurrency: int = 1, builtin_tools=None, max_body: int | None = None):
    """The FastAPI app serving `engine` as model `model_name` (a bearer `api_key` if given).

    default_max_tokens: the budget of a request that names none (None: the rest of the context,
    as OpenAI does). constrain_tools: constrain every tool call's arguments to its schema
    (oss_mlx.constrain); structured outputs (response_format, text.format) are always honoured. max_concurrency:
    how many requests decode at once (batched; see oss_mlx.scheduler); 1 serves them one at a
    time. builtin_tools: gpt-oss's built-in tools run for the Responses requests that ask for
    them (server/builtin_tools.BuiltinTools; None: hosted tools are left out). max_body: the largest request body in bytes (default defaults.MAX_BODY); a larger one
    is a 413, refused before it is read.
    """
    from fastapi import Depends, FastAPI
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from oss_mlx import __version__

    app = FastAPI(title="oss-mlx", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url="/openapi.json")
    app.state.service = Service(engine, model_name, api_key, default_max_tokens,
                                constrain_tools, max_concurrency=max_concurrency,
                                builtins=builtin_tools)
    if max_body is not None:
        app.state.service.max_body = max_body
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_middleware(RequestLog)
    app.add_api_route("/health", health, methods=["GET"])  # open: no key needed
    for path, methods, route, model, errors in ROUTES:
        app.add_api_route(path, route, methods=methods, dependencies=[Depends(authorize)],
                          openapi_extra=request_body(model) if model else None,
                          responses=error_responses(errors))
    app.openapi = functools.partial(openapi, app)
    return app


class RequestLog:
    """ASGI middleware: one log line per HTTP request, when its answer has been sent (a stream
    included), on the "oss_mlx.server" logger, as llama-server and vLLM print one:

        POST /v1/chat/completions 200 stream: prompt 6325 tokens (6300 cached), generated 128,
        TTFT 0.21 s, 35.2 tok/s, 3.90 s, stop          (one line)
        POST /v1/responses 400: invalid request: store: Input should be a valid boolean, 0.00 s

    INFO for answers below 500, WARNING from 500 up and for a stream that failed or was cut
    after its 200 was sent, DEBUG for GET /health and /openapi.json (polled). A pure ASGI wrapper, not Starlette's BaseHTTPMiddleware, which would hide a
    client's disconnect from the routes."""

    QUIET = ("/health", "/openapi.json")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        import time

        start, status, stream, logged = time.perf_counter(), 500, False, False

        def done():
            nonlocal logged
            if not logged:
                logged = True
                log_request(scope, status, stream, time.perf_counter() - start)

        async def sending(message):
            nonlocal status, stream
            if message["type"] == "http.response.start":
                status = message["status"]
                stream = any(k == b"content-type" and v.startswith(b"text/event-stream")
                             for k, v in message.get("headers", []))
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                done()  # before the last bytes leave: a client that has the answer has the line
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as e:
            scope.setdefault("state", {}).setdefault("error", f"{type(e).__name__}: {e}")
            raise
        finally:
            done()


def log_request(scope, status: int, stream: bool, seconds: float):
    import logging

    log = logging.getLogger("oss_mlx.server")
    state = scope.get("state") or {}
    reply = state.get("reply")
    error = state.get("error") or getattr(reply, "error", None)
    level = (logging.DEBUG if scope["path"] in RequestLog.QUIET else
             logging.WARNING if status >= 500 or (error and status < 400) else logging.INFO)
    if not log.isEnabledFor(level):
        return
    head = f"{scope['method']} {scope['path']} {status}{' stream' if stream else ''}"
    done = getattr(reply, "completion", None)
    parts = []
    if done is not None:
        s = done.stats
        parts += [f"prompt {s.prompt_tokens} tokens ({s.cached_tokens} cached)",
                  f"generated {s.generated_tokens}", f"TTFT {s.ttft_s:.2f} s",
                  f"{s.decode_tps:.1f} tok/s"]
    if error:
        parts.append(error)
    parts.append(f"{seconds:.2f} s")
    if done is not None and not error:
        parts.append(done.stop_reason)
    log.log(level, "%s: %s", head, ", ".join(parts))


class StoppingServer(uvicorn.Server):
    """uvicorn, cancelling every generation as soon as a shutdown begins: a stream in flight
    then ends with an error event its client raises (not a normal finish, and not killed by the
    graceful-shutdown timeout), and a non-streamed request with a 503."""

    def handle_exit(self, sig, frame):
        import signal

        from oss_mlx.engine.link import ending

        if sig == signal.SIGTERM:  # mlx.launch ending the session: a peer may no longer answer
            ending()
        super().handle_exit(sig, frame)
        service = self.config.app.state.service
        service.stopping = True  # the replies it cuts end with an error (service.interrupted)
        if service.scheduler is not None:
            service.scheduler.cancel_all()

