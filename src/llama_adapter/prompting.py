"""Which prompt format a request uses, and the prompt it gives: one rule for the CLI, the Python API and the server.

A model answers well only in the format it was tuned on, so every entry point (`generate`, `chat`,
`inference.chat.chat`, `/v1/chat/completions`) asks `resolve_template` and renders with `render_chat` /
`render_instruction`; none decides on its own.

The rule (`resolve_template`):
1. an explicit choice wins: `chat` is the base's own chat template (an error if it has none), `raw`/`none` plain
   text, any other name an instruction template (`alpaca`, `plain`, a `.json` path);
2. else the template the adapter recorded when it was trained (an instruction template, or `chat`: the base's chat
   template; a `chat_template_digest` that differs from the base's template is warned about once);
3. else the base's chat template, if the checkpoint has one (an instruct model);
4. else plain text.

What a rendering gives (`RenderedPrompt`): the text, whether to add BOS when encoding it (a chat template writes
its own special tokens, a BOS among them where it wants one, so none is added, as `transformers` tokenizes
`apply_chat_template` output; instruction templates and plain text get BOS, as in training), and whether the answer
follows a response marker ("### Response:", "Assistant:", "[/INST]"): then the one space the model writes after the
marker is not part of the answer (`TextStream(strip_separator=...)`). Completions never drop anything.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llama_adapter.errors import TemplateError
from llama_adapter.templates import format_prompt, load_template

log = logging.getLogger("llama_adapter.prompting")

CHAT = "chat"  # the name of the base's own chat template, wherever a template is named
RAW = ("raw", "none")  # names of "no template": the text as is
TRANSCRIPT_MARKER = "Assistant:"  # the plain transcript's response marker

# a message: {"role": ..., "content": ...} (OpenAI's shape), or (role, content)
Message = Mapping[str, Any] | tuple[str, str]

_warned: set[tuple[str, str, str]] = set()


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt as text, and how to use it: add BOS when encoding? does the answer follow a response marker?"""

    text: str
    bos: bool
    strip_separator: bool
    template: str | None = None  # what rendered it: CHAT, an instruction template, or None (plain)

    def encode(self, tokenizer: Any) -> list[int]:
        return list(tokenizer.encode(self.text, bos=self.bos))


def adapter_template(model: Any, adapter: str | None) -> str | None:
    """The template an adapter recorded in its file (None: none, or no adapter)."""
    if adapter is None:
        return None
    return model.adapters[adapter].meta.get("template") or None


def resolve_template(model: Any, adapter: str | None, override: str | None = None) -> str | None:
    """The template a request uses: `CHAT`, an instruction template's name or path, or None (plain text).

    `override` is an explicit choice (`--template`; `raw`/`none` for plain text). See the module docstring.
    """
    if override:
        if override in RAW:
            return None
        if override == CHAT:
            _require_chat_template(model, "--template chat names the base's own chat template")
            return CHAT
        load_template(override)  # an unknown name or a bad file fails here, before any decoding
        return override
    recorded = adapter_template(model, adapter)
    if recorded == CHAT:
        _require_chat_template(model, f"the adapter {adapter!r} was trained with its base's chat template")
        _check_digest(model, adapter)
        return CHAT
    if recorded:
        return recorded
    return CHAT if getattr(model, "chat_template", None) is not None else None


def describe_template(model: Any, adapter: str | None) -> str | None:
    """What `resolve_template` picks without an explicit choice, for listings (never raises)."""
    try:
        return resolve_template(model, adapter)
    except TemplateError:
        return adapter_template(model, adapter)


def render_chat(
    model: Any, template: str | None, messages: Sequence[Message], add_generation_prompt: bool = True
) -> RenderedPrompt:
    """A conversation (ending with the user's turn) as the prompt of the next assistant turn, in `template`."""
    if template == CHAT:
        chat = _require_chat_template(model, "this conversation asks for the base's chat template")
        text = chat.render([_as_dict(m) for m in messages], add_generation_prompt=add_generation_prompt)
        # the answer follows a marker when the template's generation prompt ends in one ("[/INST]"); ChatML and
        # Llama-3 end theirs with a newline, after which the model writes no space
        after_marker = add_generation_prompt and bool(text) and not text[-1].isspace()
        return RenderedPrompt(text, bos=False, strip_separator=after_marker, template=CHAT)
    text = conversation_prompt([_as_pair(m) for m in messages], template)
    marker = _response_marker(template) if template else TRANSCRIPT_MARKER
    return RenderedPrompt(text, True, bool(marker.strip()) and text.endswith(marker), template)


def render_instruction(model: Any, template: str | None, instruction: str, input: str = "") -> RenderedPrompt:
    """One instruction (and optional input) as a prompt: a one-message conversation for a chat template, the
    template's text for an instruction template, the text as is (input on the next line) without one."""
    if template == CHAT:
        content = f"{instruction}\n\n{input}" if input else instruction
        return render_chat(model, CHAT, [{"role": "user", "content": content}])
    if template is None:
        return RenderedPrompt(f"{instruction}\n{input}" if input else instruction, True, False, None)
    text = format_prompt(template, instruction, input)
    marker = _response_marker(template)
    return RenderedPrompt(text, True, bool(marker.strip()) and text.endswith(marker), template)


def conversation_prompt(messages: Sequence[tuple[str, str]], template: str | None) -> str:
    """The prompt text of a conversation [(role, text), ...] ending with a user turn, without a chat template.

    With an instruction template, each user turn is formatted as an instruction (system text is prepended to the
    first instruction) and previous assistant answers follow their instruction's response marker. Without one, a
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
            parts.append(format_prompt(template, instr) if template else f"User: {text}\n{TRANSCRIPT_MARKER}")
        else:  # assistant
            parts.append((" " if not template else "") + text + ("\n\n" if template else "\n"))
    if not template and system:
        parts.insert(0, system + "\n")
    return "".join(parts)


def empty_answer_hint(model: Any, template: str | None) -> str:
    """One line for a user whose model ended its turn at once: what to try instead."""
    if template == CHAT:
        tip = "try --template alpaca or --raw, or check the base's chat template"
    elif getattr(model, "chat_template", None) is not None:
        tip = "try --template chat (the base's own chat template) or --raw"
    else:
        tip = "try another --template, or --raw"
    return f"(the model ended its turn without answering; {tip})"


def _response_marker(template: str) -> str:
    """The text an instruction template writes after the instruction: its response marker ("" for plain)."""
    return load_template(template)["without_input"].rpartition("{instruction}")[2]


def _require_chat_template(model: Any, why: str) -> Any:
    chat = getattr(model, "chat_template", None)
    if chat is None:
        where = getattr(model, "source", None) or "the base"
        raise TemplateError(
            f"{why}, but {where} has none (no chat_template in tokenizer_config.json, chat_template.jinja or "
            "chat_template.json); name an instruction template instead (--template alpaca)"
        )
    return chat


def _check_digest(model: Any, adapter: str | None) -> None:
    """Warn once when the adapter was trained with a different version of the base's chat template."""
    if adapter is None:
        return
    recorded = model.adapters[adapter].meta.get("chat_template_digest")
    actual = model.chat_template.digest
    key = (adapter, str(recorded), actual)
    if recorded and recorded != actual and key not in _warned:
        _warned.add(key)
        log.warning(
            "the adapter %r was trained with another chat template (digest %s) than this base's (%s, %s); "
            "its answers may suffer",
            adapter,
            recorded,
            actual,
            model.chat_template.origin or "the base",
        )


def _as_dict(m: Message) -> Mapping[str, Any]:
    if isinstance(m, tuple):
        return {"role": m[0], "content": m[1]}
    return m


def _as_pair(m: Message) -> tuple[str, str]:
    if isinstance(m, tuple):
        return m[0], m[1]
    content = m.get("content")
    return str(m.get("role", "")), content if isinstance(content, str) else ""
