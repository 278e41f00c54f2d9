"""The chat's conversation: settings, turns, the harmony conversation given to the engine each
turn, and the file format of /save and /load ("format": "oss-mlx-chat", version 1).

History follows harmony's rule (docs/harmony.md §5.7): once a turn has ended with a `final`
answer its analysis is dropped from what the model sees next turn (the renderer applies it).
The full messages, analysis included, are kept for /save.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from oss_mlx.defaults import EFFORTS
from oss_mlx.errors import OssMlxError

DEFAULT_MAX_TOKENS = 16384  # room for high effort; mlx_lm.chat's 256 cuts reasoning short
INTERRUPTED_NOTE = "[interrupted by the user]"


@dataclass
class Settings:
    reasoning: str = "medium"
    system: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    hide_reasoning: bool = False


@dataclass
class Exchange:
    user: str
    messages: list = field(default_factory=list)  # openai_harmony.Message, as the model wrote them
    interrupted: bool = False


class Session:
    """Settings plus history; builds the harmony conversation the engine is given."""

    def __init__(self, settings: Settings, date: str | None = None):
        self.settings = settings
        self.turns: list[Exchange] = []
        # Fixed for the session so the system message (and so the prompt cache) stays the same.
        self.date = date or datetime.date.today().isoformat()

    def conversation(self, pending: str | None = None):
        """The conversation for the next completion, ending with the `pending` user message."""
        from oss_mlx.harmony import build_conversation, user_message

        msgs = []
        for turn in self.turns:
            msgs.append(user_message(turn.user))
            msgs.extend(history_messages(turn))
        if pending is not None:
            msgs.append(user_message(pending))
        return build_conversation(msgs, reasoning=self.settings.reasoning,
                                  developer_instructions=self.settings.system, date=self.date)

    # /save and /load -------------------------------------------------------------------------

    def to_json(self, model: str) -> dict:
        messages = []
        for turn in self.turns:
            messages.append({"role": "user", "content": turn.user})
            for m in turn.messages:
                messages.append(message_to_json(m))
            if turn.interrupted:
                # Marks the turn: the flag sits on its last message (or a bare assistant stub).
                if turn.messages:
                    messages[-1]["interrupted"] = True
                else:
                    messages.append({"role": "assistant", "channel": "final", "content": "",
                                     "interrupted": True})
        return {"format": "oss-mlx-chat", "version": 1, "model": model,
                "date": self.date, "settings": asdict(self.settings), "messages": messages}

    def save(self, path: str | Path, model: str) -> Path:
        from oss_mlx.checkpoint.files import atomic_write

        path = Path(path).expanduser()
        data = json.dumps(self.to_json(model), indent=2, ensure_ascii=False) + "\n"
        try:
            atomic_write(path, data)  # never a half-written file
        except OSError as e:
            raise OssMlxError(f"cannot write {path}: {e.strerror or e}") from None
        return path

    def load(self, path: str | Path) -> None:
        """Replace settings and history with a file written by /save (all or nothing)."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise OssMlxError(f"no such file: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise OssMlxError(f"cannot read {path}: {e}") from None
        except json.JSONDecodeError as e:
            raise OssMlxError(f"{path} is not JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(data, dict) or data.get("format") != "oss-mlx-chat":
            raise OssMlxError(f"{path} is not a conversation saved by oss-mlx chat")
        settings = Settings(**asdict(self.settings))
        known = {f.name for f in fields(Settings)}
        raw = data.get("settings") or {}
        if not isinstance(raw, dict):
            raise OssMlxError(f"{path}: 'settings' must be an object")
        for key, value in raw.items():
            if key in known:
                setattr(settings, key, value)
        if settings.reasoning not in EFFORTS:
            raise OssMlxError(f"{path}: reasoning must be one of {', '.join(EFFORTS)}")
        turns = turns_from_json(data.get("messages"), path)
        self.settings.__dict__.update(settings.__dict__)  # keep the object others hold
        self.turns = turns
        self.date = data.get("date") or self.date


def history_messages(turn: Exchange) -> list:
    """What the model sees of a past turn (harmony.build_conversation then drops old analysis)."""
    from oss_mlx.harmony import assistant_message, message_text

    if not turn.interrupted:
        return list(turn.messages)
    # The unfinished reasoning is dropped (else it resumes next turn); the partial answer stays,
    # marked so the model knows it was cut.
    final = next((m for m in reversed(turn.messages) if m.channel == "final"), None)
    text = message_text(final) if final is not None else ""
    return [assistant_message(f"{text}\n\n{INTERRUPTED_NOTE}" if text else INTERRUPTED_NOTE)]


def message_to_json(m) -> dict:
    from oss_mlx.harmony import message_text

    out = {"role": m.author.role.value}
    if m.author.name:
        out["name"] = m.author.name
    for key in ("channel", "recipient", "content_type"):
        if getattr(m, key) is not None:
            out[key] = getattr(m, key)
    out["content"] = message_text(m)
    return out


def turns_from_json(messages, path) -> list[Exchange]:
    from openai_harmony import Message

    if not isinstance(messages, list):
        raise OssMlxError(f"{path}: 'messages' must be a list")
    turns: list[Exchange] = []
    for i, raw in enumerate(messages):
        if not isinstance(raw, dict) or not isinstance(raw.get("content"), str):
            raise OssMlxError(f"{path}: message {i} needs a role and a text content")
        role = raw.get("role")
        if role == "user":
            turns.append(Exchange(user=raw["content"]))
            continue
        if role not in ("assistant", "tool"):
            raise OssMlxError(f"{path}: message {i} has an unexpected role {role!r}")
        if not turns:
            raise OssMlxError(f"{path}: the messages must start with a user message")
        if raw.get("interrupted"):
            turns[-1].interrupted = True
        if role == "assistant" and raw.get("interrupted") and not raw["content"]:
            continue  # the stub to_json writes for an answer cut before any text
        try:
            turns[-1].messages.append(Message.from_dict(
                {k: v for k, v in raw.items() if k != "interrupted"}))
        except Exception as e:  # noqa: BLE001 - pydantic/harmony errors: one line for the user
            raise OssMlxError(f"{path}: message {i} is not a harmony message ({e})") from None
    return turns


