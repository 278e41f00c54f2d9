"""The harmony encoding, offline, and rendering a conversation into prompt tokens (docs/harmony.md §5).

    enc = load_encoding(model_dir)             # from model_dir/o200k_base.tiktoken, never downloads
    tokens = render_prompt(enc, conversation)  # ... + <|start|>assistant, finished analysis dropped

Special token ids come from the vocabulary's one table (oss_mlx/checkpoint/vocab.py).
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from pathlib import Path

from openai_harmony import (
    Conversation,
    HarmonyEncoding,
    HarmonyEncodingName,
    HarmonyError,
    RenderConversationConfig,
    Role,
    load_harmony_encoding,
)

from oss_mlx.checkpoint.vocab import O200K_FILE as VOCAB_FILE
from oss_mlx.checkpoint.vocab import O200K_SHA256 as VOCAB_SHA256
from oss_mlx.checkpoint.vocab import SPECIAL_TOKENS
from oss_mlx.errors import OssMlxError

# Special token ids (docs/harmony.md §5.1); used where a set lookup is cheaper than a call.
_ID = {name: i for i, name in SPECIAL_TOKENS.items()}
START, END, MESSAGE, CHANNEL = _ID["<|start|>"], _ID["<|end|>"], _ID["<|message|>"], _ID["<|channel|>"]
RETURN, CALL, CONSTRAIN, ENDOFTEXT = (_ID["<|return|>"], _ID["<|call|>"], _ID["<|constrain|>"],
                                      _ID["<|endoftext|>"])
# The tokens that close a message (harmony's stop_tokens() plus <|end|>, docs/harmony.md §5.6).
CLOSERS = (END, RETURN, CALL)
# The assistant's stop tokens: they end a turn (<|end|> only closes a message).
STOPS = (RETURN, CALL)

_env_lock = threading.Lock()


# ---- the encoding ------------------------------------------------------------------


def load_encoding(model_dir) -> HarmonyEncoding:
    """The gpt-oss harmony encoding, read from `model_dir/o200k_base.tiktoken`; never downloads.

    openai-harmony reads the vocabulary from `$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken` (and
    checks its sha256) when that variable is set, else it downloads it. We set it to the model
    folder for the duration of the load and restore it afterwards. Raises OssMlxError when the
    file is missing or is not the genuine vocabulary.
    """
    path = Path(model_dir).expanduser().resolve() / VOCAB_FILE
    if not path.is_file():
        raise OssMlxError(
            f"no {VOCAB_FILE} in {path.parent}: re-convert the model with `oss-mlx convert`, or "
            f"copy the genuine {VOCAB_FILE} (sha256 {VOCAB_SHA256[:12]}...) into that folder"
        )
    st = path.stat()
    return _load_encoding_cached(str(path.parent), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_encoding_cached(folder: str, size: int, mtime_ns: int) -> HarmonyEncoding:
    with _env_lock:
        old = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = folder
        try:
            return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
        except HarmonyError as e:
            digest = hashlib.sha256(Path(folder, VOCAB_FILE).read_bytes()).hexdigest()
            if digest != VOCAB_SHA256:
                raise OssMlxError(
                    f"{Path(folder, VOCAB_FILE)} is not the genuine o200k vocabulary (sha256 "
                    f"{digest[:12]}..., expected {VOCAB_SHA256[:12]}...): re-convert the model or "
                    "replace the file"
                ) from None
            raise OssMlxError(f"cannot load the harmony encoding from {folder}: {e}") from None
        finally:
            if old is None:
                os.environ.pop("TIKTOKEN_ENCODINGS_BASE", None)
            else:
                os.environ["TIKTOKEN_ENCODINGS_BASE"] = old



# ---- rendering ------------------------------------------------------------------------------


def render_prompt(encoding: HarmonyEncoding, conversation) -> list[int]:
    """Prompt tokens for the next assistant turn: the conversation + `<|start|>assistant`, with
    the chain of thought of finished turns dropped (messages.drop_finished_analysis, the one
    place that rule runs for a prompt). `conversation`: a Conversation or a list of Messages."""
    from oss_mlx.harmony.messages import drop_finished_analysis

    messages = conversation.messages if isinstance(conversation, Conversation) else list(conversation)
    return render_kept(encoding, drop_finished_analysis(messages))


def render_kept(encoding: HarmonyEncoding, messages) -> list[int]:
    """`render_prompt` for messages the drop rule was already applied to: harmony's own
    auto-drop is off, so the docs rule is the only rule (docs/harmony.md §5.7)."""
    try:
        return encoding.render_conversation_for_completion(
            Conversation.from_messages(list(messages)), Role.ASSISTANT,
            RenderConversationConfig(auto_drop_analysis=False))
    except HarmonyError as e:
        raise OssMlxError(f"cannot render the conversation: {e}") from None
