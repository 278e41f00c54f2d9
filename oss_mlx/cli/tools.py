"""gpt-oss's built-in tools on the command line (docs/tools.md): the options, the tools they
make, and a turn that runs them.

    oss-mlx chat --tools python                  # the model runs code in a sandbox
    oss-mlx chat --browse ~/notes                # the browser over a folder, offline
    oss-mlx generate --tools python,browser --search-url http://localhost:8888/search ...
    oss-mlx serve --builtin-tools python,browser --browse ~/notes

`chat` and `generate` take --tools / --browse / --search-url (`add_arguments`); `serve` takes
--builtin-tools with the same backend options (`add_serve_arguments`). `choose(...)` checks
them before the model loads: a browser needs a backend, and a python tool this machine cannot
sandbox is not offered (its one-line reason is a note). `turn_events` is the engine's stream
with the tools run between the model's calls (oss_mlx.tools.run_turn).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from oss_mlx.errors import OssMlxError

TOOLS = ("python", "browser")
RESULT_LINES = 12  # lines of a tool's output shown to the user (the model gets all of it)


def tool_list(text: str) -> list[str]:
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in TOOLS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: name one or more of {', '.join(TOOLS)}, "
                                         "comma-separated")
    return names


def add_backend(parser) -> None:
    parser.add_argument("--browse", metavar="FOLDER", default=None,
                        help="the browser tool searches and opens the documents under FOLDER "
                             "(text, Markdown, HTML; PDF with pypdf), offline; implies browser")
    parser.add_argument("--search-url", metavar="URL", default=None,
                        help="the browser tool searches the web through URL, an endpoint "
                             "answering GET URL?q=QUERY&n=N with {\"results\": [{\"title\", "
                             "\"url\", \"snippet\"}]}; implies browser")


def add_arguments(parser) -> None:
    """chat and generate: --tools, --browse, --search-url."""
    parser.add_argument("--tools", metavar="LIST", type=tool_list, default=None,
                        help="offer gpt-oss's built-in tools: python (runs the model's code in "
                             "a sandbox, no network, its own folder), browser (needs --browse "
                             "or --search-url); comma-separated")
    add_backend(parser)


def add_serve_arguments(parser) -> None:
    """serve: --builtin-tools, --browse, --search-url, and the bounds on tool sessions."""
    parser.add_argument("--builtin-tools", metavar="LIST", type=tool_list, default=None,
                        help="run gpt-oss's built-in tools here for the Responses requests "
                             "that ask for them: python (a `code_interpreter` tool), browser "
                             "(`web_search`, over --browse or --search-url); comma-separated")
    add_backend(parser)
    parser.add_argument("--tool-sessions", metavar="N", type=_positive, default=8,
                        help="python workers alive at once, one per conversation; the least "
                             "recently used idle one is closed to make room (default: 8)")
    parser.add_argument("--tool-idle", metavar="SECONDS", type=_positive, default=900,
                        help="close a conversation's tools (its python worker and folder) after "
                             "this long unused (default: 900)")


def _positive(text: str) -> int:
    from oss_mlx.cli.options import positive_int

    return positive_int(text)


@dataclass
class ToolChoice:
    """What the options asked for and this machine allows. python: offered; backend: the
    browser's (None: no browser); notes: lines for the user (a tool not offered, and why)."""

    python: bool = False
    backend: object = None
    notes: list = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [n for n, on in (("python", self.python), ("browser", self.backend)) if on]

    def toolbox(self, encoding=None):
        """A new Toolbox of these tools (one per conversation); None when there are none."""
        from oss_mlx.tools import Browser, PythonSession, Toolbox

        if not self.names:
            return None
        return Toolbox(python=PythonSession() if self.python else None,
                       browser=Browser(self.backend, encoding=encoding) if self.backend else None)

    def describe(self) -> str:
        """'python (landlock+seccomp) · browser over /notes' for a banner."""
        from oss_mlx.tools import python_support

        parts = []
        if self.python:
            parts.append(f"python ({python_support().kind} sandbox)")
        if self.backend is not None:
            where = getattr(self.backend, "root", None) or getattr(self.backend, "search_url", "")
            parts.append(f"browser over {where}")
        return " · ".join(parts)


def choose(wanted, browse: str | None = None, search_url: str | None = None) -> ToolChoice:
    """The tools to offer (see ToolChoice); a browser without a backend, or a --browse that is
    not a folder, is an OssMlxError."""
    from oss_mlx.tools import BackendError, LocalFolder, python_support, web_backend

    wanted = set(wanted or ())
    if browse or search_url:
        wanted.add("browser")
    choice = ToolChoice()
    if "python" in wanted:
        support = python_support()
        choice.python = support.available
        if not support.available:
            choice.notes.append(support.reason)
    if "browser" in wanted:
        if browse and search_url:
            raise OssMlxError("--browse and --search-url: give the browser one backend")
        if browse:
            try:
                choice.backend = LocalFolder(browse)
            except BackendError as e:
                raise OssMlxError(f"--browse {browse}: {e}") from None
        elif search_url:
            if not search_url.startswith(("http://", "https://")):
                raise OssMlxError(f"--search-url {search_url}: not an http(s) URL")
            choice.backend = web_backend({"search_url": search_url})
        else:
            raise OssMlxError("the browser tool needs a backend: --browse FOLDER (your "
                              "documents, offline) or --search-url URL (a search endpoint)")
    return choice


def from_args(args) -> ToolChoice:
    return choose(getattr(args, "tools", None) or getattr(args, "builtin_tools", None),
                  getattr(args, "browse", None), getattr(args, "search_url", None))


def serve_tools(choice: ToolChoice, encoding, args):
    """The server's BuiltinTools for --builtin-tools (None when it runs none), said in a line."""
    from oss_mlx.server.builtin_tools import BuiltinTools

    if not choice.names:
        return None
    hosted = {"python": "code_interpreter", "browser": "web_search"}
    print(f"oss-mlx: built-in tools: {choice.describe()}, for the Responses requests that "
          f"ask for {' or '.join(hosted[n] for n in choice.names)}", flush=True)
    return BuiltinTools(choice.python, choice.backend, encoding=encoding,
                        max_sessions=args.tool_sessions, idle_s=args.tool_idle)


def turn_events(engine, conversation, params, cancel, box, on_tool=None, progress=None):
    """The events of one turn: `engine.stream`'s when `box` is None. Else the model's turn with
    the built-in tools run between its calls (run_turn): `on_tool(ToolEvent)` is told of each
    call as it starts and of its result (the call's own deltas are not passed on: a caller
    shows the call whole), citations in the answer become links as it streams (with a
    browser), and the one done event's completion is the whole turn (TurnDone.combined).
    `progress`: told of each prefill chunk (Engine.stream)."""
    from dataclasses import replace

    from oss_mlx.engine import Event
    from oss_mlx.harmony import section_of
    from oss_mlx.tools import call_name, run_turn
    from oss_mlx.tools.citations import CitationStream

    if box is None:
        yield from engine.stream(conversation, params, cancel=cancel, progress=progress)
        return
    cites = CitationStream(box.browser)
    for ev in run_turn(engine, conversation, box, params, cancel=cancel, progress=progress):
        if ev.type in ("tool_call", "tool_result"):
            if on_tool is not None:
                on_tool(ev)
        elif ev.type == "delta" and call_name(ev.recipient) is not None:
            continue
        elif ev.type == "delta" and section_of(ev.channel, ev.recipient) == "answer":
            text = cites.feed(ev.text)
            if text:
                yield replace(ev, text=text)
        else:
            if cites.held:  # the end of a message: what looked like the start of a citation
                yield Event("delta", channel=getattr(ev, "channel", None) or "final",
                            text=cites.flush())
            yield Event("done", completion=ev.combined()) if ev.type == "done" else ev


class GenerateTools:
    """generate's tools: the Toolbox of its one turn, each call and result printed to stderr
    (not with --json), and `outputs`, the records --json adds: [{"name", "channel", "input",
    "output", "error"}]."""

    def __init__(self, choice: ToolChoice, encoding=None, quiet: bool = False,
                 newline: bool = False):
        self.box = choice.toolbox(encoding)
        self.quiet, self.newline = quiet, newline
        self.outputs: list[dict] = []
        self._midline = False  # the reasoning shown on stderr ended mid-line

    def events(self, engine, conversation, params, cancel, progress=None):
        from oss_mlx.harmony import section_of

        for ev in turn_events(engine, conversation, params, cancel, self.box, self._on_tool,
                              progress):
            if ev.type == "delta" and ev.text and section_of(ev.channel,
                                                               ev.recipient) == "reasoning":
                self._midline = not ev.text.endswith("\n")  # shown with --show-reasoning
            yield ev

    def _on_tool(self, ev) -> None:
        import sys

        if ev.type == "tool_call":
            self.outputs.append({"name": ev.name, "channel": ev.channel, "input": ev.text,
                                 "output": None, "error": None})
        elif self.outputs:
            self.outputs[-1].update(output=ev.text, error=ev.error)
        if not self.quiet:
            lead = "\n" if self.newline and self._midline else ""
            self._midline = False
            print(lead + plain_text(ev), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.box is not None:
            self.box.close()


def shown_lines(text: str, limit: int = RESULT_LINES) -> list[str]:
    """A tool's text as the user sees it: at most `limit` lines, then how many more."""
    lines = text.rstrip("\n").split("\n")
    if len(lines) > limit:
        lines = lines[:limit] + [f"… {len(lines) - limit} more lines"]
    return lines


def describe_call(ev) -> tuple[str, list[str]]:
    """(heading, body lines) of a built-in call: python's code, a browser call's arguments."""
    if ev.name == "python":
        return "→ python", ev.text.rstrip("\n").split("\n")
    return f"→ {ev.name} {' '.join(ev.text.split())}", []


def describe_result(ev) -> tuple[str, list[str]]:
    head = f"← {ev.name}" + (f" ({ev.error})" if ev.error else "")
    return head, shown_lines(ev.text)


def plain_text(ev) -> str:
    """A ToolEvent as plain lines (pipes, generate's stderr)."""
    head, body = (describe_call if ev.type == "tool_call" else describe_result)(ev)
    return "\n".join([head] + [f"  {line}" for line in body])
