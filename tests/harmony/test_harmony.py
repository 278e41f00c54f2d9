"""Harmony rendering: our builders against the exact text of docs/harmony.md §5 and against
openai-harmony's own rendering of hand-built conversations, token for token."""

from __future__ import annotations

import os

import pytest
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

from oss_mlx.errors import OssMlxError
from oss_mlx.harmony import (
    assistant_message,
    build_conversation,
    drop_finished_analysis,
    load_encoding,
    render_prompt,
    tool_call_message,
    tool_result_message,
    user_message,
)
from support.scripted import vocab_dir


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return load_encoding(vocab_dir(tmp_path_factory.mktemp("vocab")))


def text(enc, tokens):
    return enc.decode(tokens)


def harmony_render(enc, messages):
    """openai-harmony's own rendering, default config (its auto_drop_analysis=True)."""
    return enc.render_conversation_for_completion(Conversation.from_messages(messages), Role.ASSISTANT)


def sys_msg(effort=ReasoningEffort.MEDIUM, date=None, identity=None):
    c = SystemContent.new().with_reasoning_effort(effort)
    if date:
        c = c.with_conversation_start_date(date)
    if identity:
        c = c.with_model_identity(identity)
    return Message.from_role_and_content(Role.SYSTEM, c)


# docs/harmony.md §5.3, verbatim (openai-harmony's test-data/test_simple_convo.txt).
SPEC_5_3 = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\n\nReasoning: medium\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message."
    "<|end|><|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant"
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Gets the current weather",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
                "days": {"type": "integer"},
            },
            "required": ["location"],
        },
    },
}


def test_spec_5_3_example_exact_text(enc):
    tokens = render_prompt(enc, build_conversation([user_message("What is 2 + 2?")], date=""))
    assert text(enc, tokens) == SPEC_5_3
    # ends with <|start|>assistant (docs/harmony.md §5.2: 200006, 173781); the model continues with <|channel|>
    assert tokens[-2:] == [200006, 173781]


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_system_with_each_effort_matches_openai_harmony(enc, effort):
    ours = render_prompt(
        enc, build_conversation([user_message("Hi")], reasoning=effort, date="2025-06-28")
    )
    ref = harmony_render(
        enc, [sys_msg(ReasoningEffort(effort.capitalize()), "2025-06-28"), user_message("Hi")]
    )
    assert ours == ref
    t = text(enc, ours)
    assert f"\n\nReasoning: {effort}\n\n" in t
    assert "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\n" in t


def test_system_identity_override(enc):
    ours = render_prompt(enc, build_conversation([user_message("Hi")], system="You are a pirate.", date=""))
    assert ours == harmony_render(enc, [sys_msg(identity="You are a pirate."), user_message("Hi")])
    assert text(enc, ours).startswith("<|start|>system<|message|>You are a pirate.\nKnowledge cutoff")


def test_unknown_effort_is_a_clear_error():
    with pytest.raises(OssMlxError, match="low, medium or high"):
        build_conversation([user_message("Hi")], reasoning="max")


def test_developer_instructions_and_function_tools(enc):
    ours = render_prompt(
        enc,
        build_conversation(
            [user_message("Weather in Paris?")], reasoning="low", date="",
            developer_instructions="Be brief.", tools=[WEATHER, {"name": "now", "description": "Current time"}],
        ),
    )
    fn = WEATHER["function"]
    dev = DeveloperContent.new().with_instructions("Be brief.").with_function_tools([
        ToolDescription.new(fn["name"], fn["description"], parameters=fn["parameters"]),
        ToolDescription.new("now", "Current time"),
    ])
    ref = harmony_render(enc, [
        sys_msg(ReasoningEffort.LOW),
        Message.from_role_and_content(Role.DEVELOPER, dev),
        user_message("Weather in Paris?"),
    ])
    assert ours == ref
    t = text(enc, ours)
    # docs/harmony.md §5.3 item 4: the functions line appears because a developer message defines functions
    assert "Channel must be included for every message.\nCalls to these tools must go to the " \
           "commentary channel: 'functions'.<|end|>" in t
    # docs/harmony.md §5.4, written out by hand from its rules (integer -> number, enum, optional + default)
    assert (
        "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n# Tools\n\n## functions\n\n"
        "namespace functions {\n\n// Gets the current weather\ntype get_weather = (_: {\n"
        "// The city\nlocation: string,\nunit?: \"celsius\" | \"fahrenheit\", // default: celsius\n"
        "days?: number,\n}) => any;\n\n// Current time\ntype now = () => any;\n\n"
        "} // namespace functions<|end|>"
    ) in t


def test_no_tools_no_functions_line(enc):
    t = text(enc, render_prompt(enc, build_conversation([user_message("x")], developer_instructions="Hi", date="")))
    assert "'functions'" not in t and "# Tools" not in t
    assert "<|start|>developer<|message|># Instructions\n\nHi<|end|>" in t


def test_multi_turn_drops_finished_analysis(enc):
    history = [
        user_message("What is 2 + 2?"),
        assistant_message("User asks simple math.", "analysis"),
        assistant_message("4"),
        user_message("And 3 + 3?"),
    ]
    ours = render_prompt(enc, build_conversation(history, date=""))
    # two turns: harmony's own auto-drop and the docs rule agree
    assert ours == harmony_render(enc, [sys_msg()] + history)
    t = text(enc, ours)
    assert "User asks simple math." not in t
    assert t.endswith(
        "<|start|>user<|message|>What is 2 + 2?<|end|>"
        "<|start|>assistant<|channel|>final<|message|>4<|end|>"
        "<|start|>user<|message|>And 3 + 3?<|end|><|start|>assistant"
    )


def test_three_turns_drop_all_finished_analysis_unlike_harmony_default(enc):
    history = [
        user_message("q1"), assistant_message("think1", "analysis"), assistant_message("a1"),
        user_message("q2"), assistant_message("think2", "analysis"), assistant_message("a2"),
        user_message("q3"),
    ]
    ours = render_prompt(enc, build_conversation(history, date=""))
    t = text(enc, ours)
    assert "think1" not in t and "think2" not in t
    # harmony's renderer keeps turn-2 chain of thought (docs/harmony.md §5.7); the docs rule does not
    assert "think2" in text(enc, harmony_render(enc, [sys_msg()] + history))
    kept = [m for m in history if m.channel != "analysis"]
    assert ours == harmony_render(enc, [sys_msg()] + kept)


def test_tool_call_and_result(enc):
    history = [
        user_message("Weather in San Francisco?"),
        assistant_message("Need to call get_weather.", "analysis"),
        tool_call_message("get_weather", '{"location":"San Francisco"}'),
        tool_result_message("get_weather", '{"sunny": true, "temperature": 20}'),
    ]
    ours = render_prompt(enc, build_conversation(history, tools=[WEATHER], date=""))
    ref_history = [
        history[0],
        Message.from_role_and_content(Role.ASSISTANT, "Need to call get_weather.").with_channel("analysis"),
        Message.from_role_and_content(Role.ASSISTANT, '{"location":"San Francisco"}')
        .with_channel("commentary").with_recipient("functions.get_weather")
        .with_content_type("<|constrain|>json"),
        Message.from_author_and_content(
            Author.new(Role.TOOL, "functions.get_weather"), '{"sunny": true, "temperature": 20}'
        ).with_recipient("assistant").with_channel("commentary"),
    ]
    fn = WEATHER["function"]
    dev = DeveloperContent.new().with_function_tools(
        [ToolDescription.new(fn["name"], fn["description"], parameters=fn["parameters"])]
    )
    assert ours == harmony_render(
        enc, [sys_msg(), Message.from_role_and_content(Role.DEVELOPER, dev)] + ref_history
    )
    t = text(enc, ours)
    # in-progress tool sequence: the analysis is kept (docs rule, docs/harmony.md §5.7)
    assert "<|start|>assistant<|channel|>analysis<|message|>Need to call get_weather.<|end|>" in t
    # docs/harmony.md §5.5: the call as the renderer writes it back, ended by <|call|>, and the result
    assert (
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
        "<|message|>{\"location\":\"San Francisco\"}<|call|>"
    ) in t
    assert (
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
        "{\"sunny\": true, \"temperature\": 20}<|end|><|start|>assistant"
    ) in t


def test_tool_sequence_then_final_drops_its_analysis(enc):
    history = [
        user_message("q"), assistant_message("plan", "analysis"),
        tool_call_message("functions.f", {"a": 1}), tool_result_message("functions.f", {"ok": True}),
        assistant_message("more thought", "analysis"), assistant_message("done"), user_message("next"),
    ]
    kept = drop_finished_analysis(history)
    assert [m.channel for m in kept] == [None, "commentary", "commentary", "final", None]
    t = text(enc, render_prompt(enc, build_conversation(history, date="")))
    assert "plan" not in t and "more thought" not in t and '{"a": 1}<|call|>' in t


def test_history_survives_to_dict_from_dict(enc):
    history = [
        user_message("q"), tool_call_message("get_weather", {"location": "Paris"}),
        tool_result_message("get_weather", {"t": 20}), assistant_message("20 degrees"),
    ]
    again = [Message.from_dict(m.to_dict()) for m in history]
    conv = build_conversation(history, tools=[WEATHER], date="2025-01-01")
    conv2 = build_conversation(again, tools=[WEATHER], date="2025-01-01")
    assert render_prompt(enc, conv) == render_prompt(enc, conv2)
    assert render_prompt(enc, Conversation.from_json(conv.to_json())) == render_prompt(enc, conv)


def test_system_and_developer_in_history_are_replaced(enc):
    history = [sys_msg(ReasoningEffort.HIGH), user_message("hi")]
    t = text(enc, render_prompt(enc, build_conversation(history, reasoning="low", date="")))
    assert t.count("<|start|>system") == 1 and "Reasoning: low" in t


def test_today_is_the_default_date(enc):
    import datetime

    t = text(enc, render_prompt(enc, build_conversation([user_message("hi")])))
    assert f"Current date: {datetime.date.today().isoformat()}\n" in t


# ---- offline vocabulary ----


def test_missing_vocab_says_how_to_fix(tmp_path):
    with pytest.raises(OssMlxError, match="o200k_base.tiktoken.*oss-mlx convert"):
        load_encoding(tmp_path)


def test_wrong_vocab_is_rejected_and_env_restored(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", "/somewhere/else")
    (tmp_path / "o200k_base.tiktoken").write_text("aGVsbG8= 0\n")
    with pytest.raises(OssMlxError, match="not the genuine"):
        load_encoding(tmp_path)
    assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == "/somewhere/else"


def test_vocab_loads_without_env_left_behind(tmp_path, monkeypatch):
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    enc = load_encoding(vocab_dir(tmp_path))
    assert "TIKTOKEN_ENCODINGS_BASE" not in os.environ
    assert sorted(enc.stop_tokens_for_assistant_actions()) == [200002, 200012]
    # docs/harmony.md §5.1 plain-text ids
    assert enc.encode("assistant") == [173781] and enc.encode("analysis") == [35644]


def test_ongoing_tool_call_keeps_analysis_upstream_golden(enc):
    """openai-harmony's test-data/test_does_not_drop_if_ongoing_analysis.txt (openai/harmony @ f573ab5).
    That snapshot predates the renderer writing the recipient in the role header (docs/traps.md §6.5;
    5; both parse the same), so its one tool-call header is rewritten to 0.0.8's order."""
    golden = (
        "<|start|>user<|message|>What is the weather in SF?<|end|><|start|>assistant<|channel|>"
        "analysis<|message|>User asks: “What is the weather in SF?” We need to use lookup_weather "
        "tool.<|end|><|start|>assistant<|channel|>commentary to=functions.lookup_weather "
        "<|constrain|>json<|message|>{\"location\": \"San Francisco\"}<|call|><|start|>functions."
        "lookup_weather<|message|>{\"temperature\": 20, \"description\": \"sunny\"}<|end|>"
        "<|start|>assistant"
    ).replace(
        "<|start|>assistant<|channel|>commentary to=functions.lookup_weather <|constrain|>json",
        "<|start|>assistant to=functions.lookup_weather<|channel|>commentary <|constrain|>json",
    )
    history = [
        user_message("What is the weather in SF?"),
        assistant_message(
            "User asks: “What is the weather in SF?” We need to use lookup_weather tool.", "analysis"
        ),
        tool_call_message("functions.lookup_weather", '{"location": "San Francisco"}'),
        Message.from_author_and_content(
            Author.new(Role.TOOL, "functions.lookup_weather"),
            '{"temperature": 20, "description": "sunny"}',
        ),
    ]
    assert text(enc, render_prompt(enc, history)) == golden


# ---- each rule once -----------------------------------------------------------------------


def test_one_effort_list_one_set_of_special_ids(enc):
    """The efforts are harmony's ReasoningEffort values; the special-token ids are what
    openai-harmony's own encoding gives for their names."""
    from oss_mlx import harmony as hm
    from oss_mlx.defaults import EFFORTS
    from oss_mlx.checkpoint.vocab import SPECIAL_TOKENS

    assert EFFORTS == tuple(e.value.lower() for e in ReasoningEffort) == hm.EFFORTS
    for tok, name in SPECIAL_TOKENS.items():
        if name != "<|endofprompt|>":  # the HF tokenizer's name for 200018; harmony has none
            assert enc.encode(name, allowed_special="all") == [tok], name
    assert (hm.START, hm.END, hm.MESSAGE, hm.CHANNEL, hm.RETURN, hm.CALL, hm.CONSTRAIN,
            hm.ENDOFTEXT) == tuple(enc.encode(t, allowed_special="all")[0] for t in (
                "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>",
                "<|constrain|>", "<|endoftext|>"))


def test_which_recipient_is_a_tool_call():
    """docs/harmony.md §5.2: `to=` is left out for no recipient and for "all"; a tool result goes `to=assistant`."""
    from oss_mlx.harmony import function_name, is_tool_call

    assert [is_tool_call(r) for r in (None, "", "all", "assistant", "user")] == [False] * 5
    assert all(is_tool_call(r) for r in ("functions.get_weather", "python", "browser.search"))
    assert function_name("functions.get_weather") == "get_weather"
    assert function_name("python") is None and function_name(None) is None


def test_openai_requests_drop_reasoning_by_harmonys_rule(enc):
    """The server's request mapping uses harmony's one drop rule: a tool-call sequence that a
    new user message interrupts (no final yet) keeps its reasoning, which the server's own copy
    (drop everything before the last user message) used to lose."""
    from oss_mlx.server import conversation as api

    items = [api.Item("user", "Weather?"), api.Item("reasoning", "Call the tool."),
             api.Item("tool_call", '{"city": "Paris"}', name="get_weather"),
             api.Item("tool_result", '{"sunny": true}', name="get_weather"),
             api.Item("user", "And in Rome?")]
    tools = [api.Tool("get_weather", "", {"type": "object"})]
    got = api.conversation(items, tools, "low")
    want = build_conversation([
        user_message("Weather?"), assistant_message("Call the tool.", "analysis"),
        tool_call_message("functions.get_weather", '{"city": "Paris"}'),
        tool_result_message("functions.get_weather", '{"sunny": true}'),
        user_message("And in Rome?")], reasoning="low",
        tools=[{"name": "get_weather", "description": "", "parameters": {"type": "object"}}])
    assert text(enc, render_prompt(enc, got)) == text(enc, render_prompt(enc, want))
    assert "Call the tool." in text(enc, render_prompt(enc, got))
    # Once the turn ends with a final answer, the reasoning goes, as in harmony's own renderer.
    done = items + [api.Item("assistant", "Sunny in Paris; Rome next.")]
    assert "Call the tool." not in text(enc, render_prompt(enc, api.conversation(done, tools, "low")))
