"""The harmony format gpt-oss speaks (docs/harmony.md §5), through openai-harmony.

    from oss_mlx.harmony import load_encoding, build_conversation, user_message

encoding.py: the offline encoding, special token ids, rendering a prompt; messages.py: building
messages and the rules about them; parser.py: the streaming parser of one assistant turn;
history.py: past turns rendered as the tokens the model sampled; constrain.py: grammar-
constrained messages (structured outputs, tool arguments).
"""

from openai_harmony import Author, Conversation, Message, Role

from oss_mlx.defaults import EFFORTS
from oss_mlx.harmony.encoding import (
    CALL,
    CHANNEL,
    CLOSERS,
    CONSTRAIN,
    END,
    ENDOFTEXT,
    MESSAGE,
    RETURN,
    START,
    STOPS,
    load_encoding,
    render_prompt,
)
from oss_mlx.harmony.messages import (
    assistant_message,
    build_conversation,
    developer_message,
    drop_finished_analysis,
    function_name,
    is_tool_call,
    message_text,
    section_of,
    system_message,
    tool_call_message,
    tool_description,
    tool_result_message,
    user_message,
)

__all__ = [
    "load_encoding", "render_prompt", "build_conversation", "system_message",
    "developer_message", "user_message", "assistant_message", "tool_call_message",
    "tool_result_message", "tool_description", "message_text", "drop_finished_analysis",
    "is_tool_call", "function_name", "section_of", "EFFORTS",
    "START", "END", "MESSAGE", "CHANNEL", "RETURN", "CALL", "CONSTRAIN", "ENDOFTEXT",
    "CLOSERS", "STOPS", "Conversation", "Message", "Role", "Author",
]
