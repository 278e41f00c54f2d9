"""`oss-mlx chat`: an interactive terminal chat with gpt-oss.

The REPL is a thin loop over the engine. It keeps the conversation as harmony messages, puts the
chosen reasoning effort in the system message, and hands the whole conversation to
`Engine.stream` every turn; the engine's prompt cache makes a follow-up cost only its new tokens.
Reasoning (the analysis channel) streams dimmed and apart from the answer (or hidden); the final
answer streams as text and is re-rendered as markdown once complete.

Split by job: this module is the REPL (commands, one turn, the default model and its download
offer, `main`); `chat_session` holds the conversation and its /save file format, `chat_view` the
terminal and pipe views, `chat_input` readline and the pipe reader.

Piped stdin (not a terminal) runs as a batch: each line is a turn or a /command, answers go to
stdout, everything else (reasoning, footers, notes) to stderr.

`main(args, load_engine=...)` builds the engine with `load_engine(model_dir)` instead of
`Engine.load` (tests/scripted.py replays scripted harmony streams through it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from oss_mlx.cli import options, tools as cli_tools
from oss_mlx.cli.chat.input import read_pipe, read_tty, save_readline, setup_readline
from oss_mlx.cli.chat.tools import USAGE as TOOLS_USAGE, ChatTools
from oss_mlx.cli.chat.session import DEFAULT_MAX_TOKENS, INTERRUPTED_NOTE, Exchange, Session, Settings
from oss_mlx.cli.chat.view import PipeView, TerminalView, footer_text
from oss_mlx.defaults import DEMO_MAX_TOKENS, EFFORTS
from oss_mlx.errors import OssMlxError

NEARLY_FULL = 0.9
NO_TOOLS_REPLY = "error: no tools are available in this chat"

COMMANDS = [
    (f"/effort [{'|'.join(EFFORTS)}]", "show or set the reasoning effort"),
    ("/reasoning [show|hide]", "show or hide the model's reasoning"),
    ("/system [TEXT]", "show or set the instructions (`/system -` clears them)"),
    ("/reset", "start a new conversation (settings are kept)"),
    ("/undo", "drop the last exchange"),
    ("/save FILE", "write the conversation (settings + messages) as JSON"),
    ("/load FILE", "restore a conversation written by /save"),
    ("/stats", "statistics of the last answer and the session"),
    TOOLS_USAGE,
    ("/prompt", "show the conversation as the model will see it (harmony text)"),
    ("/help", "this list"),
    ("/quit", "leave (also Ctrl-D, or Ctrl-C twice at the prompt)"),
]
COMMAND_NAMES = [usage.split()[0] for usage, _ in COMMANDS]


def add_arguments(parser):
    options.add_model(parser)
    options.add_conversation(parser)
    options.add_sampling(parser, f"{DEFAULT_MAX_TOKENS}; {DEMO_MAX_TOKENS} with --demo")
    parser.add_argument("--hide-reasoning", action="store_true",
                        help="do not show the model's reasoning (toggle with /reasoning)")
    cli_tools.add_arguments(parser)
    options.add_loading(parser)


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
# The REPL


def kv_path(path) -> Path:
    """Where /save writes the KV state of the conversation saved at `path`: beside it."""
    return Path(path).expanduser().with_suffix(".safetensors")


class Chat:
    def __init__(self, engine, session: Session, view, model_name: str):
        self.engine = engine
        self.session = session
        self.view = view
        self.model_name = model_name
        self.last_stats = None
        self.totals = {"turns": 0, "generated": 0, "prefilled": 0, "cached": 0}
        self.failed = False
        self.tools = ChatTools(view)  # --tools, /tools (cli/chat/tools.py)

    @property
    def max_context(self) -> int:
        return int(self.engine.max_context)

    def params(self):
        from oss_mlx.engine.engine import SamplingParams

        s = self.session.settings
        return SamplingParams(temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                              max_tokens=s.max_tokens)

    # one turn --------------------------------------------------------------------------------

    def ask(self, text: str) -> None:
        import signal
        import threading

        from oss_mlx.harmony import section_of

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
        completion, streamed = None, {"final": "", "analysis": "", "visible": False}
        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            for ev in self.tools.stream(self.engine, conversation, self.params(), cancel,
                                        progress=self.view.progress):
                if ev.type == "delta":
                    section = section_of(ev.channel, ev.recipient)
                    streamed["visible"] = streamed["visible"] or section is not None
                    if ev.channel in ("final", "analysis") and section != "tool":
                        streamed[ev.channel] += ev.text
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
        if not streamed["visible"] and not self.tools.shown and completion.tokens:
            # Nothing parsed as a harmony message (random demo weights do this): show the raw
            # text rather than an empty answer.
            raw = raw_text(self.engine, completion)
            self.view.note(f"(no harmony message; the model wrote {len(completion.tokens)} "
                           f"tokens: {short(raw, 200)!r})")
        self._report(completion)

    def _turn(self, text, completion, streamed, interrupted) -> Exchange:
        from oss_mlx.harmony import assistant_message, tool_result_message

        # Completion.messages holds the unfinished final message of a cut turn; `streamed` covers
        # a KeyboardInterrupt that ended the stream before the done event.
        # Every turn keeps what the model wrote: an unfinished analysis (kept for /save; the
        # model does not see it again, see history_messages), and, when nothing parsed as a
        # harmony message (random weights), the raw text as the answer, so that the history
        # never holds two user messages in a row.
        messages = list(completion.messages) if completion is not None else []
        if interrupted and streamed["analysis"] and not any(m.channel == "analysis"
                                                            for m in messages):
            messages.insert(0, assistant_message(streamed["analysis"], "analysis"))
        if interrupted and streamed["final"] and not any(m.channel == "final" for m in messages):
            messages.append(assistant_message(streamed["final"]))
        if not messages and completion is not None and completion.tokens:
            messages.append(assistant_message(raw_text(self.engine, completion)))
        turn = Exchange(user=text, messages=messages, interrupted=interrupted)
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
        self.totals["prefilled"] += stats.prefilled_tokens
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
            self.tools.reset()
            v.info("new conversation")
        elif name == "/undo":
            if self.session.turns:
                turn = self.session.turns.pop()
                v.info(f"dropped: {short(turn.user)}")
            else:
                v.info("nothing to undo")
        elif name == "/save":
            self.save(arg)
        elif name == "/load":
            self.load(arg)
        elif name == "/stats":
            self.show_stats()
        elif name == "/prompt":
            v.info(self.prompt_text())
        elif name == "/tools":
            self.tools.command(arg)
        else:
            v.error(suggest(name))
        return True

    def save(self, arg: str) -> None:
        v = self.view
        if not arg:
            v.error("usage: /save FILE")
            return
        try:
            path = self.session.save(arg, self.model_name)
            v.info(f"saved {exchanges(len(self.session.turns))} to {path}")
            conversation = self.tools.declare(self.session.conversation())
            if self.engine.save_cache(kv_path(path), conversation):
                v.info(f"saved the KV cache to {kv_path(path)} (/load resumes without prefill)")
        except OssMlxError as e:
            v.error(str(e))

    def load(self, arg: str) -> None:
        from oss_mlx.harmony import message_text

        v, s = self.view, self.session.settings
        if not arg:
            v.error("usage: /load FILE")
            return
        try:
            self.session.load(arg)
        except OssMlxError as e:
            v.error(str(e))
            return
        self.tools.reset()  # another conversation: a new python session
        if kv_path(arg).is_file():
            warning = self.engine.load_cache(kv_path(arg))
            if warning:
                v.warn(warning)
        v.hide_reasoning = s.hide_reasoning
        v.info(f"loaded {exchanges(len(self.session.turns))} from {arg} "
               f"(reasoning effort: {s.reasoning})")
        for turn in self.session.turns[-3:]:
            v.note(f"  you: {short(turn.user)}")
            final = next((m for m in reversed(turn.messages) if m.channel == "final"), None)
            mark = f" {INTERRUPTED_NOTE}" if turn.interrupted else ""
            v.note(f"  model: {short(message_text(final)) if final else '…'}{mark}")

    def prompt_text(self) -> str:
        conversation = self.tools.declare(self.session.conversation())
        return self.engine.encoding.decode(self.engine.render(conversation))

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
        v.info(f"  time to first token {st.ttft_s:.2f} s · {st.prefilled_tokens:,} prompt tokens "
               f"read at {st.prefill_tps:.1f} tok/s · "
               f"decode {st.decode_tps:.1f} tok/s · peak memory "
               f"{st.peak_memory_bytes / 2**30:.2f} GiB")
        v.info(f"context used: {used:,} of {self.max_context:,} "
               f"({100 * used / self.max_context:.1f}%)")
        t = self.totals
        v.info(f"session: {t['turns']} answers, {t['generated']:,} tokens generated, "
               f"{t['prefilled']:,} prompt tokens computed, {t['cached']:,} reused from the cache")


def raw_text(engine, completion) -> str:
    """What the model wrote, decoded as it is, without the stop token that ended it."""
    tokens = completion.tokens
    if tokens and completion.stop_reason in ("stop", "tool_call"):
        tokens = tokens[:-1]
    return engine.encoding.decode(tokens)


def exchanges(n: int) -> str:
    return f"{n} exchange" + ("" if n == 1 else "s")


def short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


# --------------------------------------------------------------------------------------------


def main(args, load_engine=None) -> int:
    """`load_engine(model_dir)` builds the engine (default: the memory check, then
    Engine.load); tests pass their own."""
    import contextlib

    from oss_mlx.cli.models import choose

    interactive = sys.stdin.isatty()
    default_max = DEMO_MAX_TOKENS if args.demo else DEFAULT_MAX_TOKENS
    settings = Settings(reasoning=args.reasoning, system=args.system,
                        max_tokens=default_max if args.max_tokens is None else args.max_tokens,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                        hide_reasoning=args.hide_reasoning)
    view = (TerminalView if interactive else PipeView)(settings.hide_reasoning)

    def busy(text):
        return (view.console.status(text, spinner="dots") if interactive
                else contextlib.nullcontext())

    with contextlib.ExitStack() as stack:
        if args.demo:
            view.warn("DEMO: a tiny model with RANDOM weights, made on the spot; "
                      "its answers are noise.")
        with busy("making the demo model…") if args.demo else contextlib.nullcontext():
            chosen = choose(args, stack, view.info, interactive)
        tools = ChatTools.from_args(args, view)  # checked before the model loads
        stack.callback(tools.close)
        if load_engine is None:
            from oss_mlx.engine.loading import load_engine as load

            def load_engine(folder):  # --max-context, --kv-bits, --force, --no-compile
                return load(str(folder), options.load_options(args))
        with busy(f"loading {chosen.name}…"):
            engine = load_engine(chosen.folder)
        chat = Chat(engine, Session(settings), view, chosen.name)
        chat.tools, tools.encoding = tools, engine.encoding
        if interactive:
            return repl(chat)
        return batch(chat, sys.stdin)


def repl(chat: Chat) -> int:
    v = chat.view
    v.markup(f"[bold]oss-mlx chat[/bold] · {chat.model_name} · reasoning "
             f"{chat.session.settings.reasoning} · context {chat.max_context:,} tokens")
    v.note("/help for commands · Ctrl-C stops an answer · Ctrl-D or /quit leaves")
    readline = setup_readline()
    interrupted = False  # the last thing at the prompt was a Ctrl-C
    try:
        while True:
            try:
                text = read_tty(readline)
            except EOFError:
                v.console.print()
                return 0
            except KeyboardInterrupt:
                # Clears the line, as in the Python and Node REPLs; twice in a row leaves. (Often
                # pressed a moment too late to stop an answer that just ended.)
                v.console.print()
                if interrupted:
                    return 0
                interrupted = True
                v.note("(Ctrl-C again, Ctrl-D or /quit leaves)")
                continue
            interrupted = False
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
