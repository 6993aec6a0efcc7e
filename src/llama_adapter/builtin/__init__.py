"""The small base model shipped inside the package: `--base builtin`, `la.load_model("builtin")`.

`base/` is an ordinary Hugging Face-layout checkpoint (config.json, model.safetensors, tokenizer.json, ...)
written by `llama-adapter pretrain` from `recipes/builtin.yaml`; its README.md and recipe.json record how it
was made and how long it took. It loads through the same code path as any other checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from llama_adapter.errors import CheckpointError

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


BASE_DIR = Path(__file__).resolve().parent / "base"


def builtin_base_dir() -> Path:
    """The directory of the shipped base; CheckpointError if the package was installed without it."""
    return check_base_dir(BASE_DIR)


def check_base_dir(d: Path) -> Path:
    missing = [f for f in REQUIRED_FILES if not (d / f).is_file()]
    if missing:
        raise CheckpointError(
            f"{d}: the built-in base model is missing ({', '.join(missing)} not found); reinstall the package "
            "or rebuild it with `llama-adapter pretrain --out "
            f"{d}`"
        )
    return d
