"""Options and loading helpers that several commands share (`generate`, `chat`, `serve`, `eval`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal, overload

from llama_adapter.errors import UserError

# llama_adapter.config.DTYPES's names, spelled out so that `--help` does not import torch
DTYPE_NAMES = ("bf16", "fp16", "fp32", "bfloat16", "float16", "float32")
QUANTIZE_NAMES = ("int8", "int4")  # llama_adapter.quantize.QUANTIZE_MODES (torchao is imported only when used)


def positive_int(text: str) -> int:
    """An argparse type for counts such as --threads: one line for what is not a whole number >= 1 (torch would
    raise a RuntimeError, a traceback, at set_num_threads)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return n


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base",
        required=True,
        help="base checkpoint: a directory (Hugging Face or Meta layout), a .gguf file, or 'builtin'",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="bf16",
        metavar="{bf16,fp16,fp32}",
        help="weight dtype of the base (default: bf16)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--quantize",
        choices=QUANTIZE_NAMES,
        default=None,
        help="weight-only quantize the base's projections to int8 or int4 (CPU; needs torchao: "
        "pip install 'llama-adapter[quant]')",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="NAME",
        help="which of the checkpoint's named chat templates to use (default: the one named 'default')",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: torch's; 1 is often fastest on a busy machine)",
    )


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default: {max_new_tokens}")
    g.add_argument("--temperature", type=float, default=0.1, help="0 = greedy (default: 0.1, the paper's)")
    g.add_argument("--top-p", type=float, default=0.75, help="nucleus sampling (default: 0.75, the paper's)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from llama_adapter.inference.sampling import SamplingParams

    kw: dict[str, Any] = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    try:
        SamplingParams(**kw)
    except ValueError as e:
        raise UserError(str(e)) from None
    return kw


def load_base(args: argparse.Namespace) -> Any:
    import torch

    from llama_adapter.config import DTYPES
    from llama_adapter.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    quantize = getattr(args, "quantize", None)
    device = args.device or ("cpu" if quantize or not torch.cuda.is_available() else "cuda")
    model = load_model(
        args.base, dtype=DTYPES[args.dtype], device=device, chat_template=args.chat_template, quantize=quantize
    )
    if model.tokenizer is None:
        raise UserError(f"{args.base}: no tokenizer.json or tokenizer.model next to the checkpoint")
    return model


def _exists(path: str) -> bool:
    """Whether `path` exists; False where the OS refuses to look (a name too long, say)."""
    try:
        return Path(path).exists()
    except OSError:
        return False


@overload
def load_adapter_file(model: Any, spec: str) -> str: ...
@overload
def load_adapter_file(model: Any, spec: str, with_path: Literal[True]) -> tuple[str, str]: ...
def load_adapter_file(model: Any, spec: str, with_path: bool = False) -> str | tuple[str, str]:
    """Load `FILE` or `NAME=FILE`; returns the adapter's name (and the file's path with `with_path`). The file is
    checked whole before anything is registered, so a bad one is a one-line error (`AdapterError`)."""
    from llama_adapter.adapter_file import check_adapter_name

    name, _, path = spec.rpartition("=") if "=" in spec and not _exists(spec) else ("", "", spec)
    try:
        name = check_adapter_name(name or Path(path).stem)
    except UserError as e:
        raise UserError(f"{e}{'' if name else '; use NAME=FILE to name it'}") from None
    if name in model.adapters:
        raise UserError(f"two adapters named {name!r}; use NAME=FILE")
    model.load_adapter(path, name)
    return (name, path) if with_path else name


TEMPLATE_HELP = (
    "prompt format: 'chat' (the base's own chat template), an instruction template (alpaca, plain) or a .json path "
    "(default: the adapter's, else the base's chat template, else plain text)"
)


def add_template_args(p: argparse.ArgumentParser, raw_help: str) -> None:
    p.add_argument("--template", default=None, help=TEMPLATE_HELP)
    p.add_argument("--raw", action="store_true", help=raw_help)


def template_choice(args: argparse.Namespace) -> str | None:
    """The explicit choice of `--raw` / `--template` for `prompting.resolve_template` (None: the rule decides)."""
    if args.raw and args.template:
        raise UserError("--raw and --template exclude each other")
    return "raw" if args.raw else args.template


MEDIA = ("image", "audio", "video")  # the condition inputs of multi-modal adapters, as flags and chat commands


def add_media_args(p: argparse.ArgumentParser, scope: str = "") -> None:
    """--image / --audio / --video and the encoder directories, for adapters trained with them (`scope`: what the
    input conditions, appended to each input's help)."""
    p.add_argument("--image", default=None, help=f"image file (multi-modal adapters){scope}")
    p.add_argument("--image-encoder", default=None, help="image encoder directory (default: the adapter's)")
    p.add_argument(
        "--audio", default=None, help=f"audio file: WAV, FLAC, OGG, ... (adapters trained with audio){scope}"
    )
    p.add_argument("--audio-encoder", default=None, help="audio encoder directory (default: the adapter's)")
    p.add_argument(
        "--video",
        default=None,
        help=f"video file, frames through the image encoder (adapters trained with video){scope}",
    )


def media_inputs(args: argparse.Namespace) -> dict[str, str]:
    """{modality: file} of the --image / --audio / --video given."""
    return {m: getattr(args, m) for m in MEDIA if getattr(args, m)}


def media_encoders(model: Any, args: argparse.Namespace) -> Any:
    """The `AdapterEncoders` of --image-encoder / --audio-encoder (each encoder loaded once, when first needed)."""
    from llama_adapter.multimodal.modalities import AdapterEncoders

    dirs = {"image": args.image_encoder, "audio": args.audio_encoder}
    return AdapterEncoders(model.tok_embeddings.weight.device, dirs)


def condition_features(
    model: Any, adapter: str | None, inputs: dict[str, str], encoders: Any, adapter_label: str = "the adapter"
) -> Any:
    """The condition vector [1, F] of `inputs` for `adapter` (None without inputs); UserError where the adapter
    does not take them or a file is missing."""
    if not inputs:
        return None
    if adapter is None:
        raise UserError(f"--{next(iter(inputs))} needs a multi-modal adapter (--adapter FILE)")
    return encoders.features(model.adapters[adapter], inputs, adapter_label=adapter_label)
