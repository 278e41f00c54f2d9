"""A reply the server cuts is never reported as a whole one: a shutdown (what SIGTERM or Ctrl-C
calls, StoppingServer.handle_exit) in the middle of a streamed answer ends the stream with an
error the `openai` client raises (Chat) or an `error` and a `response.failed` event (Responses),
not `finish_reason: "stop"` and `[DONE]`; a non-streamed request cut the same way is a 503. An
engine error in the middle of a stream ends the same way.

The model is gated (serverkit.gated): it takes a decode step only when the test allows one, so
"in the middle of the answer" is an explicit point, not a sleep.
"""

from __future__ import annotations

import signal
import socket
import threading

import httpx
import openai
import pytest
import uvicorn
from support.scripted import ScriptedModel
from support.serverkit import JobLog, Ready, StrictTransport, gated

from oss_mlx.engine import Engine
from oss_mlx.server import create_app
from oss_mlx.server.app import StoppingServer

MODEL = "scripted-oss"
LONG = "<|channel|>final<|message|>" + "la " * 400 + "<|return|>"
ASK = [{"role": "user", "content": "Sing."}]


class _Server(Ready, StoppingServer):
    pass


class Stopping:
    """`serve`'s own server class (as serve.py configures it) on a gated ScriptedModel, in a
    thread; `sigterm()` is what the process's SIGTERM handler calls."""

    def __init__(self, encoding):
        self.model = gated(ScriptedModel)(encoding=encoding, max_context=4096)
        self.app = create_app(Engine(self.model, encoding), MODEL)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = _Server(uvicorn.Config(self.app, log_level="warning",
                                             timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.transport = StrictTransport()

    def __enter__(self):
        self.thread.start()
        assert self.server.ready.wait(30), "server did not start"
        self.jobs = JobLog(self.app.state.service.scheduler)
        return self

    def __exit__(self, *exc):
        self.model.free()
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
        assert not self.thread.is_alive()
        assert not self.transport.failures, self.transport.failures

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                             http_client=httpx.Client(transport=self.transport, timeout=60))

    def sigterm(self):
        self.server.handle_exit(signal.SIGTERM, None)


def read_until(it, enough) -> list:
    got = []
    while not enough(got):
        got.append(next(it))
    return got


def chat_text(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_chat_stream_cut_by_a_shutdown_raises(encoding):
    with Stopping(encoding) as srv:
        srv.model.hold()
        srv.model.push(LONG)
        stream = srv.client().chat.completions.create(model=MODEL, messages=ASK, stream=True)
        it = iter(stream)
        srv.model.allow(8)
        got = read_until(it, lambda got: chat_text(got).count("la") >= 3)
        srv.sigterm()
        srv.model.free()
        with pytest.raises(openai.APIError, match="shutting down") as err:
            for chunk in it:
                got.append(chunk)
        assert err.value.body["type"] == "server_error"
        assert all(c.choices[0].finish_reason is None for c in got if c.choices)
        assert chat_text(got).count("la") < 400


def test_responses_stream_cut_by_a_shutdown_fails(encoding):
    with Stopping(encoding) as srv:
        srv.model.hold()
        srv.model.push(LONG)
        stream = srv.client().responses.create(model=MODEL, input="Sing.", stream=True)
        it = iter(stream)
        srv.model.allow(8)
        got = read_until(it, lambda got: sum(e.type == "response.output_text.delta"
                                             for e in got) >= 3)
        srv.sigterm()
        srv.model.free()
        got += list(it)
        types = [e.type for e in got]
        assert "response.completed" not in types and "response.incomplete" not in types
        assert types[-2:] == ["error", "response.failed"], types
        failed = got[-1].response
        assert failed.status == "failed" and "shutting down" in failed.error.message
        assert failed.output and failed.output[0].status == "incomplete"  # what it had, marked


def test_a_non_streamed_request_cut_by_a_shutdown_is_a_503(encoding):
    with Stopping(encoding) as srv:
        srv.model.hold()
        srv.model.push(LONG)
        result = {}

        def ask():
            try:
                srv.client().chat.completions.create(model=MODEL, messages=ASK)
            except openai.APIStatusError as e:
                result["error"] = e

        asker = threading.Thread(target=ask)
        asker.start()
        srv.jobs.wait(1)  # the request is with the engine
        srv.sigterm()
        srv.model.free()
        asker.join(60)
        assert result["error"].status_code == 503
        assert "shutting down" in result["error"].message


def boom():
    raise RuntimeError("the device went away")


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_an_engine_error_mid_stream_is_an_error_event(encoding, api):
    with Stopping(encoding) as srv:
        srv.model.push(LONG).at(5, boom)
        client = srv.client()
        if api == "chat":
            with pytest.raises(openai.APIError, match="device went away"):
                for chunk in client.chat.completions.create(model=MODEL, messages=ASK,
                                                            stream=True):
                    assert not chunk.choices or chunk.choices[0].finish_reason is None
        else:
            events = list(client.responses.create(model=MODEL, input="Sing.", stream=True))
            assert [e.type for e in events][-2:] == ["error", "response.failed"]
            assert "device went away" in events[-1].response.error.message
