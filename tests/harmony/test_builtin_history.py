"""A finished turn that used a built-in tool: its calls and their results are dropped from the
next prompt together (docs/harmony.md §5.7), as openai-harmony's renderer drops them; never a
tool result without its call."""

from __future__ import annotations

from openai_harmony import Conversation, Message, Role

from oss_mlx.harmony import (assistant_message, build_conversation, render_prompt,
                             tool_result_message, user_message)


def python_call(code):
    return (Message.from_role_and_content(Role.ASSISTANT, code).with_channel("analysis")
            .with_recipient("python").with_content_type("code"))


def test_built_in_calls_and_results_go_with_the_analysis(encoding):
    turn = [assistant_message("Let me compute.", "analysis"), python_call("print(6 * 7)"),
            tool_result_message("python", "42\n", channel="analysis"),
            assistant_message("It is 42.")]
    conv = build_conversation([user_message("6*7?"), *turn, user_message("Sure?")], date="")
    # The oracle: openai-harmony's own rendering, its dropping on (the last message is from the
    # user, so its rule and ours agree on this conversation).
    oracle = encoding.render_conversation_for_completion(conv, Role.ASSISTANT)
    assert render_prompt(encoding, conv) == oracle
    assert "42\n" not in encoding.decode(oracle).split("It is 42.")[0]

    # While the turn is in progress (no final yet), the call and its result stay.
    live = build_conversation([user_message("6*7?"), *turn[:3]], date="")
    text = encoding.decode(render_prompt(encoding, Conversation.from_messages(live.messages)))
    assert "to=python" in text and "<|start|>python to=assistant<|channel|>analysis" in text
