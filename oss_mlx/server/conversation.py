"""OpenAI requests -> the harmony conversation gpt-oss was trained on (docs/harmony.md §5.4-5.5).

Both APIs are first flattened into one list of `Item`s (instructions, user text, reasoning,
assistant text, tool call, tool result), then `conversation` turns that list into harmony:

- system and developer messages -> the developer message's `# Instructions` (merged in order);
- `tools` (JSON-schema functions) -> the developer message's `namespace functions`;
- assistant tool calls -> `assistant to=functions.NAME<|channel|>commentary <|constrain|>json`;
- tool results -> `functions.NAME to=assistant<|channel|>commentary`;
- reasoning sent back by a client is kept in the conversation; the renderer drops that of
  finished turns (docs/harmony.md §5.7).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from oss_mlx.server.protocol import APIError, ChatRequest, ResponsesRequest, ResponsesTool

log = logging.getLogger("oss_mlx.server")

# OpenAI's efforts; harmony has three, so "none" and "minimal" run as "low", "xhigh" and "max"
# as "high".
HARMONY_EFFORT = {"none": "low", "minimal": "low", "xhigh": "high", "max": "high"}

# Responses tools that run on OpenAI's side. Without a backend for them here they are left out
# of the prompt (and logged once), so a client that always sends them (Codex: web_search) works.
HOSTED_TOOLS = ("web_search", "web_search_preview", "web_search_preview_2025_03_11",
                "file_search", "code_interpreter", "image_generation", "computer_use_preview",
                "computer", "mcp", "tool_search", "apply_patch", "shell", "web_search_2025_08_26")


# ---- one flat history for both APIs ---------------------------------------------------------


@dataclass
class Item:
    kind: Literal["instructions", "user", "reasoning", "assistant", "tool_call", "tool_result"]
    text: str = ""
    name: str = ""      # tool_call / tool_result: the tool ("get_weather" or "namespace.tool")
    call_id: str = ""   # tool_call / tool_result
    message: Any = None  # the harmony message itself (a built-in tool's call or result)


@dataclass
class Tool:
    """A tool the model may call, as harmony declares it: `namespace.name`.

    kind: "function" (JSON arguments), "custom" (freeform text input, declared as one string
    argument with its grammar in the description), "local_shell" (a function with a command).
    """

    name: str
    description: str
    parameters: dict | None
    strict: bool = False  # arguments must match `parameters` exactly (no lenient constraint)
    kind: str = "function"
    namespace: str = "functions"
    namespace_description: str | None = None
    format: dict | None = None  # custom: {"type": "grammar", "syntax": ..., "definition": ...}

    @property
    def recipient(self) -> str:
        return f"{self.namespace}.{self.name}"


LOCAL_SHELL = Tool(
    "local_shell", "Runs a shell command on the user's machine and returns its output.",
    {"type": "object", "properties": {
        "command": {"type": "array", "items": {"type": "string"},
                    "description": "The program and its arguments, e.g. [\"ls\", \"-la\"]."},
        "working_directory": {"type": "string"},
        "timeout_ms": {"type": "integer"}},
     "required": ["command"]},
    kind="local_shell")


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


def pair_results(items: list[Item]) -> list[Item]:
    """Each tool result right after its call: harmony is call, result, call, result, so
    parallel calls sent as [call 1, call 2, result 1, result 2] become two call/result pairs."""
    out: list[Item] = []
    for it in items:
        if it.kind == "tool_result" and it.call_id:
            j = next((k for k, x in enumerate(out)
                      if x.kind == "tool_call" and x.call_id == it.call_id), None)
            if j is not None:
                j += 1
                while j < len(out) and out[j].kind == "tool_result" and out[j].call_id == it.call_id:
                    j += 1
                out.insert(j, it)
                continue
        out.append(it)
    return out


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
    return pair_results(items)


_CALLS = ("function_call", "custom_tool_call", "local_shell_call")
_OUTPUTS = ("function_call_output", "custom_tool_call_output", "local_shell_call_output")


def _call_item(it: dict, kind: str, where: str) -> Item:
    """A function_call, custom_tool_call or local_shell_call input item."""
    call_id = it.get("call_id")
    if not isinstance(call_id, str):
        raise APIError(400, f"{where}: a {kind} needs a string `call_id`", param=where)
    if kind == "local_shell_call":
        action = dict(it.get("action") or {})
        action.pop("type", None)
        return Item("tool_call", json.dumps(action), name="local_shell", call_id=call_id)
    name, namespace = it.get("name"), it.get("namespace")
    if not isinstance(name, str) or not name:
        raise APIError(400, f"{where}: a {kind} needs a string `name`", param=where)
    full = f"{namespace}.{name}" if namespace else name
    text = json.dumps(it.get("input") or "") if kind == "custom_tool_call" \
        else _arguments(it.get("arguments"))
    return Item("tool_call", text, name=full, call_id=call_id)


def responses_items(req: ResponsesRequest, unseal=lambda sealed: None,
                    builtin=None) -> list[Item]:
    """The request's instructions and input items. `unseal(encrypted_content)` gives back the
    reasoning text of a reasoning item this server sealed (None if it cannot). `builtin(item)`:
    the Items of a built-in tool's call item (code_interpreter_call, web_search_call), None
    for other kinds (server/builtin_tools.py)."""
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
            # The sealed text first: it is exactly what the model wrote.
            sealed = it.get("encrypted_content")
            text = (unseal(sealed) if isinstance(sealed, str) else None) or _text(
                it.get("content") or [], f"{where}.content")
            if text:
                items.append(Item("reasoning", text))
        elif kind in _CALLS:
            call = _call_item(it, kind, where)
            names[call.call_id] = call.name
            items.append(call)
        elif kind in _OUTPUTS:
            call_id = it.get("call_id")
            name = names.get(call_id) if isinstance(call_id, str) else None
            if not name:
                raise APIError(400, f"{where}: {kind} with call_id {call_id!r} answers no "
                                    "call in the input", param=where)
            output = it.get("output")
            text = output if isinstance(output, str) else _text(output, f"{where}.output")
            items.append(Item("tool_result", text, name=name, call_id=call_id))
        elif builtin is not None and (found := builtin(it)) is not None:
            items += found
        else:
            raise APIError(400, f"{where}: input item of type {kind!r} is not supported "
                                f"(message, reasoning, {', '.join(_CALLS + _OUTPUTS)})",
                           param=where)
    return pair_results(items)


def restore_reasoning(items: list[Item], recall) -> list[Item]:
    """Put back the chain of thought of tool calls whose reasoning the client did not return.

    Most OpenAI clients drop `reasoning_content` from the history, but harmony keeps the analysis
    of a tool-call sequence in progress (docs/harmony.md §5.7): without it the model loses its plan, and the
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


def _choice_name(tool_choice: dict) -> tuple[str | None, str | None]:
    fn = tool_choice.get("function") or {}
    return fn.get("name") or tool_choice.get("name"), tool_choice.get("namespace")


def select_tools(tools: list[Tool], tool_choice: Any) -> list[Tool]:
    """The tools to render. "none": none; "auto"/"required": all (harmony has no way to force a
    call, so "required" is only a request); a named function or custom tool: that one alone, so
    the model sees no other choice; `allowed_tools`: those; a hosted tool: as "auto"."""
    if not tools or tool_choice == "none":
        return []
    if tool_choice in (None, "auto", "required") or not isinstance(tool_choice, dict):
        return tools
    if tool_choice.get("type") == "allowed_tools":
        allowed = [_choice_name(t) for t in tool_choice.get("tools") or [] if isinstance(t, dict)]
        return [t for t in tools if any(n == t.name and ns in (None, t.namespace)
                                        for n, ns in allowed)]
    if tool_choice.get("type") in HOSTED_TOOLS:
        return tools
    name, namespace = _choice_name(tool_choice)
    chosen = [t for t in tools if t.name == name and namespace in (None, t.namespace)]
    if not chosen:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools",
                       param="tool_choice")
    return chosen


def find_tool(tools: list[Tool], recipient: str | None) -> Tool | None:
    """The tool a harmony recipient names (`functions.f`, `ns.f`, or a bare `f`)."""
    if not recipient:
        return None
    for t in tools:
        if recipient == t.recipient:
            return t
    return next((t for t in tools if t.name == recipient), None)


def _declaration(t: Tool) -> dict:
    """The harmony (TypeScript-like) declaration of a tool, as a function dict."""
    if t.kind != "custom":
        return {"name": t.name, "description": t.description, "parameters": t.parameters or None}
    text = (t.description + "\n\n" if t.description else "") + (
        "Freeform tool: send its input as one JSON string holding the raw text.")
    fmt = t.format or {}
    if fmt.get("type") == "grammar" and fmt.get("definition"):
        text += f" The text follows this {fmt.get('syntax', '')} grammar:\n{fmt['definition']}"
    return {"name": t.name, "description": text, "parameters": {"type": "string"}}


def conversation(items: list[Item], tools: list[Tool], effort: str | None):
    """The harmony conversation for `items`, built with the same helpers as the chat REPL.

    Function and custom tools go to `namespace functions`; a Responses namespace tool becomes a
    harmony namespace of its own (`namespace multi_agent_v1 { ... }`), called as `ns.tool`.
    """
    from openai_harmony import DeveloperContent, Message, Role, ToolNamespaceConfig

    from oss_mlx import harmony as hm

    instructions = "\n\n".join(it.text for it in items if it.kind == "instructions" and it.text)
    history = []
    for i, it in enumerate(items):
        if it.message is not None:
            history.append(it.message)
        elif it.kind == "user":
            history.append(hm.user_message(it.text))
        elif it.kind == "reasoning":  # the renderer drops finished turns' (§5.7)
            history.append(hm.assistant_message(it.text, "analysis"))
        elif it.kind == "assistant":
            # Text right before a tool call in the same turn is a preamble (commentary).
            nxt = next((x.kind for x in items[i + 1:] if x.kind != "reasoning"), None)
            history.append(hm.assistant_message(it.text, "commentary" if nxt == "tool_call" else "final"))
        elif it.kind == "tool_call":
            history.append(hm.tool_call_message(it.name, it.text))
        elif it.kind == "tool_result":
            history.append(hm.tool_result_message(it.name, it.text))
    conv = hm.build_conversation(
        history,
        reasoning=HARMONY_EFFORT.get(effort, effort or "medium"),
        developer_instructions=instructions or None,
        tools=[_declaration(t) for t in tools if t.namespace == "functions"],
    )
    spaces: dict[str, list[Tool]] = {}
    for t in tools:
        if t.namespace != "functions":
            spaces.setdefault(t.namespace, []).append(t)
    if spaces:
        dev = next((m for m in conv.messages if m.author.role == Role.DEVELOPER), None)
        if dev is None:
            dev = Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new())
            conv.messages.insert(1, dev)
        for name, members in spaces.items():
            dev.content[0].with_tools(ToolNamespaceConfig(
                name=name, description=members[0].namespace_description,
                tools=[hm.tool_description(_declaration(t)) for t in members]))
    return conv


def cache_key(req) -> str | None:
    """The prompt-cache hint of a request: `prompt_cache_key`, else `user`."""
    return req.prompt_cache_key or req.user or None


def check_parameters(name: str, parameters, where: str):
    """A 400 naming the tool when its `parameters` is not a valid JSON Schema."""
    from oss_mlx.server.constraints import schema_error

    why = schema_error(parameters) if parameters is not None else None
    if why:
        raise APIError(400, f"{where}: the parameters of tool {name!r} are not a valid JSON "
                            f"Schema: {why}", code="invalid_function_parameters", param=where)


def chat_tools(req: ChatRequest) -> list[Tool]:
    for i, t in enumerate(req.tools or []):
        check_parameters(t.function.name, t.function.parameters, f"tools[{i}].function.parameters")
    return [Tool(t.function.name, t.function.description or "", t.function.parameters,
                 bool(t.function.strict)) for t in req.tools or []]


_unserved: set[str] = set()


def _hosted(kind: str):
    """Log once per tool type that a hosted tool is left out, and how to serve it when this
    server can (gpt-oss's built-in tools, server/builtin_tools.py)."""
    if kind not in _unserved:
        _unserved.add(kind)
        how = ("python" if kind == "code_interpreter" else
               "browser --browse FOLDER" if kind.startswith("web_search") else None)
        log.warning("the %r tool runs on OpenAI's side and no backend for it is configured "
                    "here: leaving it out of the prompt%s", kind,
                    f" (`oss-mlx serve --builtin-tools {how}` runs it here)" if how else "")


def _responses_tool(t: ResponsesTool, namespace: str = "functions",
                    namespace_description: str | None = None, where: str = "tools") -> list[Tool]:
    if t.type in ("function", "custom"):
        if t.type == "function":
            check_parameters(t.name, t.parameters, f"{where}.parameters")
        return [Tool(t.name, t.description or "", t.parameters, bool(t.strict), kind=t.type,
                     namespace=namespace, namespace_description=namespace_description,
                     format=t.format)]
    if t.type == "namespace" and namespace == "functions":
        return [x for j, sub in enumerate(t.tools)
                for x in _responses_tool(sub, t.name, t.description, f"{where}.tools[{j}]")]
    if t.type == "local_shell":
        return [LOCAL_SHELL]
    if t.type in HOSTED_TOOLS:
        _hosted(t.type)
        return []
    raise APIError(400, f"tools: a tool of type {t.type!r} is not supported (function, "
                        f"namespace, custom, local_shell, {', '.join(HOSTED_TOOLS[:2])}, ...)",
                   param="tools")


def responses_tools(req: ResponsesRequest) -> list[Tool]:
    return [x for i, t in enumerate(req.tools or [])
            for x in _responses_tool(t, where=f"tools[{i}]")]


def custom_input(text: str) -> str:
    """A freeform call's input from what the model wrote: a JSON string is unquoted, any other
    text is taken as it is."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def shell_action(arguments: str) -> dict:
    """A local_shell_call `action` from the model's JSON arguments."""
    try:
        args = json.loads(arguments)
    except ValueError:
        args = {}
    if not isinstance(args, dict):
        args = {}
    command = args.get("command") or []
    if isinstance(command, str):
        command = ["bash", "-lc", command]
    return {"type": "exec", "command": [str(c) for c in command],
            "env": {str(k): str(v) for k, v in (args.get("env") or {}).items()},
            "timeout_ms": args.get("timeout_ms") if isinstance(args.get("timeout_ms"), int) else None,
            "user": None,
            "working_directory": args.get("working_directory")
            if isinstance(args.get("working_directory"), str) else None}
