"""A Responses turn with gpt-oss's built-in tools run on the server (server/builtin_tools.py).

The steps of oss_mlx.tools.run_turn, on the server's scheduler: generate; when the completion
stops on a call to `python` or `browser.*`, run it (in a thread: a cell may take its whole
time limit), append the tool's message (tools.harmony.tool_result_message, on the call's
channel) and generate again, until the model answers, calls a client tool, or is cut. Each
built-in call becomes an output item, streamed with the events the openai types define:

  code_interpreter_call  output_item.added, code_interpreter_call.in_progress,
                         code_interpreter_call_code.delta (as the model writes the code) and
                         .done, code_interpreter_call.interpreting, .completed, output_item.done;
                         the output is `outputs: [{"type": "logs", "logs": ...}]`
  web_search_call        output_item.added (once its arguments are whole: the action),
                         web_search_call.in_progress, .searching, .completed, output_item.done

Citations in the answer become links with `url_citation` annotations (tools/citations.py),
each announced with response.output_text.annotation.added. Usage adds up every completion of
the turn; `max_output_tokens` bounds the whole turn. The client's cancel (a disconnect, the
server stopping) stops the generation and interrupts a running cell.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from dataclasses import dataclass, replace

from oss_mlx.server.builtin_tools import BuiltinTools, Session
from oss_mlx.server.service import failure, sse_response
from oss_mlx.server.wire import new_id

BUSY = ("[ERROR] Every python worker of this server is busy with another conversation; try "
        "again later.")


@dataclass
class Call:
    """A built-in call as it streams: its output item's id, the tool, its text so far."""

    item_id: str
    name: str  # python, browser.search, ...
    text: str = ""
    message: object = None  # the finished harmony call
    result: object = None  # the tool's harmony message
    action: dict | None = None  # web_search_call's
    failed: bool = False


class Turn:
    """One request's turn (see the module docstring). `cancel` stands for the request's job."""

    def __init__(self, service, req, kinds, conversation, spec, finish):
        self.service, self.req, self.kinds, self.spec = service, req, kinds, spec
        self.finish, self.reply = finish, finish.reply
        self.tools: BuiltinTools = service.builtins
        self.messages = list(conversation.messages)
        self.cancel = threading.Event()
        self.session: Session | None = None

    async def pieces(self):
        """The client-facing pieces of the turn, as service.generation yields them, plus the
        built-in calls' ("builtin_call" | "builtin_input" | "builtin_run" | "builtin_result")
        and the answer's ("annotation", url_citation)."""
        from oss_mlx.tools import call_name
        from oss_mlx.tools.citations import CitationStream
        from oss_mlx.tools.turn import MAX_TOOL_CALLS, builtin_call

        keys = [k for k in (self.req.prompt_cache_key, self.req.previous_response_id) if k]
        self.session = self.tools.acquire(keys)
        box = self.session.toolbox(self.kinds)
        self.cites = CitationStream(box.browser)
        completions, budget = [], self.req.max_output_tokens or self.service.default_max_tokens
        try:
            while True:
                completion, call = None, None
                async for piece in self._generate(budget):
                    if isinstance(piece, Call):
                        call = piece
                    elif isinstance(piece, list):
                        yield piece
                    else:
                        completion = piece
                completions.append(completion)
                if budget is not None:
                    budget -= completion.stats.generated_tokens
                msg = builtin_call(completion)
                if (msg is None or len(completions) > MAX_TOOL_CALLS or self.cancel.is_set()
                        or budget == 0):
                    yield self._done(completions, budget)
                    return
                if call is None:  # a call with no text streamed
                    call = Call(_item_id(msg.recipient), call_name(msg.recipient))
                    yield [("builtin_call", call)]
                call.message = msg
                if call.name != "python":
                    call.action = _action(call, box.browser, before=True)
                yield [("builtin_run", call)]
                yield [("builtin_result", await self._run(box, call))]
                self.messages += completion.messages + [call.result]
        finally:
            self.cancel.set()  # a cell still running (the client left) is interrupted
            self.tools.release(self.session, self.finish.skeleton["id"])

    async def _generate(self, budget):
        """One completion: lists of pieces, the built-in Call when one starts, then the
        Completion."""
        from openai_harmony import Conversation

        from oss_mlx.engine.scheduler import events
        from oss_mlx.tools import call_name

        service = self.service
        prompt = service.prompt_tokens(Conversation.from_messages(self.messages))
        job = service.scheduler.submit(prompt, service.sampling(self.req, budget, self.spec))
        call = None
        async for ev in events(job):
            if self.cancel.is_set():
                job.cancel.set()
            if ev.type == "done":
                yield ev.completion
                return
            if ev.type == "delta" and call_name(ev.recipient) is not None:
                if call is None:
                    call = Call(_item_id(ev.recipient), call_name(ev.recipient))
                    yield call
                    yield [("builtin_call", call)]
                call.text += ev.text
                yield [("builtin_input", ev.text)]
            elif ev.type == "message" and call is not None:
                continue  # the call's item stays open until the tool has run
            else:
                yield self._client_pieces(ev)

    def _client_pieces(self, ev) -> list:
        """What Reply makes of an event, citations in the answer turned into links."""
        out = []
        for kind, value in self.reply.feed(ev):
            if kind == "content":
                text = self.cites.feed(value)
                out += [("content", text)] if text else []
                out += [("annotation", note) for note in self.cites.take()]
            else:
                out.append((kind, value))
        if ev.type == "message":
            if self.cites.held:
                out.append(("content", self.cites.flush()))
            out.append(("message", None))
        return out

    async def _run(self, box, call: Call) -> tuple:
        from oss_mlx.harmony import tool_result_message

        shown = len(box.browser.state.stack) if box.browser is not None else 0
        if call.name == "python" and not self.tools.make_room(self.session):
            output, error = BUSY, "busy"
        else:
            output, error = await asyncio.to_thread(box.call, call.message, self.cancel)
        if call.name != "python":  # a browser call that showed no page failed (its text says why)
            call.failed = box.browser is None or len(box.browser.state.stack) == shown
            if not call.failed:
                call.action = _action(call, box.browser, before=False, was=call.action)
        msg = call.message
        call.result = tool_result_message(msg.recipient, output, channel=msg.channel)
        self.tools.calls.put(call.item_id, (msg, call.result))
        return call, output, error

    def _done(self, completions, budget) -> list:
        """The turn's last pieces: the reply's done, with the usage of every completion."""
        from oss_mlx.engine import Event

        last = completions[-1]
        stats = replace(last.stats, **{k: sum(getattr(c.stats, k) for c in completions)
                                       for k in ("prompt_tokens", "cached_tokens",
                                                 "generated_tokens")})
        reason = last.stop_reason
        if budget == 0 and reason == "tool_call":
            reason = "length"  # the turn's max_output_tokens ran out before its answer
        pieces = self._client_pieces(Event("done", completion=replace(last, stats=stats,
                                                                      stop_reason=reason)))
        if self.cites.held:
            pieces.append(("content", self.cites.flush()))
        self.service.remember(self.reply)
        return pieces


def _item_id(recipient: str) -> str:
    return new_id("ci_" if recipient == "python" else "ws_")


def _action(call: Call, browser, before: bool, was: dict | None = None) -> dict:
    """A web_search_call's action: from the call's arguments before it runs; once it ran, with
    what the browser showed (the search's sources, the page opened)."""
    import json

    try:
        args = json.loads(call.text or "{}")
    except ValueError:
        args = {}
    args = args if isinstance(args, dict) else {}
    fn = call.name.split(".", 1)[-1]
    pages = browser.state.stack if browser is not None else []
    if not before and pages:
        shown = pages[-1]
        if fn == "search":
            return {**was, "sources": [{"type": "url", "url": u}
                                       for u in dict.fromkeys(shown.urls.values())]}
        if fn == "open":
            return {"type": "open_page", "url": shown.url}
        return was
    if fn == "search":
        return {"type": "search", "query": str(args.get("query", ""))}
    if fn == "find":
        cursor = args.get("cursor", -1)
        ok = isinstance(cursor, int) and -1 <= cursor < len(pages)
        url = pages[cursor].url if pages and ok else ""
        return {"type": "find_in_page", "pattern": str(args.get("pattern", "")),
                "url": url.split("/find?pattern=")[0]}
    url = args.get("id") if isinstance(args.get("id"), str) else None
    return {"type": "open_page", **({"url": url} if url else {})}


class Items:
    """The Responses output items of a turn with built-in tools: responses.OutputItems for the
    rest (wrapped, not imported: `out`), code_interpreter_call and web_search_call items and
    the answer's annotations here."""

    def __init__(self, out, container):
        self.out, self.container = out, container  # container(): the python session's id

    @property
    def items(self) -> list:
        return self.out.items

    def close(self, status: str = "completed"):
        return self.out.close(status)

    def _index(self, item) -> int:
        return next(i for i, x in enumerate(self.items) if x is item)

    def _event(self, name: str, item: dict, **data):
        return (name, {"item_id": item["id"], "output_index": self._index(item), **data})

    def _open(self, item: dict) -> list:
        events = self.out.close()
        self.items.append(item)
        self.out.open = item
        return events + [("response.output_item.added", {"output_index": self._index(item),
                                                         "item": copy.deepcopy(item)})]

    def _done(self, item: dict) -> list:
        self.out.open = None
        return [("response.output_item.done", {"output_index": self._index(item),
                                               "item": copy.deepcopy(item)})]

    def feed(self, kind: str, value) -> list:
        if kind == "annotation":
            item = self.out.open
            if item is None or item["type"] != "message":
                return []
            notes = item["content"][0]["annotations"]
            notes.append(value)
            return [self._event("response.output_text.annotation.added", item, content_index=0,
                                annotation_index=len(notes) - 1, annotation=value)]
        if kind == "builtin_call":
            if value.name != "python":  # a web search is announced whole (builtin_run)
                return self.out.close()
            item = {"type": "code_interpreter_call", "id": value.item_id, "code": "",
                    "container_id": self.container(), "outputs": None, "status": "in_progress"}
            return self._open(item) + [self._event("response.code_interpreter_call.in_progress",
                                                   item)]
        if kind == "builtin_input":
            item = self.out.open
            if item is None or item["type"] != "code_interpreter_call":
                return []
            item["code"] += value
            return [self._event("response.code_interpreter_call_code.delta", item, delta=value)]
        if kind == "builtin_run":
            return self._run(value)
        if kind == "builtin_result":
            return self._result(*value)
        return self.out.feed(kind, value)

    def _run(self, call: Call) -> list:
        item = self.out.open
        if call.name == "python" and item is not None and item["id"] == call.item_id:
            item["status"] = "interpreting"
            return [self._event("response.code_interpreter_call_code.done", item,
                                code=item["code"]),
                    self._event("response.code_interpreter_call.interpreting", item)]
        item = {"type": "web_search_call", "id": call.item_id, "action": call.action,
                "status": "in_progress"}
        return self._open(item) + [self._event("response.web_search_call.in_progress", item),
                                   self._event("response.web_search_call.searching", item)]

    def _result(self, call: Call, output: str, error) -> list:
        item = self.out.open
        if item is None or item["id"] != call.item_id:
            return []
        if item["type"] == "code_interpreter_call":
            item.update(outputs=[{"type": "logs", "logs": output}], status="completed")
            return [self._event("response.code_interpreter_call.completed", item)] + \
                self._done(item)
        item.update(action=call.action, status="failed" if call.failed else "completed")
        return [self._event("response.web_search_call.completed", item)] + self._done(item)


async def respond(service, request, req, kinds, conversation, spec, finish, stream):
    """The Response of a request whose built-in tools run here; `stream`: responses.stream."""
    turn = Turn(service, req, kinds, conversation, spec, finish)
    finish.out = out = Items(finish.out, container=lambda: turn.session.container)
    if req.stream:
        return sse_response(stream(service, turn, finish, source=turn.pieces()), turn)

    async def watch():
        while not turn.cancel.is_set():
            await asyncio.sleep(0.25)
            if await request.is_disconnected():
                turn.cancel.set()

    watcher = asyncio.create_task(watch())
    try:
        async for pieces in turn.pieces():
            for kind, value in pieces:
                out.close() if kind == "message" else out.feed(kind, value)
    except Exception as e:  # noqa: BLE001 - an OpenAI error object, and keep serving
        from oss_mlx.server.protocol import APIError

        raise (e if isinstance(e, APIError) else failure(e)) from None
    finally:
        watcher.cancel()
    out.close("incomplete" if finish.reply.incomplete_reason else "completed")
    return finish()

