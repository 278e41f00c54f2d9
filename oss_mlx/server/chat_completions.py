"""POST /v1/chat/completions: a harmony reply as a chat.completion (or its chunk stream).

The final channel is `content`, the analysis `reasoning_content`, a call to a tool a
`tool_calls` entry; finish_reason as in wire.py.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from oss_mlx.server.conversation import (
    chat_items,
    chat_tools,
    conversation,
    restore_reasoning,
    select_tools,
)
from oss_mlx.server.protocol import ChatRequest, parse_request
from oss_mlx.server.service import (
    Service,
    failure,
    generation,
    interrupted,
    read_json,
    run,
    sse_response,
)
from oss_mlx.server.wire import Reply, chat_usage, new_id, now, sse


async def chat_completions(request: Request):
    service: Service = request.app.state.service
    req: ChatRequest = parse_request(ChatRequest, await read_json(request))
    service.check_model(req.model)
    tools = select_tools(chat_tools(req), req.tool_choice)
    spec, fmt_items = service.constraint(req.response_format, "response_format", tools)
    conv = conversation(
        restore_reasoning(chat_items(req), service.thoughts.get) + fmt_items, tools,
        req.reasoning_effort)
    prompt = service.prompt_tokens(conv)
    params = service.sampling(req, req.max_completion_tokens or req.max_tokens, spec)
    job = service.scheduler.submit(prompt, params)
    reply = Reply(stops=req.stop, tools=tools)
    request.state.reply = reply  # for the request's log line (app.RequestLog)
    head = {"id": new_id("chatcmpl-"), "created": now(), "model": service.model_name}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse_response(chunks(service, job, reply, head, include_usage), job)
    await run(service, job, request, reply)
    return completion(head, reply)


def completion(head: dict, reply: Reply) -> dict:
    message: dict[str, Any] = {"role": "assistant",
                               "content": reply.content if reply.content or not reply.calls
                               else None}
    message["reasoning_content"] = reply.reasoning or None
    if reply.calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for c in reply.calls]
    return {**head, "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": reply.finish_reason}],
            "usage": reply.usage(chat_usage)}


def chunk(head: dict, delta: dict, finish=None, usage=None, choices=True) -> str:
    out = {**head, "object": "chat.completion.chunk",
           "choices": [{"index": 0, "delta": delta, "logprobs": None,
                        "finish_reason": finish}] if choices else []}
    if usage is not None:
        out["usage"] = usage
    return sse(out)


def delta(kind: str, value, index: int) -> dict | None:
    """The chunk delta of one Reply piece (None for pieces a chat client does not see)."""
    if kind == "reasoning":
        return {"reasoning_content": value}
    if kind == "content":
        return {"content": value}
    if kind == "tool_call":
        return {"tool_calls": [{"index": index, "id": value.id, "type": "function",
                                "function": {"name": value.name, "arguments": ""}}]}
    if kind == "arguments" and value:
        return {"tool_calls": [{"index": index, "function": {"arguments": value}}]}
    return None


async def chunks(service: Service, job, reply: Reply, head: dict, include_usage: bool):
    yield chunk(head, {"role": "assistant", "content": ""})
    try:
        async for pieces in generation(service, job, reply):
            for kind, value in pieces:
                d = delta(kind, value, len(reply.tool_calls) - 1)
                if d is not None:
                    yield chunk(head, d)
    except Exception as e:  # noqa: BLE001 - the status line is sent: say it in-band
        err = failure(e)
    else:
        err = interrupted(service, reply)  # a shutdown: an error the client raises
    if err is not None:
        reply.error = err.message
        yield sse(err.body())
        yield sse("[DONE]")
        return
    yield chunk(head, {}, finish=reply.finish_reason)
    if include_usage:
        yield chunk(head, {}, usage=reply.usage(chat_usage), choices=False)
    yield sse("[DONE]")
