"""The request shapes of the two OpenAI APIs `oss-mlx serve` answers (Chat Completions and
Responses), checked with pydantic, and the error object every failure is answered with.

Unknown fields are ignored (clients send many: user, metadata, ...); the fields we know are
checked strictly, so a wrong type is a 400 that names the field (in the message and `param`):
booleans, integers and numbers are never converted (`"store": 0`, `"stream": "yes"`,
`"max_tokens": 1.5` or `"2"`, `"temperature": "0.5"` are refused; an integer is a number).
Their mapping to harmony is conversation.py.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from oss_mlx.defaults import check_seed
from oss_mlx.errors import OssMlxError

# OpenAI's efforts (conversation.HARMONY_EFFORT maps them onto harmony's three).
Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class APIError(Exception):
    """An error the client caused or must hear about, rendered as an OpenAI error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class ErrorObject(BaseModel):
    """The error object of every failure (as OpenAI sends it)."""

    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """The body of every 4xx / 5xx answer, and of an error event in a stream."""

    error: ErrorObject


def _where(err) -> str:
    """A pydantic error's location as a dotted field path (`messages.0.role`; "body" if none),
    without the union-member tags pydantic puts in locations (`str`, `list[dict[...]]`)."""
    parts = [str(p) for p in err["loc"]
             if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]
    return ".".join(parts) or "body"


def validation_message(e: ValidationError) -> str:
    """The first pydantic error as one readable line: `messages.0.role: Input should be ...`.

    Errors of one field that may take several types (a union) are joined with "or".
    """
    errors = e.errors()
    first = _where(errors[0])
    same = list(dict.fromkeys(err["msg"] for err in errors if _where(err) == first))
    rest = sum(_where(err) != first for err in errors)
    more = f" ({rest} more)" if rest else ""
    return f"invalid request: {first}: {' or '.join(same)}{more}"


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}


def parse_request(model: type[BaseModel], data: Any) -> BaseModel:
    if not isinstance(data, dict):
        raise APIError(400, "invalid request: the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        field = _where(e.errors()[0])
        raise APIError(400, validation_message(e),
                       param=None if field == "body" else field) from None


# --------------------------------------------------------------------------------------------
# Request models. Unknown fields are ignored (clients send many: user, metadata, ...); fields we
# know are checked strictly, so a wrong type is a 400 that names the field.


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class FunctionDef(_Lenient):
    name: str = Field(min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict] = None
    strict: Optional[StrictBool] = None


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
    include_usage: StrictBool = False


def _seed(v):
    try:
        return check_seed(v, "seed")
    except OssMlxError as e:
        raise ValueError(str(e)) from None


class _Sampled(_Lenient):
    """Sampling fields both APIs share."""

    temperature: Optional[StrictFloat] = Field(default=None, ge=0, le=2)
    top_p: Optional[StrictFloat] = Field(default=None, gt=0, le=1)
    seed: Optional[StrictInt] = None
    # Structured outputs (Chat `response_format`, Responses `text.format`): accepted here,
    # applied by the constrained decoder when one is configured.
    response_format: Optional[dict] = None
    text: Optional[dict] = None

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, v):
        return _seed(v)


class ChatRequest(_Sampled):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    tools: Optional[list[ChatTool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict, None] = None
    reasoning_effort: Optional[Effort] = None
    max_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    stop: Union[str, list[str], None] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[StrictInt] = Field(default=None, ge=1, le=1)
    response_format: Optional[dict] = None  # text / json_object / json_schema (oss_mlx.constrain)
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
    """Any Responses tool: function, namespace (of function/custom tools), custom (freeform,
    optionally with a grammar `format`), local_shell, or a hosted one (web_search, ...)."""

    type: str
    name: Optional[str] = Field(default=None, min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict] = None
    strict: Optional[StrictBool] = None
    format: Optional[dict] = None                  # custom
    tools: Optional[list["ResponsesTool"]] = None  # namespace

    @model_validator(mode="after")
    def _named(self):
        if self.type in ("function", "custom", "namespace") and not self.name:
            raise ValueError(f"a {self.type} tool needs a name")
        if self.type == "namespace" and self.tools is None:
            raise ValueError("a namespace tool needs `tools`")
        return self


class Reasoning(_Lenient):
    effort: Optional[Effort] = None
    summary: Optional[Literal["auto", "concise", "detailed"]] = None


class ResponsesRequest(_Sampled):
    model: str
    input: Union[str, list[dict]] = Field(default_factory=list)
    instructions: Optional[str] = None
    tools: Optional[list[ResponsesTool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict, None] = None
    parallel_tool_calls: StrictBool = True
    reasoning: Optional[Reasoning] = None
    include: Optional[list[str]] = None
    max_output_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    stream: StrictBool = False
    store: StrictBool = True
    previous_response_id: Optional[str] = None
    text: Optional[dict] = None  # {"format": text / json_object / json_schema} (oss_mlx.constrain)
    metadata: Optional[dict[str, str]] = None
    prompt_cache_key: Optional[str] = None
    user: Optional[str] = None
