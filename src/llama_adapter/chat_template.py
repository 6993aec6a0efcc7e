"""A base model's own chat template, read and rendered the way Hugging Face `transformers` does.

Instruct checkpoints carry a jinja2 template that turns a conversation into the exact text the model was tuned on
(`<|im_start|>user ... <|im_end|>`, `[INST] ... [/INST]`, `<|start_header_id|>...<|eot_id|>`). An instruct model
prompted any other way often answers nothing or nonsense, so the text must be what `transformers`'
`apply_chat_template` gives for the same files (the tests compare string for string).

Where it is found (as `transformers` looks): `chat_template.jinja` (plus `additional_chat_templates/*.jinja`, named
by their stems) takes priority; else `chat_template.json` (processor checkpoints); else `tokenizer_config.json`'s
`chat_template`: a string, or a list of `{name, template}` of which `default` is used unless another is named.

How it is rendered: the same environment options (`trim_blocks`, `lstrip_blocks`, the loop-controls extension, a
`{% generation %}` block that renders its body), the same helpers (`raise_exception`, `strftime_now`, a `tojson`
that does not escape HTML, `dict` and a `namespace` that refuses underscore names), the same variables (the
messages with None-valued keys dropped, `tools` and `documents` None, `add_generation_prompt`, the tokenizer's
special tokens as strings). A template shipped with a downloaded checkpoint is untrusted input, so it runs in
jinja2's immutable sandbox; unlike `transformers`, reading an unsafe attribute (`''.__class__`, `list.append`)
fails at once instead of rendering as empty text. The rendered text already holds every special token the template
wants (a BOS included, where it emits one): encode it without adding any.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from llama_adapter.errors import TemplateError

log = logging.getLogger("llama_adapter.chat_template")

Message = Mapping[str, Any]  # {"role": "system" | "user" | "assistant", "content": str, ...}
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # what templates read, under its older names


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # the jinja2 text
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... as strings
    name: str = "default"
    origin: str = ""  # the file it was read from

    @property
    def digest(self) -> str:
        """A short fingerprint of the template text (recorded in adapter files, to warn about a mismatch)."""
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False, **extra: Any) -> str:
        """The conversation as text; with `add_generation_prompt`, followed by the opening of an assistant turn.

        `extra`: more template variables (`tools`, `documents`, `enable_thinking`, ...); they override the special
        tokens of the same name.
        """
        template = _compile(self.source)
        variables: dict[str, Any] = {"tools": None, "documents": None, **self.special_tokens}
        variables.update(_plain(extra))
        try:
            chat = [_message(m) for m in messages]
            return str(template.render(messages=chat, add_generation_prompt=add_generation_prompt, **variables))
        except Exception as e:  # jinja2's TemplateError (raise_exception), SecurityError, or a template bug
            where = f" ({self.origin})" if self.origin else ""
            why = " ".join(str(e).split()) or type(e).__name__
            raise TemplateError(f"chat template{where} cannot render this conversation: {why}") from None

    @classmethod
    def from_dir(cls, directory: str | Path, name: str | None = None) -> ChatTemplate | None:
        """The chat template of a checkpoint directory (`name`: one of several named templates), or None.

        With several named templates and none named `default`, there is no template to use unless `name` says
        which (`transformers` refuses such a conversation too); None then, with a warning naming them.
        """
        d = Path(directory)
        candidates = _candidates(d)
        if not candidates:
            if name is not None:
                raise TemplateError(f"{d}: the checkpoint has no chat template (asked for {name!r})")
            return None
        if name is None and "default" not in candidates:
            names = ", ".join(sorted(candidates))
            log.warning("%s: several chat templates (%s) and none is the default; none is used", d, names)
            return None
        key = name or "default"
        if key not in candidates:
            raise TemplateError(f"{d}: no chat template named {key!r} (it has: {', '.join(sorted(candidates))})")
        source, origin = candidates[key]
        return cls(source, special_tokens(d), key, origin)


def _candidates(d: Path) -> dict[str, tuple[str, str]]:
    """Template name -> (source, origin); the first of jinja files, chat_template.json, tokenizer_config.json."""
    out: dict[str, tuple[str, str]] = {}
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        out["default"] = (jinja.read_text(encoding="utf-8"), str(jinja))
    extra_dir = d / "additional_chat_templates"
    if extra_dir.is_dir():
        for f in sorted(extra_dir.glob("*.jinja")):
            out[f.stem] = (f.read_text(encoding="utf-8"), str(f))
    if out:  # separate template files replace whatever the JSON files say
        return out
    for file in ("chat_template.json", "tokenizer_config.json"):
        data = _read_json(d / file)
        if data is not None and data.get("chat_template") is not None:
            return _named(data["chat_template"], str(d / file))
    return out


def special_tokens(directory: Path) -> dict[str, str]:
    """The special tokens a template may use, as strings, as `transformers`' `special_tokens_map` has them.

    The standard ones (bos_token, eos_token, ...; a token may be written as {"content": ...}), a model's own
    `*_token` entries (image_token, ...) and a dict of `extra_special_tokens`, from tokenizer_config.json; an old
    special_tokens_map.json overrides them where tokenizer_config.json has no `added_tokens_decoder`.
    """
    config = _read_json(directory / "tokenizer_config.json") or {}
    values: dict[str, Any] = dict(config)
    if "added_tokens_decoder" not in config:
        values.update(_read_json(directory / "special_tokens_map.json") or {})
    out: dict[str, str] = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = values.get(key)
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    for key, value in values.items():
        if key not in out and key not in SPECIAL_TOKEN_KEYS and key.endswith("_token") and isinstance(value, str):
            out[key] = value
    extra = values.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        out.update({str(k): v for k, v in extra.items() if isinstance(v, str)})
    return out


def _named(value: Any, origin: str) -> dict[str, tuple[str, str]]:
    if isinstance(value, str):
        return {"default": (value, origin)}
    if isinstance(value, list) and all(isinstance(t, Mapping) and "name" in t and "template" in t for t in value):
        return {str(t["name"]): (str(t["template"]), origin) for t in value}
    raise TemplateError(f"{origin}: chat_template must be a string or a list of {{name, template}} objects")


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise TemplateError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else None


def _plain(value: Any) -> Any:
    """Only plain JSON-like data reaches the template (subclasses with extra methods are cut back to the base)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"  # an inert placeholder, as transformers passes media


def _message(m: Message) -> dict[str, Any]:
    """A message as the template sees it: plain data, keys whose value is None dropped, reasoning aliased."""
    if not isinstance(m, Mapping):
        raise TypeError(f"a message must be a mapping with 'role' and 'content', got {type(m).__name__}")
    out: dict[str, Any] = _plain({k: v for k, v in m.items() if v is not None})
    reasoning = next((out[k] for k in _REASONING_KEYS if out.get(k) is not None), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # jinja2's own tojson escapes HTML characters (<, >, &, '), which chat templates must not do
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Dict:
    """The template's `dict(...)`: builds a dict, and offers nothing else to reach Python's internals through."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


@cache
def _environment() -> Any:
    """jinja2's immutable sandbox with the chat-template helpers, built once."""
    import jinja2
    from jinja2.exceptions import SecurityError
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` marks an assistant's tokens for training masks; renders as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    class Namespace(jinja2.utils.Namespace):
        """`namespace(...)`, refusing underscore names (they lead to Python's internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # jinja2's signature: `self` may be one of the keys
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for key in attrs:
                Namespace._check(key)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, key: str, value: Any) -> None:
            Namespace._check(key)
            jinja2.utils.Namespace.__setitem__(self, key, value)

        @staticmethod
        def _check(key: Any) -> None:
            if isinstance(key, str) and key.startswith("_"):
                raise SecurityError(f"a chat template cannot set the underscore attribute {key!r} on a namespace")

    class Sandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = Namespace
    return env


@cache
def _compile(source: str) -> Any:
    """The template compiled in the sandbox (a template cannot change its arguments or reach Python's internals)."""
    from jinja2.exceptions import TemplateSyntaxError

    try:
        return _environment().from_string(source)
    except TemplateSyntaxError as e:
        raise TemplateError(f"the chat template is not valid jinja2 (line {e.lineno}: {e.message})") from None
