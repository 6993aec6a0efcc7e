"""Prompt templates are data: one JSON file per template in `llama_adapter/templates/`.

Each file has `with_input` and `without_input` strings with `{instruction}` / `{input}` fields. A user may
also pass the path of their own JSON file wherever a template name is accepted.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from llama_adapter.errors import TemplateError

_DIR = Path(__file__).parent / "templates"


@cache
def load_template(name: str) -> dict[str, str]:
    path = Path(name) if name.endswith(".json") else _DIR / f"{name}.json"
    if not path.is_file():
        raise TemplateError(
            f"unknown template {name!r} (built in: {', '.join(available_templates())}; or the path of a .json file)"
        )
    try:
        t = json.loads(path.read_text())
    except ValueError as e:  # invalid JSON or not UTF-8
        raise TemplateError(f"{path}: not a valid template file ({e})") from None
    for key in ("with_input", "without_input"):
        if key not in t:
            raise TemplateError(f"{path}: template lacks {key!r}")
    return t


def available_templates() -> list[str]:
    return sorted(p.stem for p in _DIR.glob("*.json"))


def format_prompt(template: str, instruction: str, input: str = "") -> str:
    """The prompt text; the response follows it directly (for alpaca, right after '### Response:')."""
    t = load_template(template)
    if input and input.strip():
        return t["with_input"].format(instruction=instruction, input=input)
    return t["without_input"].format(instruction=instruction)
