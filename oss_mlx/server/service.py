"""What every route of `oss-mlx serve` shares: the `Service` (engine, scheduler, memories) and the
steps of a request (parse, check the model, render the prompt, sample, run, report failures).

One `Service` lives on `app.state.service`; the route modules (chat_completions.py,
responses.py) are plain module-level functions that read it from the request, so no state hides
in closures and each piece can be tested on its own.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from oss_mlx.defaults import MAX_BODY, parse_size
from oss_mlx.errors import OssMlxError
from oss_mlx.server.protocol import APIError
from oss_mlx.server.wire import Reply, now

log = logging.getLogger("oss_mlx.server")


class Memory:
    """A bounded map, oldest entries forgotten first (tool-call reasoning, stored responses)."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[str, Any] = OrderedDict()

    def put(self, key: str, value: Any):
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def get(self, key: str) -> Any:
        return self._items.get(key)

    def pop(self, key: str) -> Any:
        return self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


class Sealer:
    """Reasoning text as an opaque `encrypted_content` string the client sends back.

    The text travels base64-encoded, authenticated with HMAC-SHA256 under a key made when the
    server starts: the server restores exactly what it sealed, and refuses anything else (a
    string from another server run, or altered, is dropped, as if the client had sent none).
    It is sealed, not secret: the same text is in the item's `content`.
    """

    PREFIX = "oss-mlx.1."

    def __init__(self, key: bytes | None = None):
        self.key = key or secrets.token_bytes(32)
        self._warned = False

    def _mac(self, payload: bytes) -> str:
        digest = hmac.new(self.key, payload, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def seal(self, text: str) -> str:
        payload = base64.urlsafe_b64encode(text.encode()).decode()
        return f"{self.PREFIX}{payload}.{self._mac(payload.encode())}"

    def unseal(self, sealed: str) -> str | None:
        payload, _, mac = sealed.removeprefix(self.PREFIX).rpartition(".")
        if sealed.startswith(self.PREFIX) and payload and hmac.compare_digest(
                mac.encode(), self._mac(payload.encode()).encode()):
            try:
                return base64.urlsafe_b64decode(payload.encode()).decode()
            except ValueError:
                pass
        if not self._warned:
            self._warned = True
            log.warning("dropping reasoning whose encrypted_content this server did not seal "
                        "(sealed by an earlier run, or altered)")
        return None


@dataclass
class Service:
    """The state behind one app: the model, its scheduler, and what the server remembers."""

    engine: Any
    model_name: str
    api_key: str | None = None
    default_max_tokens: int | None = None
    constrain_tools: bool = True  # tool-call arguments follow each tool's schema (constrain.py)
    max_concurrency: int = 1  # requests decoding at once (oss_mlx.scheduler)
    max_body: int = parse_size(MAX_BODY)  # bytes: a larger request body is a 413
    scheduler: Any = None  # set by the app's lifespan
    stopping: bool = False  # a shutdown has begun (app.StoppingServer): generations are cut
    thoughts: Memory = field(default_factory=lambda: Memory(4096))  # call id -> reasoning
    responses: Memory = field(default_factory=lambda: Memory(256))  # stored responses
    sealer: Sealer = field(default_factory=Sealer)
    builtins: Any = None  # serve --builtin-tools: builtin_tools.BuiltinTools
    created: int = field(default_factory=now)

    def remember(self, reply: Reply):
        """Keep the reasoning before each tool call of `reply` (restore_reasoning reads it)."""
        for call in reply.calls if reply.reasoning else []:
            self.thoughts.put(call.id, reply.reasoning)

    def check_model(self, name: str):
        if name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist: this server serves "
                                f"{self.model_name!r}", code="model_not_found", param="model")

    def prompt_tokens(self, conversation) -> list[int]:
        """The rendered prompt; a 400 (context_length_exceeded) when it leaves no room."""
        try:
            tokens = self.engine.render(conversation)
        except OssMlxError as e:
            raise APIError(400, str(e)) from None
        n = len(tokens)
        if n >= self.engine.max_context:
            raise APIError(400, f"this request needs {n} prompt tokens, but the model's "
                                f"context is {self.engine.max_context} tokens: shorten the "
                                "messages", code="context_length_exceeded", param="messages")
        return tokens

    def constraint(self, fmt, where: str, tools) -> tuple:
        """The request's constraint (constrain.Spec) and the instruction items that announce its
        response format; an unsupported schema is a 400 naming the keyword."""
        from oss_mlx.harmony.constrain import UnsupportedSchema
        from oss_mlx.server.constraints import request_spec
        from oss_mlx.server.conversation import Item

        # Freeform (custom) tools take text, not JSON: their calls stay free.
        tools = [t for t in tools if getattr(t, "kind", "function") != "custom"]
        try:
            spec, text = request_spec(fmt, where, tools, self.constrain_tools)
        except UnsupportedSchema as e:
            raise APIError(400, str(e), code="unsupported_schema", param=where) from None
        return spec, [Item("instructions", text)] if text else []

    def sampling(self, req, max_tokens, spec=None):
        from oss_mlx.engine.types import SamplingParams
        from oss_mlx.harmony import constrain
        from oss_mlx.server.conversation import cache_key

        kw = {"max_tokens": max_tokens or self.default_max_tokens, "cache_key": cache_key(req)}
        if spec:
            kw["logits_processors"] = [constrain.processor(self.engine.encoding, spec)]
        if req.temperature is not None:
            kw["temperature"] = req.temperature
        if req.top_p is not None:
            kw["top_p"] = req.top_p
            if vanishing(req.top_p):
                kw["temperature"] = 0.0  # keep only the most likely token: greedy
        if req.seed is not None:
            kw["seed"] = req.seed
        return SamplingParams(**kw)


def vanishing(top_p: float) -> bool:
    """A top_p that is 0 in float32, where the sampler works: the nucleus is the top token."""
    import numpy as np

    return bool(np.float32(top_p) == 0)


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to be over `limit` bytes:
    from its Content-Length before reading any of it, else (chunked) when the bytes read pass
    the limit. Nothing more is read or parsed then."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise APIError(400, f"invalid Content-Length header: {length!r}")
        if int(length) > limit:
            raise too_large(limit, int(length))
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(limit: int, size: int | None = None) -> APIError:
    from oss_mlx.store import human_size

    what = f"{human_size(size)}" if size is not None else f"over {human_size(limit)}"
    return APIError(413, f"the request body is {what}, more than this server accepts "
                         f"({human_size(limit)}; `oss-mlx serve --max-body SIZE` sets it)",
                    code="request_too_large")


async def read_json(request) -> Any:
    raw = await read_body(request, request.app.state.service.max_body)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


def failure(e: Exception) -> APIError:
    msg = str(e) if isinstance(e, OssMlxError) else f"{type(e).__name__}: {e}"
    return APIError(500, f"generation failed: {msg}", type="server_error", code="server_error")


def interrupted(service: Service, reply: Reply) -> APIError | None:
    """The error to report when the server, not the model, ended a generation (a shutdown cut
    it, or it was cancelled before it ran); None when it ended by itself or at a stop string.
    A client must never take a cut answer for a whole one."""
    done = reply.completion
    if done is not None and (done.stop_reason != "cancelled" or reply.stopped):
        return None
    made = done.stats.generated_tokens if done is not None else 0
    why = ("the server is shutting down" if service.stopping
           else "the generation was cancelled by the server")
    return APIError(503, f"{why}: this answer was cut after {made} tokens; send the request "
                         "again", type="server_error", code="server_error")


async def generation(service: Service, job, reply: Reply):
    """The client-facing pieces of each engine event (see Reply.feed); a ("message", None) piece
    marks a harmony message boundary. A stop string cancels the rest."""
    from oss_mlx.engine.scheduler import events

    async for ev in events(job):
        pieces = reply.feed(ev)
        if ev.type == "message":
            pieces.append(("message", None))
        elif ev.type == "done":
            service.remember(reply)
        yield pieces
        if reply.stopped:
            job.cancel.set()


async def run(service: Service, job, request, reply: Reply) -> Reply:
    """Drive a non-streaming job to its end, cancelling it if the client goes away."""

    gone = False

    async def watch():
        nonlocal gone
        while not job.cancel.is_set():
            await asyncio.sleep(0.25)
            if await request.is_disconnected():
                gone = True
                job.cancel.set()

    watcher = asyncio.create_task(watch())
    try:
        async for _ in generation(service, job, reply):
            pass
    except Exception as e:  # noqa: BLE001 - an OpenAI error object, and keep serving
        raise failure(e) from None
    finally:
        watcher.cancel()
    cut = None if gone else interrupted(service, reply)
    if cut is not None:
        raise cut
    return reply


def sse_response(stream, job):
    """A text/event-stream response; however it ends (a client that left included), the job,
    queued or running, is cancelled."""
    from fastapi.responses import StreamingResponse
    from starlette.background import BackgroundTask

    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"},
                             background=BackgroundTask(job.cancel.set))
