"""The built-in tools of one conversation, and the system message that declares them.

    box = Toolbox(python=PythonSession(), browser=Browser(LocalFolder("~/notes")))
    conv = box.declare(conversation)      # the harmony system message gains `# Tools`
    text, error = box.call(message)       # run the model's call (python, browser.*)
    box.close()                           # ends the python worker, removes its folder

The tools' descriptions start from openai-harmony's own (`SystemContent.with_python_tool()` /
`.with_browser_tool()`, the text the model was trained on), with the sentences that would be
false here made true: the python timeout is the session's, the working folder replaces the
reference's data drive, and internet access is "disabled" instead of "UNKNOWN"; the browser's
`sources=` names the backend (docs/harmony.md §5.10-5.11).
"""

from __future__ import annotations

from dataclasses import dataclass

from openai_harmony import Conversation, Message, Role, SystemContent, ToolNamespaceConfig

from oss_mlx.tools.browser import Browser
from oss_mlx.tools.python_tool import PythonSession

# openai-harmony's own sentences, quoted exactly (a replacement must match them): the drive is
# the reference's container path, and "session" is its word, kept in ours, for the python
# session of one conversation, the text the model was trained on.
_DRIVE = "The drive at '/mnt/data' can be used to save and persist user files."
_OUR_DRIVE = ("The current working directory can be used to save files; it is deleted when "
              "the conversation ends.")
_NET = "Internet access for this session is UNKNOWN. Depends on the cluster."
_OUR_NET = "Internet access for this session is disabled."


def python_config(session: PythonSession) -> ToolNamespaceConfig:
    config = ToolNamespaceConfig.python()
    text = config.description
    text = text.replace("120.0 seconds", f"{float(session.limits.wall_s):.1f} seconds")
    config.description = text.replace(_DRIVE, _OUR_DRIVE).replace(_NET, _OUR_NET)
    return config


def browser_config(browser: Browser) -> ToolNamespaceConfig:
    config = ToolNamespaceConfig.browser()
    source = getattr(browser.backend, "source", "web")
    config.description = config.description.replace(
        "sources=web (default: web)", f"sources={source} (default: {source})")
    return config


def call_name(recipient: str | None) -> str | None:
    """The built-in tool a recipient names ("python", "browser.search", ...), else None."""
    if recipient == "python" or (recipient or "").startswith("python."):
        return "python"
    if (recipient or "").startswith("browser."):
        return recipient
    return None


@dataclass
class Toolbox:
    python: PythonSession | None = None
    browser: Browser | None = None

    def system_content(self, content: SystemContent | None = None) -> SystemContent:
        """`content` (a copy; default SystemContent.new()) with these tools declared."""
        content = content.model_copy(deep=True) if content is not None else SystemContent.new()
        if self.browser is not None:
            content = content.with_tools(browser_config(self.browser))
        if self.python is not None:
            content = content.with_tools(python_config(self.python))
        return content

    def declare(self, conversation) -> Conversation:
        """The conversation with its system message declaring these tools (one is added
        when it has none)."""
        messages = list(conversation.messages if isinstance(conversation, Conversation)
                        else conversation)
        if messages and messages[0].author.role == Role.SYSTEM:
            old = messages[0].content[0]
            content = self.system_content(old if isinstance(old, SystemContent) else None)
            messages[0] = Message.from_role_and_content(Role.SYSTEM, content)
        else:
            messages.insert(0, Message.from_role_and_content(Role.SYSTEM, self.system_content()))
        return Conversation.from_messages(messages)

    def call(self, message: Message, cancel=None) -> tuple[str, str | None]:
        """Run the model's call to a built-in tool: (the tool message's text, an error kind
        or None). Never raises for what the call does."""
        from oss_mlx.harmony import message_text

        name = call_name(message.recipient)
        text = message_text(message)
        if name == "python":
            if self.python is None:
                return "[ERROR] The python tool is not enabled in this conversation.", "unavailable"
            result = self.python.run(text, cancel)
            return result.text, result.error
        if name is not None:
            if self.browser is None:
                return "[ERROR] The browser tool is not enabled in this conversation.", "unavailable"
            out = self.browser.call(name.split(".", 1)[1], text)
            return out, None
        return f"[ERROR] Unknown tool: {message.recipient}", "unknown"

    def close(self):
        if self.python is not None:
            self.python.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
