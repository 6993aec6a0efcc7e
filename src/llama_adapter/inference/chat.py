"""The Python API for conversations: `chat` / `stream_chat` answer a list of messages in the right prompt format.

    from llama_adapter.inference.chat import chat
    chat(model, [{"role": "user", "content": "What is the capital of France?"}])          # an instruct base
    chat(model, [("system", "Be brief."), ("user", "Tell me about alpacas.")], adapter="alpaca")

The format is chosen by `prompting.resolve_template` (the adapter's template, else the base's chat template, else
plain text; `template=` chooses explicitly), as on the command line and in the server, so the three agree.
`chat_prompt` (the text of a conversation in an instruction template) is `prompting.conversation_prompt`.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

from llama_adapter.inference.generate import stream_generate
from llama_adapter.model import Transformer
from llama_adapter.prompting import Message, RenderedPrompt, render_chat, resolve_template
from llama_adapter.prompting import conversation_prompt as chat_prompt

__all__ = ["chat", "chat_prompt", "prepare_chat", "stream_chat"]


def prepare_chat(
    model: Transformer, messages: Sequence[Message], adapter: str | None = None, template: str | None = None
) -> tuple[RenderedPrompt, list[int]]:
    """The rendered prompt of the next assistant turn and its token ids."""
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer")
    prompt = render_chat(model, resolve_template(model, adapter, template), messages)
    return prompt, prompt.encode(model.tokenizer)


def stream_chat(
    model: Transformer,
    messages: Sequence[Message],
    *,
    adapter: str | None = None,
    template: str | None = None,
    **sampling: Any,
) -> Generator[str, None, None]:
    """The assistant's answer to `messages` as text deltas (`sampling`: `stream_generate`'s keyword arguments)."""
    prompt, ids = prepare_chat(model, messages, adapter, template)
    for _, delta in stream_generate(model, [ids], adapter=adapter, strip_separator=prompt.strip_separator, **sampling):
        yield delta


def chat(
    model: Transformer,
    messages: Sequence[Message],
    *,
    adapter: str | None = None,
    template: str | None = None,
    **sampling: Any,
) -> str:
    """The assistant's answer to `messages` (dicts with role/content, or (role, text) pairs)."""
    return "".join(stream_chat(model, messages, adapter=adapter, template=template, **sampling))
