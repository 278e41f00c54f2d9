"""`oss-mlx chat`: an interactive terminal chat with gpt-oss.

The REPL is a thin loop over the engine. It keeps the conversation as harmony messages, puts the
chosen reasoning effort in the system message, and hands the whole conversation to
`Engine.stream` every turn; the engine's prompt cache makes a follow-up cost only its new tokens.
Reasoning (the analysis channel) streams dimmed and apart from the answer (or hidden); the final
answer streams as text and is re-rendered as markdown once complete.

History follows harmony's rule (spec 5.7): once a turn has ended with a `final` answer its
analysis is dropped from what the model sees next turn (`harmony.build_conversation`, not
openai_harmony's `auto_drop_analysis`, which keeps the analysis of turns 2..N-1). The full
messages, analysis included, are kept for /save.

Piped stdin (not a terminal) runs as a batch: each line is a turn or a /command, answers go to
stdout, everything else (reasoning, footers, notes) to stderr.

For tests only: OSS_MLX_TEST_ENGINE="module:function" makes the REPL build its engine with
`function(model_dir)` instead of `Engine.load` (tests/test_chat.py uses it to replay scripted
harmony streams through the real engine and parser).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import OssMlxError

EFFORTS = ("low", "medium", "high")
DEFAULT_MODEL = "gpt-oss-20b"
DEFAULT_MAX_TOKENS = 16384  # room for high effort; mlx_lm.chat's 256 cuts reasoning short
DEMO_MAX_TOKENS = 256  # random weights rarely stop on their own
NEARLY_FULL = 0.9
INTERRUPTED_NOTE = "[interrupted by the user]"
NO_TOOLS_REPLY = "error: no tools are available in this chat"

COMMANDS = [
    ("/effort [low|medium|high]", "show or set the reasoning effort"),
    ("/reasoning [show|hide]", "show or hide the model's reasoning"),
    ("/system [TEXT]", "show or set the instructions (`/system -` clears them)"),
    ("/reset", "start a new conversation (settings are kept)"),
    ("/undo", "drop the last exchange"),
    ("/save FILE", "write the conversation (settings + messages) as JSON"),
    ("/load FILE", "restore a conversation written by /save"),
    ("/stats", "statistics of the last answer and the session"),
    ("/prompt", "show the conversation as the model will see it (harmony text)"),
    ("/help", "this list"),
    ("/quit", "leave (also Ctrl-D, or Ctrl-C at the prompt)"),
]
COMMAND_NAMES = [usage.split()[0] for usage, _ in COMMANDS]


def add_arguments(parser):
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", "-m", metavar="M", default=None,
                       help=f"converted model folder or store name (default: {DEFAULT_MODEL})")
    which.add_argument("--demo", action="store_true",
                       help="run on a tiny random-weight model made on the spot (no download; "
                            "the answers are noise)")
    parser.add_argument("--reasoning", choices=EFFORTS, default="medium",
                        help="reasoning effort (default: medium, harmony's default); /effort "
                             "changes it")
    parser.add_argument("--system", metavar="TEXT", default=None,
                        help="instructions for the model (the harmony developer message)")
    parser.add_argument("--max-tokens", metavar="N", type=int, default=None,
                        help=f"most tokens per answer, reasoning included "
                             f"(default: {DEFAULT_MAX_TOKENS}, {DEMO_MAX_TOKENS} with --demo)")
    parser.add_argument("--temperature", metavar="T", type=float, default=1.0,
                        help="sampling temperature, 0 = greedy (default: 1.0, OpenAI's advice)")
    parser.add_argument("--top-p", metavar="P", type=float, default=1.0,
                        help="nucleus sampling (default: 1.0)")
    parser.add_argument("--seed", metavar="S", type=int, default=None,
                        help="random seed for sampling")
    parser.add_argument("--hide-reasoning", action="store_true",
                        help="do not show the model's reasoning (toggle with /reasoning)")


# --------------------------------------------------------------------------------------------
# The conversation


@dataclass
class Settings:
    reasoning: str = "medium"
    system: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    hide_reasoning: bool = False


@dataclass
class Turn:
    user: str
    messages: list = field(default_factory=list)  # openai_harmony.Message, as the model wrote them
    interrupted: bool = False


class Session:
    """Settings plus history; builds the harmony conversation the engine is given."""

    def __init__(self, settings: Settings, date: str | None = None):
        self.settings = settings
        self.turns: list[Turn] = []
        # Fixed for the session so the system message (and so the prompt cache) stays the same.
        self.date = date or datetime.date.today().isoformat()

    def conversation(self, pending: str | None = None):
        """The conversation for the next completion, ending with the `pending` user message."""
        from .harmony import build_conversation, user_message

        msgs = []
        for turn in self.turns:
            msgs.append(user_message(turn.user))
            msgs.extend(history_messages(turn))
        if pending is not None:
            msgs.append(user_message(pending))
        return build_conversation(msgs, reasoning=self.settings.reasoning,
                                  developer_instructions=self.settings.system, date=self.date)

    # /save and /load -------------------------------------------------------------------------

    def to_json(self, model: str) -> dict:
        messages = []
        for turn in self.turns:
            messages.append({"role": "user", "content": turn.user})
            for m in turn.messages:
                messages.append(message_to_json(m))
            if turn.interrupted:
                # Marks the turn: the flag sits on its last message (or a bare assistant stub).
                if turn.messages:
                    messages[-1]["interrupted"] = True
                else:
                    messages.append({"role": "assistant", "channel": "final", "content": "",
                                     "interrupted": True})
        return {"format": "oss-mlx-chat", "version": 1, "model": model,
                "date": self.date, "settings": asdict(self.settings), "messages": messages}

    def save(self, path: str | Path, model: str) -> Path:
        path = Path(path).expanduser()
        data = json.dumps(self.to_json(model), indent=2, ensure_ascii=False) + "\n"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(data, encoding="utf-8")
            os.replace(tmp, path)  # never a half-written file
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OssMlxError(f"cannot write {path}: {e.strerror or e}") from None
        return path

    def load(self, path: str | Path) -> None:
        """Replace settings and history with a file written by /save (all or nothing)."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise OssMlxError(f"no such file: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise OssMlxError(f"cannot read {path}: {e}") from None
        except json.JSONDecodeError as e:
            raise OssMlxError(f"{path} is not JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(data, dict) or data.get("format") != "oss-mlx-chat":
            raise OssMlxError(f"{path} is not a conversation saved by oss-mlx chat")
        settings = Settings(**asdict(self.settings))
        known = {f.name for f in fields(Settings)}
        raw = data.get("settings") or {}
        if not isinstance(raw, dict):
            raise OssMlxError(f"{path}: 'settings' must be an object")
        for key, value in raw.items():
            if key in known:
                setattr(settings, key, value)
        if settings.reasoning not in EFFORTS:
            raise OssMlxError(f"{path}: reasoning must be one of {', '.join(EFFORTS)}")
        turns = turns_from_json(data.get("messages"), path)
        self.settings.__dict__.update(settings.__dict__)  # keep the object others hold
        self.turns = turns
        self.date = data.get("date") or self.date


def history_messages(turn: Turn) -> list:
    """What the model sees of a past turn (harmony.build_conversation then drops old analysis)."""
    from .harmony import assistant_message, message_text

    if not turn.interrupted:
        return list(turn.messages)
    # The unfinished reasoning is dropped (else it resumes next turn); the partial answer stays,
    # marked so the model knows it was cut.
    final = next((m for m in reversed(turn.messages) if m.channel == "final"), None)
    text = message_text(final) if final is not None else ""
    return [assistant_message(f"{text}\n\n{INTERRUPTED_NOTE}" if text else INTERRUPTED_NOTE)]


def message_to_json(m) -> dict:
    from .harmony import message_text

    out = {"role": m.author.role.value}
    if m.author.name:
        out["name"] = m.author.name
    for key in ("channel", "recipient", "content_type"):
        if getattr(m, key) is not None:
            out[key] = getattr(m, key)
    out["content"] = message_text(m)
    return out


def turns_from_json(messages, path) -> list[Turn]:
    from openai_harmony import Message

    if not isinstance(messages, list):
        raise OssMlxError(f"{path}: 'messages' must be a list")
    turns: list[Turn] = []
    for i, raw in enumerate(messages):
        if not isinstance(raw, dict) or not isinstance(raw.get("content"), str):
            raise OssMlxError(f"{path}: message {i} needs a role and a text content")
        role = raw.get("role")
        if role == "user":
            turns.append(Turn(user=raw["content"]))
            continue
        if role not in ("assistant", "tool"):
            raise OssMlxError(f"{path}: message {i} has an unexpected role {role!r}")
        if not turns:
            raise OssMlxError(f"{path}: the messages must start with a user message")
        if raw.get("interrupted"):
            turns[-1].interrupted = True
        if role == "assistant" and raw.get("interrupted") and not raw["content"]:
            continue  # the stub to_json writes for an answer cut before any text
        try:
            turns[-1].messages.append(Message.from_dict(
                {k: v for k, v in raw.items() if k != "interrupted"}))
        except Exception as e:  # noqa: BLE001 - pydantic/harmony errors: one line for the user
            raise OssMlxError(f"{path}: message {i} is not a harmony message ({e})") from None
    return turns


# --------------------------------------------------------------------------------------------
# Commands


def parse_command(line: str) -> tuple[str, str]:
    """'/effort  high' -> ('/effort', 'high'); a unique prefix ('/eff') names its command."""
    name, _, arg = line.strip().partition(" ")
    name = name.lower()
    if name not in COMMAND_NAMES:
        matches = [c for c in COMMAND_NAMES if c.startswith(name)] if len(name) > 1 else []
        if len(matches) == 1:
            name = matches[0]
    if name in ("/exit", "/q"):
        name = "/quit"
    return name, arg.strip()


def suggest(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, COMMAND_NAMES, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown command {name}: {hint}/help lists the commands"


# --------------------------------------------------------------------------------------------
# Output: a rich terminal view, and a plain one for pipes


def footer_text(stats, max_context: int) -> tuple[str, float]:
    used = stats.prompt_tokens + stats.generated_tokens
    frac = used / max_context if max_context else 0.0
    parts = [f"{stats.generated_tokens} tokens", f"TTFT {stats.ttft_s:.2f} s"]
    if stats.decode_tps:
        parts.append(f"{stats.decode_tps:.1f} tok/s")
    parts.append(f"context {used:,}/{max_context:,} ({100 * frac:.0f}%)")
    if stats.cached_tokens:
        parts.append(f"{stats.cached_tokens:,} cached")
    return " · ".join(parts), frac


class TerminalView:
    """Streams a turn with rich: reasoning dimmed, answer live, then markdown."""

    def __init__(self, hide_reasoning: bool):
        from rich.console import Console

        self.console = Console(highlight=False)
        self.hide_reasoning = hide_reasoning
        self.section = None
        self.text = ""
        self.live = None
        self.thinking_tokens = 0

    # messages outside a turn
    def info(self, msg: str):
        self.console.print(msg, markup=False, soft_wrap=True)  # the terminal wraps, not rich

    def note(self, msg: str):
        self.console.print(msg, style="dim", markup=False)

    def warn(self, msg: str):
        self.console.print(msg, style="yellow", markup=False)

    def error(self, msg: str):
        self.console.print(msg, style="bold red", markup=False)

    def markup(self, msg: str):
        self.console.print(msg)

    # a turn
    def start(self):
        self.section, self.text, self.thinking_tokens = None, "", 0

    def delta(self, channel: str | None, recipient: str | None, text: str):
        kind = "tool" if recipient else ("analysis" if channel == "analysis" else "answer")
        if kind != self.section:
            self._close()
            self._open(kind, recipient)
        if kind == "analysis":
            self.thinking_tokens += 1
            if self.hide_reasoning:
                self.live.update(self._spinner())
            else:
                self._stream(text)
            return
        self.text += text  # the answer's Live reads it at each refresh (see _open)

    def finish(self, interrupted: bool = False):
        self._close(interrupted)

    def _open(self, kind, recipient):
        from rich.live import Live

        self.section, self.text = kind, ""
        if kind == "analysis":
            if self.hide_reasoning:
                self.live = Live(self._spinner(), console=self.console, transient=True,
                                 refresh_per_second=8)
                self.live.start()
            else:
                self.console.print("Thinking", style="dim bold", markup=False)
                self.col, self.pending = 0, ""
        elif kind == "answer":
            # get_renderable: the answer is re-wrapped at each refresh, not at each token.
            self.live = Live(get_renderable=self._tail, console=self.console, transient=True,
                             refresh_per_second=12, vertical_overflow="crop")
            self.live.start()
        else:
            self.recipient = recipient

    def _close(self, interrupted: bool = False):
        from rich.markdown import Markdown

        if self.live is not None:
            self.live.stop()
            self.live = None
        if self.section == "analysis":
            if not self.hide_reasoning:
                self._stream("", flush=True)
                self.console.print()
                self.console.print()
            else:
                self.note(f"(thought for {self.thinking_tokens} tokens; /reasoning show to see)")
        elif self.section == "answer":
            self.console.print(Markdown(self.text))
        elif self.section == "tool":
            self.console.print(f"→ tool call {self.recipient}({self.text})", style="yellow",
                               markup=False)
        if interrupted:
            self.warn(INTERRUPTED_NOTE)
        self.section = None

    def _stream(self, text: str, flush: bool = False):
        """Print streamed reasoning, wrapping at word boundaries (the terminal would cut words).

        The trailing piece of a word is held back until the next delta shows where it ends.
        """
        import re

        from rich.cells import cell_len

        width = self.console.size.width
        self.pending += text
        pieces = re.findall(r"\S+|\s+", self.pending)
        self.pending = "" if flush or not pieces or pieces[-1].isspace() else pieces.pop()
        out = []
        for piece in pieces:
            n = cell_len(piece)
            if "\n" in piece:
                out.append("\n" * piece.count("\n"))
                self.col = 0
            elif piece.isspace():
                if self.col + n >= width:
                    out.append("\n")
                    self.col = 0
                elif self.col:
                    out.append(piece)
                    self.col += n
            else:
                if self.col and self.col + n > width:
                    out.append("\n")
                    self.col = 0
                out.append(piece)
                self.col = (self.col + n) % width if self.col + n > width else self.col + n
        if out:
            self.console.print("".join(out), style="dim italic", end="", markup=False,
                               highlight=False, soft_wrap=True)

    def _spinner(self):
        from rich.spinner import Spinner

        return Spinner("dots", text=f"thinking… {self.thinking_tokens} tokens", style="dim")

    def _tail(self):
        """The answer so far, cut to its last screenful while it streams."""
        from rich.text import Text

        height = max(self.console.size.height - 2, 3)
        lines = Text(self.text).wrap(self.console, self.console.size.width)
        return Text("\n").join(lines[-height:]) if len(lines) > height else Text(self.text)

    def footer(self, text: str):
        self.console.print(text, style="dim", markup=False)

    def end(self):
        self.console.print()


class PipeView:
    """Batch mode: the answer to stdout as it streams, everything else to stderr, no styling."""

    def __init__(self, hide_reasoning: bool):
        self.hide_reasoning = hide_reasoning
        self.section = None

    def _err(self, msg: str):
        print(msg, file=sys.stderr, flush=True)

    info = note = warn = error = markup = _err

    def start(self):
        self.section = None

    def delta(self, channel, recipient, text):
        kind = "tool" if recipient else ("analysis" if channel == "analysis" else "answer")
        if kind != self.section:
            self._close()
            self.section = kind
            if kind == "tool":
                sys.stderr.write(f"→ tool call {recipient}(")
        if kind == "answer":
            sys.stdout.write(text)
            sys.stdout.flush()
        elif kind == "tool" or not self.hide_reasoning:
            sys.stderr.write(text)
            sys.stderr.flush()

    def _close(self):
        if self.section == "answer":
            sys.stdout.write("\n")
            sys.stdout.flush()
        elif self.section == "tool":
            sys.stderr.write(")\n")
        elif self.section == "analysis" and not self.hide_reasoning:
            sys.stderr.write("\n")
        self.section = None

    def finish(self, interrupted: bool = False):
        self._close()
        if interrupted:
            self._err(INTERRUPTED_NOTE)

    def footer(self, text: str):
        self._err(text)

    def end(self):
        pass


# --------------------------------------------------------------------------------------------
# The REPL


class Chat:
    def __init__(self, engine, session: Session, view, model_name: str):
        self.engine = engine
        self.session = session
        self.view = view
        self.model_name = model_name
        self.last_stats = None
        self.totals = {"turns": 0, "generated": 0, "prefilled": 0, "cached": 0}
        self.failed = False

    @property
    def max_context(self) -> int:
        return int(self.engine.max_context)

    def params(self):
        from .engine import SamplingParams

        s = self.session.settings
        return SamplingParams(temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                              max_tokens=s.max_tokens)

    # one turn --------------------------------------------------------------------------------

    def ask(self, text: str) -> None:
        import signal
        import threading

        cancel = threading.Event()
        presses = []

        def on_sigint(signum, frame):
            # First Ctrl-C: stop this answer, keep the session. A third one means "really stop".
            presses.append(1)
            cancel.set()
            if len(presses) >= 3:
                raise KeyboardInterrupt

        conversation = self.session.conversation(pending=text)
        self.view.start()
        completion, streamed = None, {"final": "", "visible": False}
        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            for ev in self.engine.stream(conversation, self.params(), cancel=cancel):
                if ev.type == "delta":
                    streamed["visible"] = True
                    if ev.channel == "final" and not ev.recipient:
                        streamed["final"] += ev.text
                    self.view.delta(ev.channel, ev.recipient, ev.text)
                elif ev.type == "done":
                    completion = ev.completion
        except KeyboardInterrupt:
            cancel.set()
        except OssMlxError as e:
            self.view.finish()
            self.view.error(str(e))
            self.view.note("the question was not added; /reset starts a new conversation, "
                           "/undo drops the last exchange")
            self.failed = True
            return
        except Exception as e:  # noqa: BLE001 - a bug in one answer must not lose the session
            if os.environ.get("OSS_MLX_DEBUG"):
                raise
            self.view.finish()
            self.view.error(f"error: {type(e).__name__}: {e} (the question was not added; "
                            f"set OSS_MLX_DEBUG=1 for details)")
            self.failed = True
            return
        finally:
            signal.signal(signal.SIGINT, previous)

        stop = completion.stop_reason if completion is not None else "cancelled"
        interrupted = stop == "cancelled" or (completion is None and cancel.is_set())
        self.view.finish(interrupted=interrupted)
        self.session.turns.append(self._turn(text, completion, streamed, interrupted))
        if completion is None:
            return
        if not streamed["visible"] and completion.tokens:
            # Nothing parsed as a harmony message (random demo weights do this): show the raw
            # text rather than an empty answer.
            raw = self.engine.encoding.decode(completion.tokens)
            self.view.note(f"(no harmony message; the model wrote {len(completion.tokens)} "
                           f"tokens: {short(raw, 200)!r})")
        self._report(completion)

    def _turn(self, text, completion, streamed, interrupted) -> Turn:
        from .harmony import assistant_message, tool_result_message

        # Completion.messages holds the unfinished final message of a cut turn; `streamed` covers
        # a KeyboardInterrupt that ended the stream before the done event.
        messages = list(completion.messages) if completion is not None else []
        if interrupted and streamed["final"] and not any(m.channel == "final" for m in messages):
            messages.append(assistant_message(streamed["final"]))
        turn = Turn(user=text, messages=messages, interrupted=interrupted)
        if completion is not None and completion.stop_reason == "tool_call":
            # This chat has no tools, and harmony wants a result after every call.
            call = messages[-1]
            turn.messages.append(tool_result_message(call.recipient, NO_TOOLS_REPLY,
                                                     channel=call.channel or "commentary"))
        return turn

    def _report(self, completion) -> None:
        stats = completion.stats
        self.last_stats = stats
        self.totals["turns"] += 1
        self.totals["generated"] += stats.generated_tokens
        self.totals["cached"] += stats.cached_tokens
        self.totals["prefilled"] += stats.prompt_tokens - stats.cached_tokens
        text, frac = footer_text(stats, self.max_context)
        self.view.footer(text)
        stop = completion.stop_reason
        if stop == "length":
            self.view.warn(f"stopped at the token limit ({self.session.settings.max_tokens}); "
                           f"raise it with --max-tokens")
        elif stop == "context":
            self.view.warn(f"the context is full ({self.max_context:,} tokens): the answer was "
                           f"cut. /reset starts a new conversation, /undo drops the last exchange")
        elif stop == "malformed":
            self.view.warn("the model's output broke the harmony format; kept what was parsed")
        elif stop == "tool_call":
            self.view.note("(this chat has no tools; the model was told so)")
        if stop != "context" and frac > NEARLY_FULL:
            self.view.warn(f"the context is nearly full ({100 * frac:.0f}%): /reset starts a new "
                           f"conversation (or /undo drops the last exchange)")
        self.view.end()

    # commands --------------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, arg = parse_command(line)
        s = self.session.settings
        v = self.view
        if name == "/quit":
            return False
        if name == "/help":
            for usage, text in COMMANDS:
                v.info(f"  {usage:<28} {text}")
            v.info("  End a line with \\ to continue on the next; Ctrl-C stops an answer.")
        elif name == "/effort":
            if arg:
                if arg.lower() not in EFFORTS:
                    v.error(f"/effort takes one of: {', '.join(EFFORTS)}")
                    return True
                s.reasoning = arg.lower()
            v.info(f"reasoning effort: {s.reasoning}")
        elif name == "/reasoning":
            if arg.lower() in ("show", "on"):
                s.hide_reasoning = False
            elif arg.lower() in ("hide", "off"):
                s.hide_reasoning = True
            elif arg:
                v.error("/reasoning takes show or hide")
                return True
            v.hide_reasoning = s.hide_reasoning
            v.info(f"reasoning: {'hidden' if s.hide_reasoning else 'shown'}")
        elif name == "/system":
            if arg == "-":
                s.system = None
            elif arg:
                s.system = arg
            v.info(f"instructions: {s.system}" if s.system else "instructions: (none)")
        elif name == "/reset":
            self.session.turns.clear()
            v.info("new conversation")
        elif name == "/undo":
            if self.session.turns:
                turn = self.session.turns.pop()
                v.info(f"dropped: {short(turn.user)}")
            else:
                v.info("nothing to undo")
        elif name == "/save":
            if not arg:
                v.error("usage: /save FILE")
                return True
            try:
                path = self.session.save(arg, self.model_name)
                v.info(f"saved {exchanges(len(self.session.turns))} to {path}")
            except OssMlxError as e:
                v.error(str(e))
        elif name == "/load":
            if not arg:
                v.error("usage: /load FILE")
                return True
            try:
                self.session.load(arg)
            except OssMlxError as e:
                v.error(str(e))
                return True
            from .harmony import message_text

            v.hide_reasoning = s.hide_reasoning
            v.info(f"loaded {exchanges(len(self.session.turns))} from {arg} "
                   f"(reasoning effort: {s.reasoning})")
            for turn in self.session.turns[-3:]:
                v.note(f"  you: {short(turn.user)}")
                final = next((m for m in reversed(turn.messages) if m.channel == "final"), None)
                mark = f" {INTERRUPTED_NOTE}" if turn.interrupted else ""
                v.note(f"  model: {short(message_text(final)) if final else '…'}{mark}")
        elif name == "/stats":
            self.show_stats()
        elif name == "/prompt":
            v.info(self.prompt_text())
        else:
            v.error(suggest(name))
        return True

    def prompt_text(self) -> str:
        return self.engine.encoding.decode(self.engine.render(self.session.conversation()))

    def show_stats(self) -> None:
        s, st, v = self.session.settings, self.last_stats, self.view
        v.info(f"model: {self.model_name}")
        v.info(f"reasoning effort: {s.reasoning} · reasoning {'hidden' if s.hide_reasoning else 'shown'}"
               f" · temperature {s.temperature} · top-p {s.top_p} · max tokens {s.max_tokens}")
        v.info(f"exchanges: {len(self.session.turns)}")
        if st is None:
            v.info("no answer yet")
            return
        used = st.prompt_tokens + st.generated_tokens
        v.info(f"last answer: prompt tokens {st.prompt_tokens:,}, cached tokens "
               f"{st.cached_tokens:,}, generated tokens {st.generated_tokens:,}")
        v.info(f"  time to first token {st.ttft_s:.2f} s · prefill {st.prefill_tps:.1f} tok/s · "
               f"decode {st.decode_tps:.1f} tok/s · peak memory "
               f"{st.peak_memory_bytes / 2**30:.2f} GiB")
        v.info(f"context used: {used:,} of {self.max_context:,} "
               f"({100 * used / self.max_context:.1f}%)")
        t = self.totals
        v.info(f"session: {t['turns']} answers, {t['generated']:,} tokens generated, "
               f"{t['prefilled']:,} prompt tokens computed, {t['cached']:,} reused from the cache")


def exchanges(n: int) -> str:
    return f"{n} exchange" + ("" if n == 1 else "s")


def short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


# --------------------------------------------------------------------------------------------
# Input


def history_file() -> Path:
    from .store import home

    return home() / "chat_history"


def setup_readline():
    """Up-arrow history across sessions; returns the readline module or None."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline
        return None
    readline.set_auto_history(False)  # we add whole (multi-line) entries ourselves
    try:
        readline.read_history_file(history_file())
    except (OSError, UnicodeDecodeError):
        pass
    readline.set_history_length(1000)
    return readline


def save_readline(readline) -> None:
    if readline is None:
        return
    try:
        history_file().parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(history_file())
    except OSError:
        pass  # history is a convenience; never fail the exit over it


def _pending_input() -> bool:
    """True when more typed/pasted bytes are already waiting: the rest of a paste."""
    import select

    try:
        return bool(select.select([sys.stdin], [], [], 0.02)[0])
    except (OSError, ValueError):
        return False


def read_tty(readline, prompt: str = ">>> ") -> str:
    """One message from the terminal: a trailing backslash continues, a paste stays one message.

    Raises EOFError / KeyboardInterrupt like input().
    """
    # Lines typed while an answer streamed are separate messages; only input that arrives in
    # one burst after the prompt is shown is a paste.
    typed_ahead = _pending_input()
    lines = []
    line = input(prompt)
    while True:
        if line.endswith("\\"):
            lines.append(line[:-1])
            line = input("... ")
            continue
        lines.append(line)
        if typed_ahead or not _pending_input():
            break
        line = input("... ")
    text = "\n".join(lines).strip()
    if readline is not None and text:
        readline.add_history(text)
    return text


def read_pipe(stream):
    """Messages from a pipe: one per line, a trailing backslash joins the next line."""
    buf = []
    for line in stream:
        line = line.rstrip("\r\n")
        if line.endswith("\\"):
            buf.append(line[:-1])
            continue
        buf.append(line)
        text = "\n".join(buf).strip()
        buf = []
        if text:
            yield text
    if buf and "\n".join(buf).strip():
        yield "\n".join(buf).strip()


# --------------------------------------------------------------------------------------------
# Model


def network_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def default_model(interactive: bool, say) -> Path:
    """gpt-oss-20b from the local store, or how to get it (offered when online and interactive)."""
    from .store import resolve_model

    try:
        return resolve_model(DEFAULT_MODEL)
    except OssMlxError:
        pass
    how = f"oss-mlx convert openai/{DEFAULT_MODEL}"
    if interactive and network_reachable():
        say(f"{DEFAULT_MODEL} is not in the local model store. It can be downloaded from Hugging "
            f"Face (about 13 GB) and converted now ({how}).")
        try:
            answer = input("Download and convert it now? [y/N] ").strip().lower()
        except (EOFError, KeyboardInterrupt):
            answer = ""
        if answer in ("y", "yes"):
            import subprocess

            rc = subprocess.call([sys.executable, "-m", "oss_mlx.cli", "convert",
                                  f"openai/{DEFAULT_MODEL}"])
            if rc != 0:
                raise OssMlxError(f"the conversion failed; try again with: {how}")
            return resolve_model(DEFAULT_MODEL)
    raise OssMlxError(f"{DEFAULT_MODEL} is not in the local model store; get it with "
                      f"`{how}` (needs the network once), pass --model FOLDER, "
                      f"or try `oss-mlx chat --demo`")


def load_engine(model_dir):
    hook = os.environ.get("OSS_MLX_TEST_ENGINE")
    if hook:  # tests only: see the module docstring
        import importlib

        module, _, func = hook.partition(":")
        return getattr(importlib.import_module(module), func)(model_dir)
    from .distributed import load_engine  # one rank of an mlx.launch: see oss_mlx.distributed

    return load_engine(model_dir)


# --------------------------------------------------------------------------------------------


def main(args) -> int:
    import contextlib

    interactive = sys.stdin.isatty()
    settings = Settings(reasoning=args.reasoning, system=args.system,
                        max_tokens=args.max_tokens or (DEMO_MAX_TOKENS if args.demo
                                                       else DEFAULT_MAX_TOKENS),
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                        hide_reasoning=args.hide_reasoning)
    if settings.max_tokens <= 0:
        raise OssMlxError("--max-tokens must be positive")
    if settings.temperature < 0 or not 0 < settings.top_p <= 1:
        raise OssMlxError("--temperature must be >= 0 and --top-p in (0, 1]")
    view = (TerminalView if interactive else PipeView)(settings.hide_reasoning)

    with contextlib.ExitStack() as stack:
        if args.demo:
            from .demo import DEMO_NAME, demo_model

            view.warn("DEMO: a tiny model with RANDOM weights, made on the spot; "
                      "its answers are noise.")
            with (view.console.status("making the demo model…", spinner="dots") if interactive
                  else contextlib.nullcontext()):
                model_dir = stack.enter_context(demo_model())
            name = DEMO_NAME
        elif args.model:
            from .engine import resolve_model_dir

            model_dir, name = resolve_model_dir(args.model), args.model
        else:
            model_dir, name = default_model(interactive, view.info), DEFAULT_MODEL
        if interactive:
            with view.console.status(f"loading {name}…", spinner="dots"):
                engine = load_engine(model_dir)
        else:
            engine = load_engine(model_dir)
        chat = Chat(engine, Session(settings), view, name)
        if interactive:
            return repl(chat)
        return batch(chat, sys.stdin)


def repl(chat: Chat) -> int:
    v = chat.view
    v.markup(f"[bold]oss-mlx chat[/bold] · {chat.model_name} · reasoning "
             f"{chat.session.settings.reasoning} · context {chat.max_context:,} tokens")
    v.note("/help for commands · Ctrl-C stops an answer · Ctrl-D or /quit leaves")
    readline = setup_readline()
    try:
        while True:
            try:
                text = read_tty(readline)
            except (EOFError, KeyboardInterrupt):
                v.console.print()
                return 0
            if not text:
                continue
            if text.startswith("/"):
                if not chat.command(text):
                    return 0
                continue
            chat.ask(text)
    finally:
        save_readline(readline)


def batch(chat: Chat, stream) -> int:
    try:
        for text in read_pipe(stream):
            if text.startswith("/"):
                if not chat.command(text):
                    break
                continue
            chat.ask(text)
    except KeyboardInterrupt:
        return 130
    return 1 if chat.failed else 0
