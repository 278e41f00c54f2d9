"""POST /v1/responses (and GET / DELETE /v1/responses/{id}): a harmony reply as a Response.

Output items: `reasoning` (the analysis channel; with `include: ["reasoning.encrypted_content"]`
also sealed into `encrypted_content`, which the server restores when the client sends the item
back without its text), `message` (final channel), and one call item per tool call:
`function_call` (with `namespace` for a tool of a namespace), `custom_tool_call` (freeform
input) or `local_shell_call`.

`store` (default true, as OpenAI) keeps the response in memory (the last 256), so a later
request can continue it with `previous_response_id` instead of resending the items; the
instructions are not carried over, as OpenAI does. `parallel_tool_calls` is echoed: gpt-oss
calls one tool per turn, and parallel calls a client sends back are rendered as call/result
pairs.
"""

from __future__ import annotations

import copy

from starlette.requests import Request

from oss_mlx.server import builtin_tools
from oss_mlx.server.conversation import (
    conversation,
    custom_input,
    responses_items,
    responses_tools,
    restore_reasoning,
    select_tools,
    shell_action,
)
from oss_mlx.server.protocol import APIError, ResponsesRequest, parse_request
from oss_mlx.server.service import (
    Service,
    failure,
    generation,
    interrupted,
    read_json,
    run,
    sse_response,
)
from oss_mlx.server.wire import Reply, ToolCall, new_id, now, responses_usage, sse


def history(service: Service, req: ResponsesRequest) -> list[dict]:
    """The input items, after those of the stored response `previous_response_id` continues."""
    new = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    if not req.previous_response_id:
        return list(new)
    stored = service.responses.get(req.previous_response_id)
    if stored is None:
        raise APIError(400, f"previous response {req.previous_response_id!r} not found: it was "
                            "not stored (`store: false`), or this server restarted or has "
                            "forgotten it", code="previous_response_not_found",
                       param="previous_response_id")
    return stored["input"] + stored["response"]["output"] + list(new)


def echo_tools(req: ResponsesRequest) -> list[dict]:
    """The request's tools as the response lists them."""
    out = []
    for t in req.tools or []:
        d = t.model_dump(exclude_none=True)
        if t.type == "function":
            d = {"parameters": None, "strict": False, **d}
        elif t.type == "namespace":
            d = {"description": "", **d, "tools": [
                {"parameters": None, "strict": False, **x} if x.get("type") == "function" else x
                for x in d["tools"]]}
        out.append(d)
    return out


async def create_response(request: Request):
    service: Service = request.app.state.service
    req: ResponsesRequest = parse_request(ResponsesRequest, await read_json(request))
    service.check_model(req.model)
    inputs = history(service, req)
    effort = req.reasoning.effort if req.reasoning else None
    builtins = builtin_tools.served(service, req)  # serve --builtin-tools: run here
    tools = select_tools(responses_tools(builtin_tools.client_tools(req, builtins)),
                         req.tool_choice)
    items = responses_items(req.model_copy(update={"input": inputs}), service.sealer.unseal,
                            builtin_tools.input_items(service))
    spec, fmt_items = service.constraint((req.text or {}).get("format"), "text.format", tools)
    conv = conversation(
        restore_reasoning(items, service.thoughts.get) + fmt_items, tools, effort)
    if builtins:
        conv = service.builtins.declare(conv, builtins)
    prompt = service.prompt_tokens(conv)
    job = None if builtins else service.scheduler.submit(
        prompt, service.sampling(req, req.max_output_tokens, spec))
    reply = Reply(tools=tools)
    request.state.reply = reply  # for the request's log line (app.RequestLog)
    seal = service.sealer.seal if "reasoning.encrypted_content" in (req.include or []) else None
    out = OutputItems(seal)
    skeleton = {
        "id": new_id("resp_"), "object": "response", "created_at": now(),
        "model": service.model_name, "status": "in_progress", "error": None,
        "incomplete_details": None, "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": effort, "summary": req.reasoning.summary if req.reasoning
                      else None},
        "temperature": req.temperature, "top_p": req.top_p,
        "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
        "tool_choice": req.tool_choice or "auto",
        "tools": echo_tools(req), "truncation": "disabled", "metadata": req.metadata or {},
        "output": [], "usage": None,
    }
    finish = Finish(service, req, inputs, skeleton, reply, out)
    if builtins:  # the model's calls to them run between its completions (builtin_turn.py)
        from oss_mlx.server.builtin_turn import respond

        return await respond(service, request, req, builtins, conv, spec, finish, stream)
    if req.stream:
        return sse_response(stream(service, job, finish), job)
    await run(service, job, request, reply)
    for kind, value in replay(reply):
        out.feed(kind, value)
    out.close(item_status(reply))
    return finish()


class Finish:
    """The finished Response of a request (stored when `store` is set)."""

    def __init__(self, service, req, inputs, skeleton, reply, out):
        self.service, self.req, self.inputs = service, req, inputs
        self.skeleton, self.reply, self.out = skeleton, reply, out

    def __call__(self) -> dict:
        reason = self.reply.incomplete_reason
        response = {**self.skeleton, "status": "incomplete" if reason else "completed",
                    "output": self.out.items,
                    "incomplete_details": {"reason": reason} if reason else None,
                    "usage": self.reply.usage(responses_usage), "completed_at": now()}
        if self.req.store:
            self.service.responses.put(response["id"], {"input": self.inputs,
                                                        "response": copy.deepcopy(response)})
        return response


async def stream(service: Service, job, finish: Finish, source=None):
    """The response's events; `source`: the turn's pieces when not the job's alone (built-in
    tools, builtin_turn.py)."""
    seq = 0

    def event(type_: str, **data) -> str:
        nonlocal seq
        seq += 1
        return sse({"type": type_, "sequence_number": seq - 1, **data}, event=type_)

    skeleton, reply, out = finish.skeleton, finish.reply, finish.out
    yield event("response.created", response=skeleton)
    yield event("response.in_progress", response=skeleton)
    try:
        async for pieces in source or generation(service, job, reply):
            for kind, value in pieces:
                for type_, data in out.close() if kind == "message" else out.feed(kind, value):
                    yield event(type_, **data)
    except Exception as e:  # noqa: BLE001 - the status line is sent: say it in-band
        err = failure(e)
    else:
        err = interrupted(service, reply)  # a shutdown: never a normal end
    if err is not None:
        reply.error = err.message
        for type_, data in out.close("incomplete"):
            yield event(type_, **data)
        yield event("error", code=err.code, message=err.message, param=None)
        yield event("response.failed", response={
            **skeleton, "status": "failed", "output": out.items,
            "error": {"code": "server_error", "message": err.message}})
        return
    for type_, data in out.close(item_status(reply)):
        yield event(type_, **data)
    final = finish()
    yield event("response.incomplete" if final["status"] == "incomplete"
                else "response.completed", response=final)


def item_status(reply: Reply) -> str:
    """The status of the item open when the reply ended: "incomplete" if the reply was cut."""
    return "incomplete" if reply.incomplete_reason else "completed"


def replay(reply: Reply):
    """The pieces of a finished reply in output order, for building Responses items at once."""
    if reply.reasoning:
        yield "reasoning", reply.reasoning
    if reply.content:
        yield "content", reply.content
    for call in reply.calls:
        yield "tool_call", call
        yield "arguments", call.arguments


def call_item(call: ToolCall) -> dict:
    """The output item of a tool call as it starts (function calls stream their arguments)."""
    ns = {"namespace": call.namespace} if call.namespace else {}
    if call.kind == "custom":
        return {"type": "custom_tool_call", "id": new_id("ctc_"), "call_id": call.id,
                "name": call.name, "input": "", **ns}
    if call.kind == "local_shell":
        return {"type": "local_shell_call", "id": new_id("lsh_"), "call_id": call.id,
                "action": shell_action("{}"), "status": "in_progress"}
    return {"type": "function_call", "id": new_id("fc_"), "call_id": call.id,
            "name": call.name, "arguments": "", "status": "in_progress", **ns}


class OutputItems:
    """Responses output items and their stream events, built from Reply pieces.

    Custom and local-shell calls are announced when they close: their input (a JSON string the
    model writes, unquoted) and action are only known whole.
    """

    def __init__(self, seal=None):
        self.items: list[dict] = []
        self.open: dict | None = None
        self.seal = seal  # reasoning text -> encrypted_content, when the client asked for it
        self._raw = ""  # a deferred call's text so far

    def _index(self, item) -> int:
        return next(i for i, x in enumerate(self.items) if x is item)

    def _added(self, item: dict) -> list[tuple[str, dict]]:
        idx = self._index(item)
        events = [("response.output_item.added", {"output_index": idx,
                                                  "item": copy.deepcopy(item)})]
        if item["type"] == "message":
            events.append(("response.content_part.added", {
                "item_id": item["id"], "output_index": idx, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}))
        return events

    def _start(self, item: dict) -> list[tuple[str, dict]]:
        events = self.close()
        self.items.append(item)
        self.open, self._raw = item, ""
        if item["type"] in ("custom_tool_call", "local_shell_call"):
            return events
        return events + self._added(item)

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
            events += self._start(call_item(value))
        elif kind == "arguments" and value and cur is not None:
            if cur["type"] == "function_call":
                cur["arguments"] += value
                events.append(("response.function_call_arguments.delta", {
                    "item_id": cur["id"], "output_index": len(self.items) - 1, "delta": value}))
            else:
                self._raw += value
        return events

    def close(self, status: str = "completed") -> list[tuple[str, dict]]:
        """Finish the open item (at a harmony message boundary or, cut or not, at the end)."""
        item, self.open = self.open, None
        if item is None:
            return []
        idx = self._index(item)
        if "status" in item:
            item["status"] = status
        events: list[tuple[str, dict]] = []
        kind = item["type"]
        if kind == "reasoning":
            text = item["content"][0]["text"]
            if self.seal:
                item["encrypted_content"] = self.seal(text)
            events.append(("response.reasoning_text.done", {
                "item_id": item["id"], "output_index": idx, "content_index": 0, "text": text}))
        elif kind == "message":
            part = item["content"][0]
            events.append(("response.output_text.done", {
                "item_id": item["id"], "output_index": idx, "content_index": 0,
                "text": part["text"], "logprobs": []}))
            events.append(("response.content_part.done", {
                "item_id": item["id"], "output_index": idx, "content_index": 0, "part": part}))
        elif kind == "function_call":
            events.append(("response.function_call_arguments.done", {
                "item_id": item["id"], "output_index": idx, "arguments": item["arguments"]}))
        elif kind == "custom_tool_call":
            item["input"] = custom_input(self._raw)
            events += self._added(item)
            events.append(("response.custom_tool_call_input.delta", {
                "item_id": item["id"], "output_index": idx, "delta": item["input"]}))
            events.append(("response.custom_tool_call_input.done", {
                "item_id": item["id"], "output_index": idx, "input": item["input"]}))
        elif kind == "local_shell_call":
            item["action"] = shell_action(self._raw)
            events += self._added(item)
        events.append(("response.output_item.done", {"output_index": idx,
                                                     "item": copy.deepcopy(item)}))
        return events


async def retrieve_response(request: Request, response_id: str):
    service: Service = request.app.state.service
    rid = response_id
    stored = service.responses.get(rid)
    if stored is None:
        raise APIError(404, f"response {rid!r} not found (not stored, or forgotten)",
                       code="not_found", param="response_id")
    return stored["response"]


async def delete_response(request: Request, response_id: str):
    service: Service = request.app.state.service
    rid = response_id
    if service.responses.pop(rid) is None:
        raise APIError(404, f"response {rid!r} not found", code="not_found",
                       param="response_id")
    return {"id": rid, "object": "response", "deleted": True}
