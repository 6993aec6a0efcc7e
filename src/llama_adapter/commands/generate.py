"""`llama-adapter generate --base DIR [--adapter FILE] "instruction" [--input TEXT]`: print one response.

Also holds the options and loading helpers that `chat` and `serve` share.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DTYPES = ("bfloat16", "float16", "float32")


# ---- shared by generate / chat / serve -------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base checkpoint directory (Hugging Face or Meta layout) or 'builtin'")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weight dtype (default: bfloat16)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's; 1 is often fastest on a busy machine)")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default: {max_new_tokens}")
    g.add_argument("--temperature", type=float, default=0.1, help="0 = greedy (default: 0.1, the paper's)")
    g.add_argument("--top-p", type=float, default=0.75, help="nucleus sampling (default: 0.75, the paper's)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from ..cli import UserError
    from ..generation import SamplingParams

    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
              top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()))
    try:
        SamplingParams(**kw)  # type: ignore[arg-type]
    except ValueError as e:
        raise UserError(str(e)) from None
    return kw


def load_base(args: argparse.Namespace) -> Any:
    import torch

    from ..checkpoint import load_model
    from ..cli import UserError

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.base, dtype=getattr(torch, args.dtype), device=device)
    if model.tokenizer is None:
        raise UserError(f"{args.base}: no tokenizer.json or tokenizer.model next to the checkpoint")
    return model


def load_adapter_file(model: Any, spec: str) -> str:
    """Load `FILE` or `NAME=FILE`; returns the adapter's name."""
    from ..cli import UserError

    name, _, path = spec.rpartition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
    name = name or Path(path).stem
    if name in model.adapters:
        raise UserError(f"two adapters named {name!r}; use NAME=FILE")
    model.load_adapter(path, name)
    return name


def template_of(model: Any, adapter: str | None, override: str | None = None) -> str | None:
    if override:
        return None if override in ("none", "raw") else override
    if adapter is None:
        return None
    return model.adapters[adapter].meta.get("template") or None


def build_prompt(template: str | None, instruction: str, input: str = "") -> str:
    from ..templates import format_prompt

    if template:
        return format_prompt(template, instruction, input)
    return f"{instruction}\n{input}" if input else instruction


def image_features(model: Any, adapter: str | None, image: str, encoder_dir: str | None) -> Any:
    """Encode one image file with the adapter's image encoder (`--image-encoder` or metadata)."""
    from ..cli import UserError

    enc_dir = encoder_dir or (model.adapters[adapter].meta.get("image_encoder") if adapter else None)
    if adapter is None or model.adapters[adapter].visual_proj is None:
        raise UserError("--image needs a multi-modal adapter (one with a visual projection)")
    if not enc_dir:
        raise UserError("--image needs --image-encoder DIR (the adapter does not name its image encoder)")
    try:
        from ..multimodal import ImageEncoder, load_image
    except ImportError as e:
        raise UserError(f"image input is not available: llama_adapter.multimodal cannot be imported ({e})") from None
    dev = model.tok_embeddings.weight.device
    enc = ImageEncoder.load(enc_dir, device=dev)
    return enc.encode([load_image(image)])


# ---- the command -------------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a response to one instruction",
                       description="Print the response of the base (or of the base with an adapter) to an "
                       "instruction. The adapter's prompt template (recorded in its file, e.g. alpaca) is "
                       "applied unless --raw.")
    add_model_args(p)
    p.add_argument("--adapter", default=None, help="adapter .safetensors file")
    p.add_argument("instruction", help="the instruction (or, with --raw, the whole prompt)")
    p.add_argument("--input", default="", help="optional input/context for the instruction")
    p.add_argument("--raw", action="store_true", help="send the text as is, without the template")
    p.add_argument("--template", default=None, help="template name or .json path (overrides the adapter's)")
    p.add_argument("--image", default=None, help="image file (multi-modal adapters)")
    p.add_argument("--image-encoder", default=None, help="image encoder directory (default: the adapter's)")
    p.add_argument("--no-stream", action="store_true", help="print the response only when complete")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..generation import stream_generate

    kw = sampling_kwargs(args)
    model = load_base(args)
    name = load_adapter_file(model, args.adapter) if args.adapter else None
    template = None if args.raw else template_of(model, name, args.template)
    try:
        prompt = build_prompt(template, args.instruction, args.input)
    except ValueError as e:
        from ..cli import UserError

        raise UserError(str(e)) from None
    feats = image_features(model, name, args.image, args.image_encoder) if args.image else None
    from ..cli import UserError

    try:
        if args.no_stream:
            from ..generation import generate

            print(generate(model, [prompt], adapter=name, image_features=feats, **kw)[0])
            return 0
        for _, delta in stream_generate(model, [prompt], adapter=name, image_features=feats, **kw):
            sys.stdout.write(delta)
            sys.stdout.flush()
    except ValueError as e:
        raise UserError(str(e)) from None
    sys.stdout.write("\n")
    return 0
