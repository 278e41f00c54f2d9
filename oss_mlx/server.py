"""`oss-mlx serve`: an OpenAI-compatible local HTTP server (FastAPI + uvicorn).

    oss-mlx serve --model gpt-oss-20b                       # http://127.0.0.1:8000/v1
    oss-mlx serve --model ./my-model --port 9000 --api-key sk-local

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/responses, GET /health.

One model, one generation at a time: requests wait in a FIFO queue and a single worker thread
runs them through the engine (which reuses its KV cache when a conversation grows). Tokens travel
from the worker to the request's coroutine through an asyncio queue, so streaming never blocks the
event loop. A client that goes away sets the generation's cancel event; the engine stops at the
next token.

Harmony in, OpenAI out: the final channel becomes `content` (Chat) or a `message` item
(Responses), the analysis channel `reasoning_content` or a `reasoning` item, and a message to
`functions.NAME` a structured tool call with finish_reason "tool_calls". No harmony markup ever
reaches the client: the engine's parser splits the channels, and we only forward their text.

Choices worth knowing:
- tool_choice "none" renders no tools; "auto" and "required" render them all (harmony cannot
  force a call, so "required" is a request, not a guarantee); a named function renders that one
  tool alone.
- `stop` strings cut the user-visible text (not the reasoning) and end the generation.
- A turn the model breaks (a stray control token) ends with what was parsed and
  finish_reason "stop"; max_tokens or a full context give "length" (Responses: "incomplete").
- The server remembers the reasoning before each tool call it made, and puts it back when a
  client returns the call without it (harmony keeps a tool chain's analysis; spec 5.7).
- The Responses API is stateless: `previous_response_id` is refused; send the items back.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations at run time.

import asyncio
import copy
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


# --------------------------------------------------------------------------------------------
# Small pieces of the OpenAI wire format.


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"{head}data: {body}\n\n"


def chat_usage(prompt: int, completion: int, cached: int, reasoning: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def responses_usage(prompt: int, completion: int, cached: int, reasoning: int) -> dict:
    return {"input_tokens": prompt, "output_tokens": completion,
            "total_tokens": prompt + completion,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens_details": {"reasoning_tokens": reasoning}}


def tool_name(recipient: str | None) -> str | None:
    """`functions.get_weather` -> `get_weather`; other recipients are not client tools."""
    if recipient and recipient.startswith("functions."):
        return recipient[len("functions."):]
    return None


# --------------------------------------------------------------------------------------------
# One generation at a time, in arrival order.

_END = object()
log = logging.getLogger("oss_mlx.server")


@dataclass
class Job:
    conversation: Any
    params: Any
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def put(self, item):
        # Called from the worker thread: hand the item to the request's event loop.
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down)
            self.cancel.set()


class Scheduler:
    """A worker thread that runs queued jobs through the engine, first come first served."""

    def __init__(self, engine):
        self.engine = engine
        self.current: Job | None = None
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="oss-mlx-engine", daemon=True)
        self._thread.start()

    def submit(self, conversation, params) -> Job:
        job = Job(conversation, params, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def close(self):
        """Stop after cancelling the running job and every queued one."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
                job.put(_END)
        if self.current is not None:
            self.current.cancel.set()
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _run(self):
        while (job := self._jobs.get()) is not None:
            if job.cancel.is_set():  # the client left while waiting its turn
                job.put(_END)
                continue
            self.current = job
            try:
                for ev in self.engine.stream(job.conversation, job.params, cancel=job.cancel):
                    job.put(ev)
            except Exception as e:  # noqa: BLE001 - reported to that request, the server lives on
                job.put(e)
            finally:
                self.current = None
            job.put(_END)


async def events(job: Job):
    """The engine events of `job`; leaving early (client gone, stop string) cancels it."""
    try:
        while (ev := await job.events.get()) is not _END:
            if isinstance(ev, Exception):
                raise ev
            yield ev
    finally:
        job.cancel.set()


# --------------------------------------------------------------------------------------------
# From engine events to what a client sees.


class StopFilter:
    """Cuts text at the first `stop` string, holding back a tail that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops, self.buf, self.hit = stops, "", False

    def feed(self, text: str) -> str:
        if self.hit:
            return ""
        if not self.stops:
            return text
        self.buf += text
        cuts = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if cuts:
            out, self.buf, self.hit = self.buf[: min(cuts)], "", True
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:k]):
                    hold = k
                    break
        out, self.buf = self.buf[: len(self.buf) - hold], self.buf[len(self.buf) - hold:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.hit else self.buf), ""
        return out


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""
    done: bool = False  # its harmony message closed (<|call|>); False when cut off


@dataclass
class Turn:
    """One assistant turn as the client sees it, built from engine deltas.

    `feed` returns the pieces to stream: ("reasoning", text), ("content", text),
    ("tool_call", ToolCall) when a call starts, ("arguments", text) as its JSON arrives.
    """

    stops: list[str] = field(default_factory=list)
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning_tokens: int = 0
    completion: Any = None
    _filter: StopFilter = None
    _open_call: bool = False

    def __post_init__(self):
        self._filter = StopFilter(self.stops)

    @property
    def stopped(self) -> bool:
        return self._filter.hit

    def feed(self, ev) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        if ev.type == "delta":
            name = tool_name(ev.recipient)
            if ev.recipient and name is None and ev.recipient not in ("assistant", "all", "user"):
                name = ev.recipient  # a call to a tool we did not declare: still a call, not text
            if name is not None:
                if not self._open_call:
                    call = ToolCall(new_id("call_"), name)
                    self.tool_calls.append(call)
                    self._open_call = True
                    out.append(("tool_call", call))
                self.tool_calls[-1].arguments += ev.text
                out.append(("arguments", ev.text))
            elif ev.channel == "analysis":
                self.reasoning_tokens += 1
                self.reasoning += ev.text
                out.append(("reasoning", ev.text))
            else:  # final, or a commentary preamble: both are for the user
                text = self._filter.feed(ev.text)
                if text:
                    self.content += text
                    out.append(("content", text))
        elif ev.type == "message":
            if self._open_call:
                self.tool_calls[-1].done = True
            self._open_call = False
        elif ev.type == "done":
            self.completion = ev.completion
            text = self._filter.flush()
            if text:
                self.content += text
                out.append(("content", text))
        return out

    @property
    def calls(self) -> list[ToolCall]:
        """The tool calls the model finished (one cut off by max_tokens is not a call)."""
        return [c for c in self.tool_calls if c.done]

    @property
    def finish_reason(self) -> str:
        reason = self.completion.stop_reason if self.completion else "stop"
        if self.calls:
            return "tool_calls"
        if reason in ("length", "context") and not self.stopped:
            return "length"
        return "stop"

    def usage(self, fmt):
        s = self.completion.stats
        return fmt(s.prompt_tokens, s.generated_tokens, s.cached_tokens, self.reasoning_tokens)


# --------------------------------------------------------------------------------------------
# The app.


def create_app(engine, model_name: str, api_key: str | None = None,
               default_max_tokens: int | None = None):
    """The FastAPI app serving `engine` as model `model_name` (a bearer `api_key` if given).

    default_max_tokens: the budget of a request that names none (None: the rest of the context,
    as OpenAI does).
    """
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .engine import SamplingParams
    from .errors import OssMlxError
    from .openai_api import (
        APIError,
        ChatRequest,
        ResponsesRequest,
        build_conversation,
        chat_items,
        chat_tools,
        parse_request,
        responses_items,
        responses_tools,
        restore_reasoning,
        select_tools,
    )

    state: dict[str, Scheduler] = {}
    thoughts: OrderedDict[str, str] = OrderedDict()  # tool call id -> the reasoning before it

    def remember(turn: "Turn"):
        for call in turn.calls if turn.reasoning else []:
            thoughts[call.id] = turn.reasoning
            while len(thoughts) > 4096:
                thoughts.popitem(last=False)

    @asynccontextmanager
    async def lifespan(app):
        state["scheduler"] = Scheduler(engine)
        yield
        state.pop("scheduler").close()

    async def authorize(request: Request):
        # A dependency, not an HTTP middleware: Starlette's BaseHTTPMiddleware would hide the
        # client's disconnect from the routes, and disconnects cancel generations.
        if api_key:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                     api_key.encode()):
                raise APIError(401, "invalid or missing API key: send "
                                    "`Authorization: Bearer <key>`", code="invalid_api_key")

    app = FastAPI(title="oss-mlx", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    v1 = {"dependencies": [Depends(authorize)]}  # /health stays open
    created = now()

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                              code=code))

    @app.exception_handler(Exception)
    async def _internal(request, e):  # a bug of ours: say so, keep serving
        return error(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    async def body(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None

    def check_model(name: str):
        if name != model_name:
            raise APIError(404, f"model {name!r} does not exist: this server serves "
                                f"{model_name!r}", code="model_not_found", param="model")

    def prompt_tokens(conversation) -> list[int]:
        """The rendered prompt; a 400 (context_length_exceeded) when it leaves no room."""
        try:
            tokens = engine.render(conversation)
        except OssMlxError as e:
            raise APIError(400, str(e)) from None
        n = len(tokens)
        if n >= engine.max_context:
            raise APIError(400, f"this request needs {n} prompt tokens, but the model's context "
                                f"is {engine.max_context} tokens: shorten the messages",
                           code="context_length_exceeded", param="messages")
        return tokens

    def sampling(req, max_tokens) -> SamplingParams:
        kw = {"max_tokens": max_tokens or default_max_tokens}
        if req.temperature is not None:
            kw["temperature"] = req.temperature
        if req.top_p is not None:
            kw["top_p"] = req.top_p
        if req.seed is not None:
            kw["seed"] = req.seed
        return SamplingParams(**kw)

    def sse_response(stream, job: Job) -> StreamingResponse:
        # The background task runs however the response ends, a client that left included, so
        # a job still queued or running is always cancelled.
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(job.cancel.set))

    def failure(e: Exception) -> APIError:
        msg = str(e) if isinstance(e, OssMlxError) else f"{type(e).__name__}: {e}"
        log.error("generation failed: %s", msg)
        return APIError(500, f"generation failed: {msg}", type="server_error",
                        code="server_error")

    async def generation(job: Job, turn: Turn):
        """The client-facing pieces of each engine event (see Turn.feed); a ("message", None)
        piece marks a harmony message boundary. A stop string cancels the rest."""
        async for ev in events(job):
            pieces = turn.feed(ev)
            if ev.type == "message":
                pieces.append(("message", None))
            elif ev.type == "done":
                remember(turn)
            yield pieces
            if turn.stopped:
                job.cancel.set()

    async def run(job: Job, request: Request, turn: Turn) -> Turn:
        """Drive a non-streaming job to its end, cancelling it if the client goes away."""

        async def watch():
            while not job.cancel.is_set():
                await asyncio.sleep(0.25)
                if await request.is_disconnected():
                    job.cancel.set()

        watcher = asyncio.create_task(watch())
        try:
            async for _ in generation(job, turn):
                pass
        except Exception as e:  # noqa: BLE001 - an OpenAI error object, and keep serving
            raise failure(e) from None
        finally:
            watcher.cancel()
        return turn

    # ---- routes ---------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    def model_card():
        return {"id": model_name, "object": "model", "created": created, "owned_by": "oss-mlx"}

    @app.get("/v1/models", **v1)
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", **v1)
    async def model(name: str):
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions", **v1)
    async def chat_completions(request: Request):
        req: ChatRequest = parse_request(ChatRequest, await body(request))
        check_model(req.model)
        conversation = build_conversation(
            restore_reasoning(chat_items(req), thoughts.get),
            select_tools(chat_tools(req), req.tool_choice), req.reasoning_effort)
        prompt = prompt_tokens(conversation)
        params = sampling(req, req.max_completion_tokens or req.max_tokens)
        job = state["scheduler"].submit(prompt, params)
        turn = Turn(stops=req.stop)
        cid, created_at = new_id("chatcmpl-"), now()

        def chunk(delta: dict, finish=None, usage=None, choices=True) -> str:
            out = {"id": cid, "object": "chat.completion.chunk", "created": created_at,
                   "model": model_name,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                "finish_reason": finish}] if choices else []}
            if usage is not None:
                out["usage"] = usage
            return sse(out)

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def stream():
                yield chunk({"role": "assistant", "content": ""})
                try:
                    async for pieces in generation(job, turn):
                        for kind, value in pieces:
                            if kind == "reasoning":
                                yield chunk({"reasoning_content": value})
                            elif kind == "content":
                                yield chunk({"content": value})
                            elif kind == "tool_call":
                                yield chunk({"tool_calls": [{
                                    "index": len(turn.tool_calls) - 1, "id": value.id,
                                    "type": "function",
                                    "function": {"name": value.name, "arguments": ""}}]})
                            elif kind == "arguments" and value:
                                yield chunk({"tool_calls": [{
                                    "index": len(turn.tool_calls) - 1,
                                    "function": {"arguments": value}}]})
                except Exception as e:  # noqa: BLE001 - the status line is sent: say it in-band
                    yield sse(failure(e).body())
                    yield sse("[DONE]")
                    return
                if turn.completion is None:  # cancelled before it ran
                    return
                yield chunk({}, finish=turn.finish_reason)
                if include_usage:
                    yield chunk({}, usage=turn.usage(chat_usage), choices=False)
                yield sse("[DONE]")

            return sse_response(stream(), job)

        await run(job, request, turn)
        message: dict[str, Any] = {"role": "assistant",
                                   "content": turn.content if turn.content or not turn.calls
                                   else None}
        message["reasoning_content"] = turn.reasoning or None
        if turn.calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}} for c in turn.calls]
        return {"id": cid, "object": "chat.completion", "created": created_at,
                "model": model_name,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": turn.finish_reason}],
                "usage": turn.usage(chat_usage)}

    @app.post("/v1/responses", **v1)
    async def responses(request: Request):
        req: ResponsesRequest = parse_request(ResponsesRequest, await body(request))
        check_model(req.model)
        if req.previous_response_id:
            raise APIError(400, "previous_response_id is not supported: this server keeps no "
                                "state; send the whole conversation as `input` items",
                           param="previous_response_id")
        effort = req.reasoning.effort if req.reasoning else None
        tools = responses_tools(req)
        conversation = build_conversation(
            restore_reasoning(responses_items(req), thoughts.get),
            select_tools(tools, req.tool_choice), effort)
        prompt = prompt_tokens(conversation)
        job = state["scheduler"].submit(prompt, sampling(req, req.max_output_tokens))
        turn = Turn()
        rid, created_at = new_id("resp_"), now()
        skeleton = {
            "id": rid, "object": "response", "created_at": created_at, "model": model_name,
            "status": "in_progress", "error": None, "incomplete_details": None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "parallel_tool_calls": False, "previous_response_id": None,
            "reasoning": {"effort": effort, "summary": None},
            "temperature": req.temperature, "top_p": req.top_p,
            "text": {"format": {"type": "text"}},
            "tool_choice": req.tool_choice or "auto",
            "tools": [{"type": "function", "name": t.name, "description": t.description,
                       "parameters": t.parameters, "strict": False} for t in tools],
            "truncation": "disabled", "metadata": {}, "output": [], "usage": None,
        }

        def finished() -> dict:
            status = last_status(turn)
            return {**skeleton, "status": status, "output": items.done(),
                    "incomplete_details": {"reason": "max_output_tokens"}
                    if status == "incomplete" else None,
                    "usage": turn.usage(responses_usage)}

        items = OutputItems()
        if req.stream:
            async def stream():
                seq = 0

                def event(type_: str, **data) -> str:
                    nonlocal seq
                    seq += 1
                    return sse({"type": type_, "sequence_number": seq - 1, **data}, event=type_)

                yield event("response.created", response=skeleton)
                yield event("response.in_progress", response=skeleton)
                try:
                    async for pieces in generation(job, turn):
                        for kind, value in pieces:
                            if kind == "message":
                                out = items.close()
                            else:
                                out = items.feed(kind, value)
                            for type_, data in out:
                                yield event(type_, **data)
                except Exception as e:  # noqa: BLE001 - the status line is sent: say it in-band
                    err = failure(e)
                    yield event("error", code=err.code, message=err.message, param=None)
                    yield event("response.failed", response={
                        **skeleton, "status": "failed",
                        "error": {"code": "server_error", "message": err.message}})
                    return
                if turn.completion is None:
                    return
                for type_, data in items.close(last_status(turn)):
                    yield event(type_, **data)
                final = finished()
                yield event("response.incomplete" if final["status"] == "incomplete"
                            else "response.completed", response=final)

            return sse_response(stream(), job)

        await run(job, request, turn)
        for kind, value in _replay(turn):
            items.feed(kind, value)
        items.close(last_status(turn))
        return finished()

    return app


def last_status(turn: Turn) -> str:
    """The status of the item open when the turn ended: "incomplete" if max tokens cut it."""
    return "incomplete" if turn.finish_reason == "length" else "completed"


def _replay(turn: Turn):
    """The pieces of a finished turn in output order, for building Responses items at once."""
    if turn.reasoning:
        yield "reasoning", turn.reasoning
    if turn.content:
        yield "content", turn.content
    for call in turn.calls:
        yield "tool_call", call
        yield "arguments", call.arguments


class OutputItems:
    """Responses API output items (reasoning, message, function_call) and their stream events."""

    def __init__(self):
        self.items: list[dict] = []
        self.open: dict | None = None

    def done(self) -> list[dict]:
        return self.items

    def _start(self, item: dict) -> list[tuple[str, dict]]:
        events = self.close()
        self.items.append(item)
        self.open = item
        idx = len(self.items) - 1
        events.append(("response.output_item.added", {"output_index": idx,
                                                      "item": copy.deepcopy(item)}))
        if item["type"] == "message":
            events.append(("response.content_part.added", {
                "item_id": item["id"], "output_index": idx, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []}}))
        return events

    def feed(self, kind: str, value) -> list[tuple[str, dict]]:
        events: list[tuple[str, dict]] = []
        cur = self.open
        if kind == "reasoning":
            if cur is None or cur["type"] != "reasoning":
                events += self._start({"type": "reasoning", "id": new_id("rs_"), "summary": [],
                                       "content": [{"type": "reasoning_text", "text": ""}],
                                       "status": "in_progress"})
            self.open["content"][0]["text"] += value
            events.append(("response.reasoning_text.delta", {
                "item_id": self.open["id"], "output_index": len(self.items) - 1,
                "content_index": 0, "delta": value}))
        elif kind == "content":
            if cur is None or cur["type"] != "message":
                events += self._start({"type": "message", "id": new_id("msg_"),
                                       "role": "assistant", "status": "in_progress",
                                       "content": [{"type": "output_text", "text": "",
                                                    "annotations": [], "logprobs": []}]})
            self.open["content"][0]["text"] += value
            events.append(("response.output_text.delta", {
                "item_id": self.open["id"], "output_index": len(self.items) - 1,
                "content_index": 0, "delta": value, "logprobs": []}))
        elif kind == "tool_call":
            events += self._start({"type": "function_call", "id": new_id("fc_"),
                                   "call_id": value.id, "name": value.name, "arguments": "",
                                   "status": "in_progress"})
        elif kind == "arguments" and value and cur is not None:
            cur["arguments"] += value
            events.append(("response.function_call_arguments.delta", {
                "item_id": cur["id"], "output_index": len(self.items) - 1, "delta": value}))
        return events

    def close(self, status: str = "completed") -> list[tuple[str, dict]]:
        """Finish the open item (at a harmony message boundary or, cut or not, at the end)."""
        item, self.open = self.open, None
        if item is None:
            return []
        idx = self.items.index(item)
        item["status"] = status
        events: list[tuple[str, dict]] = []
        if item["type"] == "reasoning":
            events.append(("response.reasoning_text.done", {
                "item_id": item["id"], "output_index": idx, "content_index": 0,
                "text": item["content"][0]["text"]}))
        elif item["type"] == "message":
            part = item["content"][0]
            events.append(("response.output_text.done", {
                "item_id": item["id"], "output_index": idx, "content_index": 0,
                "text": part["text"], "logprobs": []}))
            events.append(("response.content_part.done", {
                "item_id": item["id"], "output_index": idx, "content_index": 0, "part": part}))
        elif item["type"] == "function_call":
            events.append(("response.function_call_arguments.done", {
                "item_id": item["id"], "output_index": idx, "name": item["name"],
                "arguments": item["arguments"]}))
        events.append(("response.output_item.done", {"output_index": idx,
                                                     "item": copy.deepcopy(item)}))
        return events


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
    parser.add_argument("--demo", action="store_true",
                        help="serve a tiny random-weight model made on the spot, as "
                             "'tiny-random' (no download; its output is noise)")


def main(args) -> int:
    import contextlib
    import signal
    import socket
    import sys
    from pathlib import Path

    import uvicorn

    from .distributed import load_engine
    from .errors import OssMlxError

    if not 0 <= args.port < 65536:
        raise OssMlxError(f"--port {args.port}: not a port number")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise OssMlxError(f"--max-tokens {args.max_tokens}: must be at least 1")
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
        engine = load_engine(str(model_dir))  # one rank of an mlx.launch: see oss_mlx.distributed
        name = args.name or default_name
        app = create_app(engine, name, api_key=args.api_key, default_max_tokens=max_tokens)
        port = sock.getsockname()[1]
        print(f"oss-mlx: serving {name!r} at http://{args.host}:{port}/v1"
              + (" (API key required)" if args.api_key else ""), flush=True)
        if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
            print("oss-mlx: warning: listening beyond this machine without --api-key", flush=True)
        # Ctrl-C: give open requests 2 s, then cancel them (which cancels their generations).
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                               timeout_graceful_shutdown=2))
        # uvicorn re-raises SIGTERM once it has shut down; end as for Ctrl-C instead of dying
        # there, so the demo model's temporary folder is removed.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        server.run(sockets=[sock])
    return 0
