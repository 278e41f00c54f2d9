"""Server test kit: uvicorn in a thread, and strict checks of every body against the openai types.

`StrictTransport` sits under the openai client (and httpx calls) of the server tests: every
response body and every server-sent event is validated against the `openai` package's own
pydantic types (ChatCompletion, ChatCompletionChunk, Response, each ResponseStreamEvent, Model,
the error object), strictly: a missing required field, a wrong literal and a field the type does
not declare are all failures. The one field we add on purpose is `reasoning_content` on Chat
messages and deltas (how gpt-oss servers return the analysis channel).
"""

from __future__ import annotations

import functools
import json
import socket
import threading

from typing import Literal

import httpx
import pydantic
import uvicorn
from openai.types import Model
from openai.types.shared import ErrorObject

EXTRA_OK = {"reasoning_content"}


class Ready:
    """A uvicorn server class with an event set once it listens (its `started` flag has none to
    wait on): `class S(Ready, uvicorn.Server)`."""

    def __init__(self, config):
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets=None):
        await super().startup(sockets=sockets)
        self.ready.set()


class _Server(Ready, uvicorn.Server):
    pass


class ServerThread:
    """uvicorn serving `app` on a free loopback port, in a background thread."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = _Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        assert self.server.ready.wait(30), "server did not start"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


# ---- strict validation ------------------------------------------------------------------------


def _no_extra(obj, where: str):
    if isinstance(obj, pydantic.BaseModel):
        extra = set(obj.model_extra or {}) - EXTRA_OK
        assert not extra, f"{where}: fields the openai types do not declare: {sorted(extra)}"
        for name in type(obj).model_fields:
            _no_extra(getattr(obj, name), f"{where}.{name}")
    elif isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            _no_extra(x, f"{where}[{i}]")
    elif isinstance(obj, dict):
        for k, x in obj.items():
            _no_extra(x, f"{where}.{k}")


@functools.lru_cache(maxsize=None)
def _adapter(type_) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(type_)


def strict(type_, data: dict, where: str = "body"):
    """`data` validated as the openai type `type_` (a model or a union), with no extra field."""
    obj = _adapter(type_).validate_python(data)
    if isinstance(obj, pydantic.BaseModel) and "type" in type(obj).model_fields:
        assert obj.type == data.get("type"), f"{where}: {data.get('type')!r} read as {obj.type!r}"
    _no_extra(obj, where)
    return obj


def _types(method: str, path: str):
    """(body type, event type) of an endpoint's successful answers."""
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.responses import Response, ResponseStreamEvent

    if path.endswith("/chat/completions"):
        return ChatCompletion, ChatCompletionChunk
    if path.endswith("/responses") or (path.split("/")[-2:-1] == ["responses"]
                                       and method == "GET"):
        return Response, ResponseStreamEvent
    if path.endswith("/models"):
        return ModelList, None
    if "/models/" in path:
        return Model, None
    return None, None


class ModelList(pydantic.BaseModel):
    object: Literal["list"]
    data: list[Model]


class ErrorBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    error: ErrorObject


def check_body(method: str, path: str, status: int, content: bytes):
    if not path.startswith("/v1/"):
        return
    data = json.loads(content)
    if status >= 400:
        strict(ErrorBody, data, f"{method} {path} {status}")
        return
    body_type, _ = _types(method, path)
    if body_type is not None and not (method == "DELETE"):
        strict(body_type, data, f"{method} {path}")


def check_event(method: str, path: str, data: str):
    if data == "[DONE]":
        return
    event = json.loads(data)
    if "error" in event and "object" not in event and "type" not in event:  # chat in-band
        strict(ErrorBody, event, f"{path} stream error")
        return
    _, event_type = _types(method, path)
    strict(event_type, event, f"{path} event {event.get('type', '')}")


class _CheckedStream(httpx.SyncByteStream):
    def __init__(self, inner, request, response, failures):
        self.inner, self.request, self.response, self.failures = inner, request, response, failures
        self.sse = response.headers.get("content-type", "").startswith("text/event-stream")

    def _check(self, fn, *args):
        try:
            fn(self.request.method, self.request.url.path, *args)
        except (AssertionError, pydantic.ValidationError, ValueError) as e:
            self.failures.append(f"{self.request.method} {self.request.url.path}: {e}")
            raise

    def __iter__(self):
        buf = b""
        for chunk in self.inner:
            buf += chunk
            if self.sse:
                while b"\n\n" in buf:
                    block, buf = buf.split(b"\n\n", 1)
                    data = [ln[6:] for ln in block.decode().splitlines()
                            if ln.startswith("data: ")]
                    if data:
                        self._check(check_event, "\n".join(data))
            yield chunk
        if not self.sse and buf:
            self._check(check_body, self.response.status_code, buf)

    def close(self):
        self.inner.close()


class StrictTransport(httpx.HTTPTransport):
    """An httpx transport that validates what the server sends (see the module docstring).
    Failures are raised where the client reads, and kept in `failures` for the fixture."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.failures: list[str] = []

    def handle_request(self, request):
        response = super().handle_request(request)
        response.stream = _CheckedStream(response.stream, request, response, self.failures)
        return response


def sse_events(response) -> list[dict]:
    """The JSON events of a raw SSE httpx response (after reading it)."""
    out = []
    for block in response.text.split("\n\n"):
        data = [ln[6:] for ln in block.splitlines() if ln.startswith("data: ")]
        if data and data[0] != "[DONE]":
            out.append(json.loads("\n".join(data)))
    return out


# ---- explicit synchronisation ---------------------------------------------------------------


def gated(base):
    """A ScriptedModel subclass whose decode steps can be held and let go one by one.

    `hold()` makes each decode step wait for a permit; `allow(n)` grants n steps; `free()` lets
    it run freely again. `steps[i]`: the decode steps request i (the i-th prefill) has taken.
    Tests then know exactly where a generation stands instead of sleeping and hoping.
    """

    class Gated(base):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.permits: threading.Semaphore | None = None
            self.steps: dict[int, int] = {}

        def hold(self):
            self.permits = threading.Semaphore(0)

        def allow(self, n: int):
            self.permits.release(n)

        def free(self):
            permits, self.permits = self.permits, None
            if permits is not None:
                permits.release(1_000_000)

        def __call__(self, tokens, cache=None):
            permits = self.permits
            if permits is not None:
                assert permits.acquire(timeout=60), "a held generation was never let go"
            request = len(self.prompts) - 1
            self.steps[request] = self.steps.get(request, 0) + 1
            return super().__call__(tokens, cache)

    return Gated


class JobLog:
    """Records the jobs a scheduler is given (wraps its `submit`), with an event per arrival."""

    def __init__(self, scheduler):
        self.jobs: list = []
        self.arrived = threading.Condition()
        inner = scheduler.submit

        def submit(*a, **kw):
            job = inner(*a, **kw)
            with self.arrived:
                self.jobs.append(job)
                self.arrived.notify_all()
            return job

        scheduler.submit = submit
        self._undo = lambda: scheduler.__dict__.pop("submit", None)

    def wait(self, n: int, timeout: float = 30):
        """Block until `n` jobs have arrived; the n-th."""
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.jobs) >= n, timeout), \
                f"{len(self.jobs)} of {n} requests arrived"
        return self.jobs[n - 1]

    def close(self):
        self._undo()
