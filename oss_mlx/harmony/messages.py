"""Harmony messages (docs/harmony.md §5): building them, and the rules about them.

Everything that turns user-facing turns into harmony messages lives here; callers never write
special tokens by hand. A conversation is an `openai_harmony.Conversation` of
`openai_harmony.Message` objects (save them with `Message.to_dict()`, load with
`Message.from_dict()`).

    history = [user_message("What is 2 + 2?")]
    conv = build_conversation(history, reasoning="low", developer_instructions="Be brief.")
    completion = engine.complete(conv, params)         # oss_mlx.engine
    history += completion.messages                     # analysis + final (or + a tool call)
    history.append(tool_result_message("functions.get_weather", '{"sunny": true}'))

How turns are represented:
  user turn           user_message(text)            -> <|start|>user<|message|>text<|end|>
  assistant answer    assistant_message(text)       -> <|start|>assistant<|channel|>final<|message|>text<|end|>
  assistant thinking  assistant_message(text, "analysis")
  assistant tool call tool_call_message("functions.get_weather", '{"city": "Paris"}')
                      -> <|start|>assistant to=functions.get_weather<|channel|>commentary
                         <|constrain|>json<|message|>{...}<|call|>
  tool result         tool_result_message("functions.get_weather", '{"sunny": true}')
                      -> <|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>...<|end|>

The rules, each in one function: which messages are tool calls (`is_tool_call`), which part of
a turn a streamed piece belongs to (`section_of`), and which chain of thought the model sees
again (`drop_finished_analysis`, applied once per prompt by encoding.render_prompt).
"""

from __future__ import annotations

import datetime
import json
from typing import Iterable, Sequence

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    ToolDescription,
)

from oss_mlx.defaults import EFFORTS
from oss_mlx.errors import OssMlxError


# ---- messages -------------------------------------------------------------------------------


def _effort(reasoning) -> ReasoningEffort:
    if isinstance(reasoning, ReasoningEffort):
        return reasoning
    value = str(reasoning).lower()
    if value not in EFFORTS:
        raise OssMlxError(f"unknown reasoning effort {reasoning!r}: use low, medium or high")
    return ReasoningEffort(value.capitalize())


def system_message(reasoning="medium", identity: str | None = None, date=None) -> Message:
    """The harmony system message (docs/harmony.md §5.3): identity, knowledge cutoff, date, effort, channels.

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
    """The developer message (docs/harmony.md §5.4): `# Instructions` and function tools; None when empty."""
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
    recipient other than "all" (docs/harmony.md §5.2: `to=` is left out when the recipient is absent or
    "all") and other than the conversation's roles ("assistant" is where a tool result goes)."""
    return bool(recipient) and recipient not in ("all", "assistant", "user")


def section_of(channel: str | None, recipient: str | None) -> str | None:
    """The one rule for where a streamed piece of an assistant turn goes: "tool" (a tool
    call's arguments), "reasoning" (the analysis channel), "answer" (the final channel, a
    commentary preamble, a message with no channel: what the user reads), or None (a channel
    harmony does not have, as random weights write: shown nowhere). generate, chat and the
    server all route by it, so they show the same channels."""
    if is_tool_call(recipient):
        return "tool"
    if channel == "analysis":
        return "reasoning"
    return "answer" if channel in (None, "final", "commentary") else None


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
    """A tool's output, sent back to the assistant (docs/harmony.md §5.5); name as in the call's recipient."""
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
    """The harmony docs rule (docs/harmony.md §5.7): drop analysis before the last assistant final message.

    Analysis after the last final belongs to a turn still in progress (a tool-call sequence) and
    is kept; everything else (user turns, finals, function calls and results) is kept. A
    built-in tool's call and its result are analysis too (the model calls `python` and
    `browser.*` on the analysis channel, and the result comes back on the call's channel): both
    go, never a result without its call (openai-harmony's renderer drops them alike).
    """
    messages = list(messages)
    last_final = -1
    for i, m in enumerate(messages):
        if m.author.role == Role.ASSISTANT and m.channel == "final":
            last_final = i
    return [
        m for i, m in enumerate(messages)
        if not (i < last_final and m.author.role in (Role.ASSISTANT, Role.TOOL)
                and m.channel == "analysis")
    ]


def build_conversation(
    messages: Sequence[Message],
    reasoning="medium",
    system: str | None = None,
    developer_instructions: str | None = None,
    tools: Sequence | None = None,
    date=None,
) -> Conversation:
    """system + developer (if any) + `messages`, every message kept (the renderer drops the
    finished turns' analysis, encoding.render_prompt).

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
    return Conversation.from_messages(head + body)


