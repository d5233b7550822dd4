"""The text of a completion, whether it is a plain string or a conversation's messages.

Online methods hand reward functions a completion as its text, or as ``[{"role": "assistant", "content":
text}]`` when the prompt was a conversation; datasets hold either form too. Everything that reads a
completion's text (built-in rewards, the built-in tasks' rewards and answer extraction, reward models)
reads it through `completion_text`, so they agree on every form.
"""

from __future__ import annotations

from typing import Any

__all__ = ["completion_text"]


def completion_text(completion: Any) -> str:
    """The text of a completion: a string as is; a message (dict) its ``content``; a list of messages the
    content of the last one. Content given as parts (``[{"type": "text", "text": ...}, ...]``) is joined;
    missing or ``None`` content, an empty list and ``None`` are ``""``; anything else is ``str(completion)``."""
    if isinstance(completion, str):
        return completion
    if completion is None:
        return ""
    if isinstance(completion, dict):
        content = completion.get("content")
        if content is None:
            return ""
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
            return "".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
        return str(content)
    if isinstance(completion, (list, tuple)):
        return completion_text(completion[-1]) if completion else ""
    return str(completion)
