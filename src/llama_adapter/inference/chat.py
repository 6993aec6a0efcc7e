"""The prompt text of a conversation, for adapters trained on instruction templates."""

from __future__ import annotations

from collections.abc import Sequence

from llama_adapter.templates import format_prompt


def chat_prompt(messages: Sequence[tuple[str, str]], template: str | None) -> str:
    """The prompt text of a conversation [(role, text), ...] ending with a user turn.

    With a template, each user turn is formatted as an instruction (system text is prepended to the first
    instruction) and previous assistant answers follow their instruction's response marker. Without one, a
    plain "User:/Assistant:" transcript.
    """
    system = "\n".join(t for r, t in messages if r == "system")
    turns = [(r, t) for r, t in messages if r != "system"]
    parts: list[str] = []
    first = True
    for role, text in turns:
        if role == "user":
            instr = f"{system}\n\n{text}" if first and system else text
            first = False
            parts.append(format_prompt(template, instr) if template else f"User: {text}\nAssistant:")
        else:  # assistant
            parts.append((" " if not template else "") + text + ("\n\n" if template else "\n"))
    if not template and system:
        parts.insert(0, system + "\n")
    return "".join(parts)
