"""The harmony format (spec section 5) through openai-harmony: offline encoding, conversations.

Everything that turns user-facing turns into harmony tokens lives here; callers never write
special tokens by hand. A conversation is an `openai_harmony.Conversation` of
`openai_harmony.Message` objects (save them with `Message.to_dict()`, load with
`Message.from_dict()`; `Conversation.to_json()/from_json()` do the same for a whole chat).

Typical use (chat REPL, server):

    enc = load_encoding(model_dir)                     # offline, from model_dir/o200k_base.tiktoken
    history = [user_message("What is 2 + 2?")]
    conv = build_conversation(history, reasoning="low", developer_instructions="Be brief.")
    completion = engine.complete(conv, params)         # oss_mlx.engine
    history += completion.messages                     # analysis + final (or + a tool call)
    # a tool call: completion.stop_reason == "tool_call", completion.tool_calls[0]["name"] ...
    history.append(tool_result_message("functions.get_weather", '{"sunny": true}'))
    conv = build_conversation(history, reasoning="low", tools=[...same tools...])

How turns are represented (all plain openai_harmony.Message objects):
  user turn           user_message(text)            -> <|start|>user<|message|>text<|end|>
  assistant answer    assistant_message(text)       -> <|start|>assistant<|channel|>final<|message|>text<|end|>
  assistant thinking  assistant_message(text, "analysis")
  assistant tool call tool_call_message("functions.get_weather", '{"city": "Paris"}')
                      -> <|start|>assistant to=functions.get_weather<|channel|>commentary
                         <|constrain|>json<|message|>{...}<|call|>
  tool result         tool_result_message("functions.get_weather", '{"sunny": true}')
                      -> <|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>...<|end|>
The messages an engine completion returns (`Completion.messages`) are already in this form and can
be appended to the history as they are; a `<|return|>` that ended the turn is rendered back as
`<|end|>` by the renderer, as the format prescribes.

Chain of thought: `drop_finished_analysis` applies the harmony *docs* rule (spec 5.7): analysis
messages before the last assistant `final` message are dropped; analysis after it (a tool-call
sequence still in progress) is kept. `render_prompt` (used by the engine) always applies it, so a
caller may keep the full history, analysis included, and still get the right prompt. (The
renderer's own `auto_drop_analysis` only drops analysis before the *first* final of the whole
conversation, keeping the chain of thought of turns 2..N-1; we do not rely on it.)
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Iterable, Sequence

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    HarmonyEncoding,
    HarmonyEncodingName,
    HarmonyError,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
    ToolDescription,
    load_harmony_encoding,
)

from .config import EFFORTS  # noqa: F401 - re-exported: harmony's reasoning efforts
from .convert.vocab import O200K_FILE as VOCAB_FILE, O200K_SHA256 as VOCAB_SHA256, SPECIAL_TOKENS
from .errors import OssMlxError

# Special token ids (spec 5.1), from the vocabulary's one table; used where a set lookup is
# cheaper than a call.
_ID = {name: i for i, name in SPECIAL_TOKENS.items()}
START, END, MESSAGE, CHANNEL = _ID["<|start|>"], _ID["<|end|>"], _ID["<|message|>"], _ID["<|channel|>"]
RETURN, CALL, CONSTRAIN, ENDOFTEXT = (_ID["<|return|>"], _ID["<|call|>"], _ID["<|constrain|>"],
                                      _ID["<|endoftext|>"])

_env_lock = threading.Lock()

__all__ = [
    "load_encoding", "build_conversation", "system_message", "developer_message",
    "user_message", "assistant_message", "tool_call_message", "tool_result_message",
    "drop_finished_analysis", "render_prompt", "tool_description", "message_text",
    "Conversation", "Message", "Role", "Author",
]


# ---- the encoding, offline ------------------------------------------------------------------


def load_encoding(model_dir) -> HarmonyEncoding:
    """The gpt-oss harmony encoding, read from `model_dir/o200k_base.tiktoken`; never downloads.

    openai-harmony reads the vocabulary from `$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken` (and
    checks its sha256) when that variable is set, else it downloads it. We set it to the model
    folder for the duration of the load and restore it afterwards. Raises OssMlxError when the
    file is missing or is not the genuine vocabulary.
    """
    path = Path(model_dir).expanduser().resolve() / VOCAB_FILE
    if not path.is_file():
        raise OssMlxError(
            f"no {VOCAB_FILE} in {path.parent}: re-convert the model with `oss-mlx convert`, or "
            f"copy the genuine {VOCAB_FILE} (sha256 {VOCAB_SHA256[:12]}...) into that folder"
        )
    st = path.stat()
    return _load_encoding_cached(str(path.parent), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_encoding_cached(folder: str, size: int, mtime_ns: int) -> HarmonyEncoding:
    with _env_lock:
        old = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = folder
        try:
            return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
        except HarmonyError as e:
            digest = hashlib.sha256(Path(folder, VOCAB_FILE).read_bytes()).hexdigest()
            if digest != VOCAB_SHA256:
                raise OssMlxError(
                    f"{Path(folder, VOCAB_FILE)} is not the genuine o200k vocabulary (sha256 "
                    f"{digest[:12]}..., expected {VOCAB_SHA256[:12]}...): re-convert the model or "
                    "replace the file"
                ) from None
            raise OssMlxError(f"cannot load the harmony encoding from {folder}: {e}") from None
        finally:
            if old is None:
                os.environ.pop("TIKTOKEN_ENCODINGS_BASE", None)
            else:
                os.environ["TIKTOKEN_ENCODINGS_BASE"] = old


# ---- messages -------------------------------------------------------------------------------


def _effort(reasoning) -> ReasoningEffort:
    if isinstance(reasoning, ReasoningEffort):
        return reasoning
    value = str(reasoning).lower()
    if value not in EFFORTS:
        raise OssMlxError(f"unknown reasoning effort {reasoning!r}: use low, medium or high")
    return ReasoningEffort(value.capitalize())


def system_message(reasoning="medium", identity: str | None = None, date=None) -> Message:
    """The harmony system message (spec 5.3): identity, knowledge cutoff, date, effort, channels.

    reasoning: "low" | "medium" | "high". identity: replaces "You are ChatGPT, a large language
    model trained by OpenAI." when given. date: "YYYY-MM-DD"; None means today (as OpenAI's
    reference chat does); "" or False leaves the date line out.
    """
    content = SystemContent.new().with_reasoning_effort(_effort(reasoning))
    if identity:
        content = content.with_model_identity(identity)
    if date is None:
        date = datetime.date.today().isoformat()
    if date:
        content = content.with_conversation_start_date(str(date))
    return Message.from_role_and_content(Role.SYSTEM, content)


def tool_description(tool) -> ToolDescription:
    """A function tool from an OpenAI-style dict or a ToolDescription.

    Accepts {"name", "description", "parameters"} or {"type": "function", "function": {...}}.
    """
    if isinstance(tool, ToolDescription):
        return tool
    if not isinstance(tool, dict):
        raise OssMlxError(f"a tool must be a dict with a name, got {type(tool).__name__}")
    fn = tool.get("function", tool) if tool.get("type", "function") == "function" else tool
    if not isinstance(fn, dict) or not fn.get("name"):
        raise OssMlxError(f"a tool needs a name: {json.dumps(tool)[:200]}")
    return ToolDescription.new(fn["name"], fn.get("description", "") or "", parameters=fn.get("parameters"))


def developer_message(instructions: str | None = None, tools: Sequence | None = None) -> Message | None:
    """The developer message (spec 5.4): `# Instructions` and function tools; None when empty."""
    if not instructions and not tools:
        return None
    content = DeveloperContent.new()
    if instructions:
        content = content.with_instructions(instructions)
    if tools:
        content = content.with_function_tools([tool_description(t) for t in tools])
    return Message.from_role_and_content(Role.DEVELOPER, content)


def user_message(text: str) -> Message:
    return Message.from_role_and_content(Role.USER, text)


def assistant_message(text: str, channel: str = "final") -> Message:
    """A past assistant message on `channel` ("final", "analysis" or "commentary")."""
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def is_tool_call(recipient: str | None) -> bool:
    """The one rule for which messages are tool calls: those addressed to a tool, i.e. to a
    recipient other than "all" (spec 5.2: `to=` is left out when the recipient is absent or
    "all") and other than the conversation's roles ("assistant" is where a tool result goes)."""
    return bool(recipient) and recipient not in ("all", "assistant", "user")


def function_name(recipient: str | None) -> str | None:
    """`functions.get_weather` -> `get_weather`: a call to a client-declared function; None for
    other recipients (python, browser.*, none)."""
    if recipient and recipient.startswith("functions."):
        return recipient[len("functions."):]
    return None


def _tool_name(name: str) -> str:
    """A bare function name ("get_weather") as the tool it names ("functions.get_weather")."""
    if "." not in name and name not in ("python", "browser"):
        return f"functions.{name}"
    return name


def tool_call_message(recipient: str, arguments: str | dict, channel: str = "commentary") -> Message:
    """A past assistant tool call, e.g. recipient "functions.get_weather", arguments JSON text.

    A bare name ("get_weather") is taken as a function tool ("functions.get_weather").
    """
    recipient = _tool_name(recipient)
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments)
    return (
        Message.from_role_and_content(Role.ASSISTANT, arguments)
        .with_channel(channel)
        .with_recipient(recipient)
        .with_content_type("<|constrain|>json")
    )


def tool_result_message(name: str, content: str | dict, channel: str = "commentary") -> Message:
    """A tool's output, sent back to the assistant (spec 5.5); name as in the call's recipient."""
    name = _tool_name(name)
    if not isinstance(content, str):
        content = json.dumps(content)
    return (
        Message.from_author_and_content(Author.new(Role.TOOL, name), content)
        .with_recipient("assistant")
        .with_channel(channel)
    )


def message_text(message: Message) -> str:
    """The text of a message's text contents, concatenated."""
    return "".join(getattr(c, "text", "") for c in message.content)


def drop_finished_analysis(messages: Iterable[Message]) -> list[Message]:
    """The harmony docs rule (spec 5.7): drop analysis before the last assistant final message.

    Analysis after the last final belongs to a turn still in progress (a tool-call sequence) and
    is kept; everything else (user turns, finals, tool calls, tool results) is kept.
    """
    messages = list(messages)
    last_final = -1
    for i, m in enumerate(messages):
        if m.author.role == Role.ASSISTANT and m.channel == "final":
            last_final = i
    return [
        m for i, m in enumerate(messages)
        if not (i < last_final and m.author.role == Role.ASSISTANT and m.channel == "analysis")
    ]


def build_conversation(
    messages: Sequence[Message],
    reasoning="medium",
    system: str | None = None,
    developer_instructions: str | None = None,
    tools: Sequence | None = None,
    date=None,
) -> Conversation:
    """system + developer (if any) + `messages`, with finished turns' analysis dropped.

    messages: the chat so far (user_message / assistant_message / tool_call_message /
    tool_result_message, or the Message objects from Completion.messages). Any system or developer
    message in it is replaced by the ones built from the arguments. system: replaces the model
    identity line of the harmony system message. developer_instructions, tools: the developer
    message (tools as OpenAI-style function dicts). date: see `system_message`.
    """
    head = [system_message(reasoning, identity=system, date=date)]
    dev = developer_message(developer_instructions, tools)
    if dev is not None:
        head.append(dev)
    body = [m for m in messages if m.author.role not in (Role.SYSTEM, Role.DEVELOPER)]
    return Conversation.from_messages(head + drop_finished_analysis(body))


def render_prompt(encoding: HarmonyEncoding, conversation) -> list[int]:
    """Prompt tokens for the next assistant turn: the conversation + `<|start|>assistant`.

    Applies `drop_finished_analysis` and then renders with harmony's own auto-drop off, so the
    docs rule is the only rule. `conversation` may be a Conversation or a list of Messages.
    """
    messages = conversation.messages if isinstance(conversation, Conversation) else list(conversation)
    conv = Conversation.from_messages(drop_finished_analysis(messages))
    try:
        return encoding.render_conversation_for_completion(
            conv, Role.ASSISTANT, RenderConversationConfig(auto_drop_analysis=False)
        )
    except HarmonyError as e:
        raise OssMlxError(f"cannot render the conversation: {e}") from None
