"""gpt-oss's built-in tools on the server: `oss-mlx serve --builtin-tools python,browser`.

A Responses request that lists a hosted tool this server runs gets gpt-oss's own tool instead
of having it dropped: `code_interpreter` -> `python` (the sandboxed worker, oss_mlx.tools),
`web_search` (Codex sends it with every request) -> `browser` over the backend given to serve
(`--browse FOLDER` or `--search-url URL`). The model's calls run here, between its completions
(server/builtin_turn.py), and come back as `code_interpreter_call` and `web_search_call`
output items; citations become `url_citation` annotations.

One set of tools per conversation, found by the request's `prompt_cache_key` (Codex sends its
conversation id) or by the `previous_response_id` it continues: the python worker keeps its
variables from one request to the next. Bounds: at most `max_sessions` python workers live at
once (the least recently used idle one is closed to make room; a call that finds every worker
busy is told so, as the tool's error), and a conversation's tools are closed after `idle_s`
seconds unused. Without the flag the hosted tools are left out of the prompt, as before, and
the log line says how to serve them (conversation._hosted).

A call item the client sends back (a stateless client such as Codex returns the whole output)
is turned back into the harmony call and result this server made (remembered by item id);
a code_interpreter_call this server does not remember is rebuilt from its code and logs, a
web_search_call is dropped (the page the model read is not in the item).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field

from oss_mlx.server.conversation import Item
from oss_mlx.server.service import Memory

log = logging.getLogger("oss_mlx.server")


def kind_of(tool_type: str) -> str | None:
    """The built-in tool that serves a hosted Responses tool type: python, browser or None."""
    if tool_type == "code_interpreter":
        return "python"
    if tool_type.startswith("web_search"):
        return "browser"
    return None


@dataclass(eq=False)
class Session:
    """The built-in tools of one conversation. busy: requests using it now."""

    python: object = None  # PythonSession
    browser: object = None  # Browser
    container: str = field(default_factory=lambda: f"cntr_{secrets.token_hex(12)}")
    used: float = field(default_factory=time.monotonic)
    busy: int = 0
    keys: set = field(default_factory=set)

    def toolbox(self, kinds):
        from oss_mlx.tools import Toolbox

        return Toolbox(python=self.python if "python" in kinds else None,
                       browser=self.browser if "browser" in kinds else None)

    def close(self):
        if self.python is not None:
            self.python.close()

    @property
    def live(self) -> bool:
        """A python worker (or its folder) exists."""
        return self.python is not None and self.python.workdir is not None


class BuiltinTools:
    """The built-in tools a server runs (see the module docstring). python: offered (the
    sandbox is available); backend: the browser's, or None; limits: the python sandbox's."""

    def __init__(self, python: bool = False, backend=None, encoding=None, limits=None,
                 max_sessions: int = 8, idle_s: float = 900.0):
        from oss_mlx.tools import Browser, Limits, PythonSession

        self.python, self.backend, self.encoding = python, backend, encoding
        self.limits = limits or Limits()
        self.max_sessions, self.idle_s = max_sessions, idle_s
        # What declares the tools in a prompt (a session that never starts: limits, source).
        self._declared = {"python": PythonSession(self.limits) if python else None,
                          "browser": Browser(backend, encoding=encoding) if backend else None}
        self._sessions: dict[str, Session] = {}  # key -> session; several keys per session
        self._lock = threading.Lock()
        self.calls = Memory(4096)  # output item id -> (call Message, result Message)
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    @property
    def kinds(self) -> set[str]:
        return {k for k, on in (("python", self.python), ("browser", self.backend)) if on}

    # ---- a request ----

    def served(self, req) -> set[str]:
        """The built-in tools `req` asks for (by its hosted tools) that this server runs."""
        if req.tool_choice == "none":
            return set()
        return {k for t in req.tools or [] if (k := kind_of(t.type)) in self.kinds}

    def declare(self, conversation, kinds):
        from oss_mlx.tools import Toolbox

        return Toolbox(python=self._declared["python"] if "python" in kinds else None,
                       browser=self._declared["browser"] if "browser" in kinds else None
                       ).declare(conversation)

    def acquire(self, keys) -> Session:
        """The session of the conversation one of `keys` names (a new one when none does),
        marked busy until `release`."""
        from oss_mlx.tools import Browser, PythonSession

        now = time.monotonic()
        with self._lock:
            self._sweep(now)
            session = next((self._sessions[k] for k in keys if k in self._sessions), None)
            if session is None:
                session = Session(PythonSession(self.limits) if self.python else None,
                                  Browser(self.backend, encoding=self.encoding)
                                  if self.backend else None)
            for k in keys:
                self._sessions[k] = session
                session.keys.add(k)
            session.busy += 1
            session.used = now
        self._start_sweeper()
        return session

    def release(self, session: Session, key: str | None = None):
        """The request is over; `key` (its response id) now names the conversation too."""
        with self._lock:
            session.busy -= 1
            session.used = time.monotonic()
            if key:
                self._sessions[key] = session
                session.keys.add(key)

    def make_room(self, session: Session) -> bool:
        """Before a python call: close least recently used idle workers until `session` may
        have one; False when every other worker is busy."""
        with self._lock:
            if session.live:
                return True
            live = sorted({id(s): s for s in self._sessions.values()
                           if s.live and s is not session}.values(), key=lambda s: s.used)
            while len(live) >= self.max_sessions:
                idle = next((s for s in live if not s.busy), None)
                if idle is None:
                    return False
                log.info("closing the python worker of a conversation unused for %.0f s to make "
                         "room (--tool-sessions %d)", time.monotonic() - idle.used,
                         self.max_sessions)
                idle.close()
                live.remove(idle)
            return True

    # ---- idle conversations ----

    def _sweep(self, now: float):
        """Close and forget the sessions unused for idle_s (the lock is held)."""
        for session in {id(s): s for s in self._sessions.values()}.values():
            if not session.busy and now - session.used > self.idle_s:
                session.close()
                for k in session.keys:
                    self._sessions.pop(k, None)
                session.keys.clear()

    def _start_sweeper(self):
        if self._sweeper is None:
            self._sweeper = threading.Thread(target=self._sweep_loop, daemon=True,
                                             name="oss-mlx-tool-sweeper")
            self._sweeper.start()

    def _sweep_loop(self):
        while not self._stop.wait(min(self.idle_s / 4, 60.0)):
            with self._lock:
                self._sweep(time.monotonic())

    def close(self):
        """End every session (the server is stopping)."""
        self._stop.set()
        with self._lock:
            for session in {id(s): s for s in self._sessions.values()}.values():
                session.close()
            self._sessions.clear()

    # ---- call items a client sends back ----

    def input_items(self, it: dict) -> list[Item] | None:
        """The Items of a code_interpreter_call or web_search_call input item (None for other
        kinds: conversation.responses_items decides)."""
        from oss_mlx.harmony import tool_result_message

        kind, item_id = it.get("type"), it.get("id")
        if kind not in ("code_interpreter_call", "web_search_call"):
            return None
        known = self.calls.get(item_id) if isinstance(item_id, str) else None
        if known is None and kind == "code_interpreter_call":
            logs = "".join(o.get("logs", "") for o in it.get("outputs") or []
                           if isinstance(o, dict) and o.get("type") == "logs")
            known = (python_call(str(it.get("code") or "")),
                     tool_result_message("python", logs, channel="analysis"))
        if known is None:
            return []  # a web search this server did not make: nothing to show the model
        call, result = known
        return [Item("tool_call", name=call.recipient, call_id=item_id, message=call),
                Item("tool_result", name=call.recipient, call_id=item_id, message=result)]


def python_call(code: str, channel: str = "analysis"):
    """The model's call to python as harmony renders it: `to=python`, content type `code`."""
    from openai_harmony import Message, Role

    return (Message.from_role_and_content(Role.ASSISTANT, code).with_channel(channel)
            .with_recipient("python").with_content_type("code"))


# ---- what responses.py calls (nothing when the server runs no built-in tool) ----------------


def served(service, req) -> set[str]:
    return service.builtins.served(req) if service.builtins is not None else set()


def client_tools(req, kinds: set[str]):
    """`req` without the hosted tools the built-in ones serve (they are not client tools, and
    not to be logged as left out)."""
    if not kinds:
        return req
    keep = [t for t in req.tools or [] if kind_of(t.type) not in kinds]
    return req.model_copy(update={"tools": keep})


def input_items(service):
    """conversation.responses_items' `builtin` hook, or None when the server runs none."""
    return service.builtins.input_items if service.builtins is not None else None

