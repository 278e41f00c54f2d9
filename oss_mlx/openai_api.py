"""OpenAI request shapes (Chat Completions and Responses) and their mapping to harmony.

Both APIs are first flattened into one list of `Item`s (instructions, user text, reasoning,
assistant text, tool call, tool result), then `build_conversation` turns that list into the
harmony conversation gpt-oss was trained on:

- system and developer messages -> the developer message's `# Instructions` (merged in order);
- `tools` (JSON-schema functions) -> the developer message's `namespace functions`;
- assistant tool calls -> `assistant to=functions.NAME<|channel|>commentary <|constrain|>json`;
- tool results -> `functions.NAME to=assistant<|channel|>commentary`;
- reasoning sent back by a client is kept only for the turn in progress (after the last user
  message), as harmony's docs ask: finished turns lose their chain of thought.

Nothing here imports mlx; the server imports this module only when it builds its app, so
`oss-mlx --help` stays fast.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

if TYPE_CHECKING:
    from openai_harmony import Conversation

# "minimal" is OpenAI's newer name for its lowest setting; harmony's lowest is "low".
Effort = Literal["minimal", "low", "medium", "high"]


class APIError(Exception):
    """An error the client caused or must hear about, rendered as an OpenAI error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def validation_message(e: ValidationError) -> str:
    """The first pydantic error as one readable line: `messages.0.role: Input should be ...`.

    Errors of one field that may take several types (a union) are joined with "or".
    """

    def where(err) -> str:
        # Drop the union-member tags pydantic puts in locations (`str`, `list[dict[...]]`).
        parts = [str(p) for p in err["loc"]
                 if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]
        return ".".join(parts) or "body"

    errors = e.errors()
    first = where(errors[0])
    same = list(dict.fromkeys(err["msg"] for err in errors if where(err) == first))
    rest = sum(where(err) != first for err in errors)
    more = f" ({rest} more)" if rest else ""
    return f"invalid request: {first}: {' or '.join(same)}{more}"


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}


def parse_request(model: type[BaseModel], data: Any) -> BaseModel:
    if not isinstance(data, dict):
        raise APIError(400, "invalid request: the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise APIError(400, validation_message(e)) from None


# --------------------------------------------------------------------------------------------
# Request models. Unknown fields are ignored (clients send many: user, metadata, ...); fields we
# know are checked strictly, so a wrong type is a 400 that names the field.


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class FunctionDef(_Lenient):
    name: str = Field(min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict] = None


class ChatTool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class ToolCallFunction(_Lenient):
    name: str = Field(min_length=1)
    arguments: Union[str, dict, None] = None


class ChatToolCall(_Lenient):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list, None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ChatToolCall]] = None
    tool_call_id: Optional[str] = None
    # The chain of thought of an earlier assistant turn, as different clients send it back.
    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None
    thinking: Optional[str] = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatRequest(_Lenient):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    tools: Optional[list[ChatTool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict, None] = None
    reasoning_effort: Optional[Effort] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = Field(default=None, ge=1, le=1)
    prompt_cache_key: Optional[str] = None  # which conversation this continues: a cache hint
    user: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > 4 or any(not s for s in v):
            raise ValueError("at most 4 non-empty stop strings")
        return v


class ResponsesTool(_Lenient):
    type: Literal["function"]
    name: str = Field(min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict] = None


class Reasoning(_Lenient):
    effort: Optional[Effort] = None


class ResponsesRequest(_Lenient):
    model: str
    input: Union[str, list[dict]]
    instructions: Optional[str] = None
    tools: Optional[list[ResponsesTool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict, None] = None
    reasoning: Optional[Reasoning] = None
    max_output_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    seed: Optional[int] = None
    stream: bool = False
    previous_response_id: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    user: Optional[str] = None


# --------------------------------------------------------------------------------------------
# One flat history for both APIs.


@dataclass
class Item:
    kind: Literal["instructions", "user", "reasoning", "assistant", "tool_call", "tool_result"]
    text: str = ""
    name: str = ""      # tool_call / tool_result: the function name
    call_id: str = ""   # tool_call / tool_result


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict | None


def _text(content: Any, where: str) -> str:
    """Text of a message content: a string or a list of text parts (images are refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str) and part.get(
                "type", "text"
            ) in ("text", "input_text", "output_text", "reasoning_text", "summary_text"):
                parts.append(part["text"])
            elif isinstance(part, dict) and part.get("type") == "refusal":
                parts.append(str(part.get("refusal", "")))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(400, f"{where}[{i}]: content of type {kind!r} is not supported "
                                    "(text only)", param=where)
        return "".join(parts)
    raise APIError(400, f"{where}: content must be a string or a list of parts", param=where)


def _arguments(args: Any) -> str:
    if args is None:
        return "{}"
    return args if isinstance(args, str) else json.dumps(args)


def chat_items(req: ChatRequest) -> list[Item]:
    items: list[Item] = []
    names: dict[str, str] = {}  # tool_call_id -> function name, to label the results
    for i, m in enumerate(req.messages):
        where = f"messages.{i}.content"
        if m.role in ("system", "developer"):
            items.append(Item("instructions", _text(m.content, where)))
        elif m.role == "user":
            items.append(Item("user", _text(m.content, where)))
        elif m.role == "assistant":
            thought = m.reasoning_content or m.reasoning or m.thinking
            if thought:
                items.append(Item("reasoning", thought))
            text = _text(m.content, where)
            if text:
                items.append(Item("assistant", text))
            for tc in m.tool_calls or []:
                call_id = tc.id or f"call_{uuid.uuid4().hex[:24]}"
                names[call_id] = tc.function.name
                items.append(Item("tool_call", _arguments(tc.function.arguments),
                                  name=tc.function.name, call_id=call_id))
        else:  # tool
            name = names.get(m.tool_call_id or "") or m.name
            if not name:
                raise APIError(400, f"messages.{i}: tool message with tool_call_id "
                                    f"{m.tool_call_id!r} answers no earlier assistant tool call",
                               param=f"messages.{i}.tool_call_id")
            items.append(Item("tool_result", _text(m.content, where), name=name,
                              call_id=m.tool_call_id or ""))
    return items


def responses_items(req: ResponsesRequest) -> list[Item]:
    items: list[Item] = []
    if req.instructions:
        items.append(Item("instructions", req.instructions))
    if isinstance(req.input, str):
        items.append(Item("user", req.input))
        return items
    names: dict[str, str] = {}
    for i, it in enumerate(req.input):
        where = f"input.{i}"
        kind = it.get("type", "message" if "role" in it else None)
        if kind == "message":
            role = it.get("role")
            text = _text(it.get("content"), f"{where}.content")
            if role in ("system", "developer"):
                items.append(Item("instructions", text))
            elif role == "user":
                items.append(Item("user", text))
            elif role == "assistant":
                if text:
                    items.append(Item("assistant", text))
            else:
                raise APIError(400, f"{where}.role: unknown role {role!r}", param=f"{where}.role")
        elif kind == "reasoning":
            text = _text(it.get("content") or [], f"{where}.content")
            if text:
                items.append(Item("reasoning", text))
        elif kind == "function_call":
            name, call_id = it.get("name"), it.get("call_id")
            if not isinstance(name, str) or not name or not isinstance(call_id, str):
                raise APIError(400, f"{where}: a function_call needs string `name` and `call_id`",
                               param=where)
            names[call_id] = name
            items.append(Item("tool_call", _arguments(it.get("arguments")), name=name,
                              call_id=call_id))
        elif kind == "function_call_output":
            call_id = it.get("call_id")
            name = names.get(call_id) if isinstance(call_id, str) else None
            if not name:
                raise APIError(400, f"{where}: function_call_output with call_id {call_id!r} "
                                    "answers no function_call in the input", param=where)
            output = it.get("output")
            text = output if isinstance(output, str) else _text(output, f"{where}.output")
            items.append(Item("tool_result", text, name=name, call_id=call_id))
        else:
            raise APIError(400, f"{where}: input item of type {kind!r} is not supported "
                                "(message, reasoning, function_call, function_call_output)",
                           param=where)
    return items


def restore_reasoning(items: list[Item], recall) -> list[Item]:
    """Put back the chain of thought of tool calls whose reasoning the client did not return.

    Most OpenAI clients drop `reasoning_content` from the history, but harmony keeps the analysis
    of a tool-call sequence in progress (spec 5.7): without it the model loses its plan, and the
    prompt no longer matches the cached tokens. `recall(call_id)` gives the reasoning that
    preceded that call when this server made it (None otherwise).
    """
    out: list[Item] = []
    seen = False  # a reasoning item since the last user message or tool result
    for it in items:
        if it.kind in ("user", "tool_result"):
            seen = False
        elif it.kind == "reasoning":
            seen = True
        elif it.kind == "tool_call" and not seen:
            thought = recall(it.call_id)
            if thought:
                j = len(out)
                while j and out[j - 1].kind == "assistant":  # before the call's preamble
                    j -= 1
                out.insert(j, Item("reasoning", thought))
                seen = True
        out.append(it)
    return out


def select_tools(tools: list[Tool], tool_choice: Any) -> list[Tool]:
    """The tools to render. "none": none; "auto"/"required": all (harmony has no way to force a
    call, so "required" is only a request); a named function: that one alone, so the model sees
    no other choice."""
    if not tools or tool_choice == "none":
        return []
    if tool_choice in (None, "auto", "required"):
        return tools
    name = None
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    chosen = [t for t in tools if t.name == name]
    if not chosen:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools",
                       param="tool_choice")
    return chosen


def build_conversation(items: list[Item], tools: list[Tool], effort: str | None) -> Conversation:
    """The harmony conversation for `items`, built with the same helpers as the chat REPL."""
    from . import harmony as hm

    instructions = "\n\n".join(it.text for it in items if it.kind == "instructions" and it.text)
    last_user = max((i for i, it in enumerate(items) if it.kind == "user"), default=-1)
    history = []
    for i, it in enumerate(items):
        if it.kind == "user":
            history.append(hm.user_message(it.text))
        elif it.kind == "reasoning":
            if i > last_user:  # finished turns drop their chain of thought (spec 5.7)
                history.append(hm.assistant_message(it.text, "analysis"))
        elif it.kind == "assistant":
            # Text right before a tool call in the same turn is a preamble (commentary).
            nxt = next((x.kind for x in items[i + 1:] if x.kind != "reasoning"), None)
            history.append(hm.assistant_message(it.text, "commentary" if nxt == "tool_call" else "final"))
        elif it.kind == "tool_call":
            history.append(hm.tool_call_message(f"functions.{it.name}", it.text))
        elif it.kind == "tool_result":
            history.append(hm.tool_result_message(f"functions.{it.name}", it.text))
    return hm.build_conversation(
        history,
        reasoning="low" if effort == "minimal" else (effort or "medium"),
        developer_instructions=instructions or None,
        tools=[{"name": t.name, "description": t.description, "parameters": t.parameters or None}
               for t in tools],
    )


def cache_key(req) -> str | None:
    """The prompt-cache hint of a request: `prompt_cache_key`, else `user`."""
    return req.prompt_cache_key or req.user or None


def chat_tools(req: ChatRequest) -> list[Tool]:
    return [Tool(t.function.name, t.function.description or "", t.function.parameters)
            for t in req.tools or []]


def responses_tools(req: ResponsesRequest) -> list[Tool]:
    return [Tool(t.name, t.description or "", t.parameters) for t in req.tools or []]
