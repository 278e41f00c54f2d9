"""One log line per request on the "oss_mlx.server" logger (status, prompt / cached / generated
tokens, TTFT, tok/s, time, how it ended), and `serve --log-level`. The line is written before
the answer's last bytes leave, so a client holding a whole answer finds its line in the log."""

from __future__ import annotations

import logging
import re
import signal

import httpx
import pytest
from support.scripted import ScriptedModel
from support.serverkit import ServerThread, StrictTransport

from oss_mlx.engine import Engine
from oss_mlx.server import create_app

MODEL = "scripted-oss"
ANSWER = ("<|channel|>analysis<|message|>Think.<|end|><|start|>assistant"
          "<|channel|>final<|message|>Fine, thanks.<|return|>")
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "How are you?"}]}
LINE = re.compile(r"^(?P<method>[A-Z]+) (?P<path>\S+) (?P<status>\d{3})(?P<stream> stream)?: "
                  r"(?:prompt (?P<prompt>\d+) tokens \((?P<cached>\d+) cached\), generated "
                  r"(?P<generated>\d+), TTFT (?P<ttft>[\d.]+) s, (?P<tps>[\d.]+) tok/s, )?"
                  r"(?P<rest>.*)$")


@pytest.fixture(scope="module")
def server(encoding):
    model = ScriptedModel(encoding=encoding)
    with ServerThread(create_app(Engine(model, encoding), MODEL)) as srv:
        srv.model = model
        yield srv


@pytest.fixture
def srv(server, caplog):
    caplog.set_level(logging.INFO, logger="oss_mlx.server")
    server.model.queue.clear()
    server.http = httpx.Client(base_url=server.url, transport=StrictTransport(), timeout=60)
    server.caplog = caplog
    yield server
    server.http.close()


def lines(caplog) -> list[dict]:
    out = []
    for r in caplog.records:
        m = LINE.match(r.getMessage()) if r.name == "oss_mlx.server" else None
        if m:
            out.append({**m.groupdict(), "level": r.levelno})
    return out


def test_one_line_per_request_with_its_figures(srv):
    srv.model.push(ANSWER).push(ANSWER)
    first = srv.http.post("/v1/chat/completions", json=CHAT).json()["usage"]
    body = {**CHAT, "messages": CHAT["messages"] + [
        {"role": "assistant", "content": "Fine, thanks."}, {"role": "user", "content": "Sure?"}]}
    with srv.http.stream("POST", "/v1/chat/completions",
                         json={**body, "stream": True, "stream_options": {"include_usage": True}}
                         ) as r:
        text = r.read().decode()
    second = [ln for ln in text.split("\n\n") if '"usage"' in ln and '"prompt_tokens"' in ln]
    got = lines(srv.caplog)
    assert len(got) == 2, got
    for line, usage, stream in ((got[0], first, None), (got[1], second, " stream")):
        assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/chat/completions",
                                                                  "200")
        assert line["stream"] == stream and line["level"] == logging.INFO
        assert float(line["ttft"]) >= 0 and float(line["tps"]) >= 0
        assert re.fullmatch(r"[\d.]+ s, stop", line["rest"]), line
    assert (int(got[0]["prompt"]), int(got[0]["cached"]), int(got[0]["generated"])) == (
        first["prompt_tokens"], first["prompt_tokens_details"]["cached_tokens"],
        first["completion_tokens"])
    assert int(got[1]["cached"]) > 0 and f'"prompt_tokens":{got[1]["prompt"]}' in \
        second[0].replace(" ", "")


def test_errors_are_one_line_with_their_message(srv):
    srv.http.post("/v1/responses", json={"model": MODEL, "input": "x", "store": 0})
    srv.http.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    srv.http.get("/health")  # polled: below INFO
    got = lines(srv.caplog)
    assert [(g["path"], g["status"]) for g in got] == [("/v1/responses", "400"),
                                                       ("/v1/chat/completions", "404")]
    assert got[0]["rest"].startswith("invalid request: store: Input should be a valid boolean")
    assert "'nope' does not exist" in got[1]["rest"]


def test_a_stream_that_fails_says_why_at_warning(srv):
    def boom():
        raise RuntimeError("the device went away")

    srv.model.push(ANSWER).at(3, boom)
    with srv.http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        r.read()
    (line,) = lines(srv.caplog)
    assert line["status"] == "200" and line["stream"] and line["level"] == logging.WARNING
    assert "generation failed: RuntimeError: the device went away" in line["rest"]


@pytest.mark.subprocess
@pytest.mark.slow
def test_serve_log_level_and_max_body(tmp_path):
    """The real command: at info each request has its line on stderr (a body over --max-body
    too, refused with a 413); at warning there is none."""
    from test_serve_cache_dir import Serve

    for level, expect in (("info", True), ("warning", False)):
        srv = Serve("--log-level", level, "--max-body", "2KB", "--no-cache-dir")
        ok = httpx.post(srv.url + "/chat/completions", json=CHAT, timeout=60)
        big = httpx.post(srv.url + "/chat/completions", timeout=60, json={
            **CHAT, "messages": [{"role": "user", "content": "x" * 3000}]})
        _, err = srv.stop(signal.SIGTERM)
        assert ok.status_code == 200 and big.status_code == 413, (ok.text, big.text)
        logged = [ln for ln in err.splitlines() if "oss_mlx.server: POST" in ln]
        if expect:
            assert len(logged) == 2, err
            assert " 200: prompt " in logged[0], logged
            assert re.search(r" 413: the request body is [\d.]+ KB, more than", logged[1]), logged
        else:
            assert logged == [], err
