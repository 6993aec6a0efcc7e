"""`llama-adapter info PATH`: architecture, parameter counts and file sizes of a checkpoint or adapter."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="show a checkpoint's or adapter's architecture, parameters and sizes",
        description="Print the architecture, parameter counts and file sizes of a base checkpoint "
        "directory (Hugging Face or Meta layout, or 'builtin'), of a GGUF file, or of an adapter .safetensors file.",
    )
    p.add_argument("path", help="checkpoint directory, .gguf file, 'builtin', or adapter file")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_file() and path.suffix.lower() != ".gguf":  # a .gguf file is a base (llama_adapter.gguf_loading)
        from llama_adapter.adapter_file import read_adapter

        meta, tensors = read_adapter(path)
        n = sum(t.numel() for t in tensors.values())
        info = {
            "kind": "adapter",
            "file": str(path),
            "file_size": path.stat().st_size,
            "adapter": json.loads(meta["adapter"]),
            "base": json.loads(meta["base"]),
            "trainable_parameters": n,
            "tensors": {k: list(t.shape) for k, t in tensors.items()},
            "extra": {k: v for k, v in meta.items() if k not in ("adapter", "base")},
        }
    else:
        from llama_adapter.loading import checkpoint_files, load_config, resolve_base

        cfg, layout = load_config(args.path)
        files = checkpoint_files(args.path)
        info = {
            "kind": "base",
            "path": str(resolve_base(args.path)),
            "layout": layout,
            "architecture": cfg.to_dict(),
            "parameters": cfg.num_parameters,
            "files": {f.name: f.stat().st_size for f in files},
            "total_size": sum(f.stat().st_size for f in files),
        }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if info["kind"] == "adapter":
        a, b = info["adapter"], info["base"]
        print(f"adapter       {info['file']} ({_size(info['file_size'])})")
        print(
            f"config        K={a['prompt_length']} prompts x L={a['layers']} layers, gate={a['gate']}, init={a['init']}"
        )
        print(f"trainable     {info['trainable_parameters']:,} parameters")
        print(f"fits base     {', '.join(f'{k}={v}' for k, v in b.items())}")
        for k, v in info["tensors"].items():
            print(f"  {k:<28}{v}")
        for k, v in info["extra"].items():
            print(f"  {k:<28}{v[:80]}")
    else:
        a = info["architecture"]
        print(f"base          {info['path']} ({info['layout']} layout, {a['model_type']})")
        print(f"parameters    {info['parameters']:,}")
        print(
            f"shape         {a['n_layers']} layers, dim {a['dim']}, {a['n_heads']} heads "
            f"({a['n_kv_heads']} kv), head_dim {a['head_dim']}, mlp {a['hidden_dim']}, vocab {a['vocab_size']}"
        )
        print(f"rope          theta {a['rope_theta']}, scaling {a['rope_scaling']}")
        window = f" sliding_window={a['sliding_window']}" if a.get("sliding_window") else ""
        print(f"other         qkv_bias={a['qkv_bias']} tied={a['tie_embeddings']} context={a['max_seq_len']}{window}")
        for f, s in info["files"].items():
            print(f"  {f:<40}{_size(s)}")
        print(f"total size    {_size(info['total_size'])}")
    return 0
