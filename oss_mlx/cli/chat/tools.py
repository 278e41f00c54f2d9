"""The chat's built-in tools: `--tools python`, `--browse FOLDER`, and `/tools` to turn them on
and off (docs/tools.md).

One python session and one browser per conversation: the python worker keeps its variables
from turn to turn, and ends (with its working folder) on /reset, /load, when python is turned
off, and when the chat ends. A turn with tools runs through oss_mlx.tools.run_turn
(cli/tools.turn_events): each call is shown in the reasoning view with its output, then the
turn goes on; Ctrl-C during a call interrupts the code (the worker runs in its own session:
the chat's SIGINT handler sets the turn's cancel event, which the tool watches). Citations
(`【3†L4-L9】`) in the answer are turned into links to the page they cite as the answer streams.
"""

from __future__ import annotations

import sys

from oss_mlx.cli import tools as cli_tools

USAGE = ("/tools [python|browser] [on|off]", "show the built-in tools, or turn one on or off")
NO_BROWSER = ("the browser needs a backend: start chat with --browse FOLDER (your documents) or "
              "--search-url URL")


class ChatTools:
    """The tools of one chat. choice: what the options asked for (cli_tools.ToolChoice)."""

    def __init__(self, view, choice: cli_tools.ToolChoice | None = None, encoding=None):
        self.view = view
        self.choice = choice or cli_tools.ToolChoice()
        self.encoding = encoding
        self.on = set(self.choice.names)
        self.python = None  # PythonSession, made at the first turn with python on
        self.browser = None  # Browser, likewise
        self._status = None  # the spinner while python runs
        self._running = None  # the built-in call running now
        self.shown = False  # this turn showed a built-in call (it is not an empty answer)

    @classmethod
    def from_args(cls, args, view, encoding=None) -> "ChatTools":
        choice = cli_tools.from_args(args)
        for note in choice.notes:
            view.warn(note)
        chat = cls(view, choice, encoding)
        if chat.on:
            view.note(f"tools: {choice.describe()} · /tools turns them off and on")
        return chat

    # ---- the conversation's tools ----

    def toolbox(self):
        """The Toolbox of the tools that are on (None when none is)."""
        from oss_mlx.tools import Browser, PythonSession, Toolbox

        if not self.on:
            return None
        if "python" in self.on and self.python is None:
            self.python = PythonSession()
        if "browser" in self.on and self.browser is None:
            self.browser = Browser(self.choice.backend, encoding=self.encoding)
        return Toolbox(python=self.python if "python" in self.on else None,
                       browser=self.browser if "browser" in self.on else None)

    def declare(self, conversation):
        """`conversation` as the model sees it with the tools that are on."""
        box = self.toolbox()
        return box.declare(conversation) if box is not None else conversation

    def reset(self):
        """A new conversation: a new python session (variables and files gone), a new browser."""
        self.close()

    def close(self):
        if self.python is not None:
            self.python.close()
        self.python = self.browser = None

    # ---- /tools ----

    def command(self, arg: str) -> None:
        v = self.view
        words = arg.lower().split()
        names = [w for w in words if w in cli_tools.TOOLS]
        switch = [w for w in words if w in ("on", "off")]
        if len(names) + len(switch) != len(words) or len(switch) > 1 or (names and not switch):
            v.error(f"usage: {USAGE[0]}")
            return
        if switch:
            for name in names or [n for n in cli_tools.TOOLS if n in self.choice.names]:
                if not self._switch(name, switch[0] == "on"):
                    return
        self.show()

    def _switch(self, name: str, on: bool) -> bool:
        from oss_mlx.tools import python_support

        if not on:
            self.on.discard(name)
            if name == "python" and self.python is not None:
                self.python.close()  # its variables and files go with it
                self.python = None
            return True
        if name == "python" and not python_support().available:
            self.view.error(python_support().reason)
            return False
        if name == "browser" and self.choice.backend is None:
            self.view.error(NO_BROWSER)
            return False
        if name == "python":
            self.choice.python = True
        self.on.add(name)
        return True

    def show(self) -> None:
        if not self.on:
            self.view.info("tools: none (/tools python on; the browser needs --browse FOLDER)")
            return
        on = cli_tools.ToolChoice("python" in self.on,
                                  self.choice.backend if "browser" in self.on else None)
        self.view.info(f"tools: {on.describe()}")

    # ---- a turn ----

    def stream(self, engine, conversation, params, cancel, progress=None):
        """The turn's events, as engine.stream gives them; with tools on, the built-in calls
        are run and shown here, and citations in the answer become links
        (cli/tools.turn_events)."""
        self._running, self.shown = None, False
        try:
            yield from cli_tools.turn_events(engine, conversation, params, cancel,
                                             self.toolbox(), self._show, progress)
        finally:
            self._stop_status()
            if self._running == "python" and self.python is not None:
                # Cut inside a call (a third Ctrl-C): the rest of the cell's output would
                # reach the next call. The next call starts a new session instead.
                self.python.close()
                self.python = None
                self.view.warn("the python session was restarted: its variables are lost")

    def _show(self, ev) -> None:
        """A built-in call as it starts and its result, in the reasoning view."""
        if ev.type == "tool_call":
            self._running, self.shown = ev.name, True
            self.view.finish()  # closes the reasoning so far; the next delta opens a new one
            self._print(ev)
            console = getattr(self.view, "console", None)
            if console is not None and ev.name == "python":
                self._status = console.status("running python… (Ctrl-C stops it)",
                                              spinner="dots")
                self._status.start()
        else:
            self._running = None
            self._stop_status()
            self._print(ev)

    def _stop_status(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def _print(self, ev) -> None:
        console = getattr(self.view, "console", None)
        if console is None:  # a pipe: plain lines on stderr, with the reasoning
            print(cli_tools.plain_text(ev), file=sys.stderr, flush=True)
            return
        head, body = (cli_tools.describe_call if ev.type == "tool_call"
                      else cli_tools.describe_result)(ev)
        style = "cyan" if ev.type == "tool_call" else "dim"
        console.print(head, style=f"bold {style}", markup=False, highlight=False)
        for line in body:
            console.print(f"  {line}", style=style, markup=False, highlight=False,
                          soft_wrap=True)
        if ev.type == "tool_result":
            console.print()



def markdown(text: str):
    """The answer as rich renders markdown, with links to local files kept as links: a citation
    of a document under --browse is a file:// URL, which markdown-it refuses by default (rich
    then shows the link's source instead of a hyperlink)."""
    from markdown_it import MarkdownIt
    from rich.markdown import Markdown

    md = Markdown(text)
    parser = MarkdownIt().enable("strikethrough").enable("table")
    default = parser.validateLink
    parser.validateLink = lambda url: url.strip().lower().startswith("file://") or default(url)
    md.parsed = parser.parse(text)
    return md
