"""What the tests of the built-in tools in chat, generate and serve share: the scripted turns
(python twice, then an answer; the browser: search, open, find, a cited answer), the test
documents, and the oracle for the prompts: openai-harmony's own rendering.

    engine = RecordingEngine(ScriptedModel(*PYTHON_TURN, encoding=enc), enc)
    ... run chat / generate on it ...
    check_tool_prompts(enc, engine.rendered, engine.model.prompts, PYTHON_TURN, PYTHON_RESULTS,
                       first=oracle_first_prompt)
"""

from __future__ import annotations

from pathlib import Path

from openai_harmony import Author, Conversation, Message, Role

from oss_mlx.engine import Engine

START = 200006  # <|start|>

# The model computes a value, then uses the variable the first call set: the session is stateful.
PYTHON_TURN = [
    "<|channel|>analysis<|message|>Let me compute.<|end|>"
    "<|start|>assistant<|channel|>analysis to=python code<|message|>x = 6 * 7\nprint(x)<|call|>",
    "<|channel|>analysis to=python code<|message|>print(x + 1)<|call|>",
    "<|channel|>final<|message|>It is 43.<|return|>",
]
PYTHON_RESULTS = [("python", "42\n"), ("python", "43\n")]

TRIP = """# Trip to Lisbon

We stayed at the Hotel Avenida near the river. The tram 28 goes up to the castle.

## Food

Pastel de nata at Manteigaria was the best. Dinner at a small tasca in Alfama.
"""
GARDEN = "# Garden\n\nPlant tomatoes in May, after the frost. Water them daily.\n"

# Search the notes, open the first result, find a word in it, answer citing the find page.
BROWSE_TURN = [
    '<|channel|>analysis to=browser.search code<|message|>{"query": "tram castle"}<|call|>',
    '<|channel|>analysis to=browser.open code<|message|>{"id": 0}<|call|>',
    '<|channel|>analysis to=browser.find code<|message|>{"pattern": "tram"}<|call|>',
    "<|channel|>final<|message|>Take the tram 28 【2†L0-L1】.<|return|>",
]


def write_notes(folder: Path) -> Path:
    """A folder of test documents: two notes, and one outside it that must never be found."""
    notes = folder / "notes"
    notes.mkdir(parents=True, exist_ok=True)
    (notes / "trip.md").write_text(TRIP)
    (notes / "garden.md").write_text(GARDEN)
    (folder / "secret.md").write_text("# Secret\nThe tram password.\n")
    return notes


class RecordingEngine(Engine):
    """The real engine; remembers the whole prompt of each request (what it renders)."""

    def stream(self, conversation, params=None, cancel=None, key=None, progress=None):
        if not (isinstance(conversation, list) and conversation
                and isinstance(conversation[0], int)):
            conversation = self.render(conversation)
        self.rendered = getattr(self, "rendered", []) + [list(conversation)]
        return super().stream(conversation, params, cancel, key, progress)


def tool_tokens(enc, name: str, text: str, channel: str = "analysis") -> list[int]:
    """openai-harmony's rendering of a tool's message, then the next assistant turn's start."""
    msg = (Message.from_author_and_content(Author.new(Role.TOOL, name), text)
           .with_recipient("assistant").with_channel(channel))
    return enc.render(msg) + [START] + enc.encode("assistant", allowed_special="all")


def first_prompt(enc, system_content, user: str) -> list[int]:
    """openai-harmony's rendering of system + user, ready for the assistant."""
    conv = Conversation.from_messages([Message.from_role_and_content(Role.SYSTEM, system_content),
                                       Message.from_role_and_content(Role.USER, user)])
    return enc.render_conversation_for_completion(conv, Role.ASSISTANT)


def check_tool_prompts(enc, rendered, prefilled, turn, results, first=None):
    """Each prompt after a tool call is the previous prompt, the tokens the model sampled, and
    the tool's message as openai-harmony renders it, token by token; what the model was
    actually given (prefilled: only the suffix after the prompt cache) ends that prompt."""
    assert len(rendered) == len(turn), f"{len(rendered)} requests for {len(turn)} replies"
    if first is not None:
        assert rendered[0] == first
    for k, (name, output) in enumerate(results, start=1):
        sampled = enc.encode(turn[k - 1], allowed_special="all")
        expected = rendered[k - 1] + sampled + tool_tokens(enc, name, output)
        assert rendered[k] == expected, f"prompt {k} differs from harmony's rendering"
        assert expected[-len(prefilled[k]):] == prefilled[k]
