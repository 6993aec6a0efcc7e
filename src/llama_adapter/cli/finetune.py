"""`llama-adapter finetune`: instruction-tune an adapter on Alpaca-format data (paper sec. 4.1).

Every `TrainConfig` field is a flag. Precedence: defaults < `--config FILE` (or, with `--resume DIR` and
no `--config`, the run's saved `DIR/config.yaml`) < flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from llama_adapter.cli.common import DTYPE_NAMES, QUANTIZE_NAMES

HELP = {
    "base": "base checkpoint: a directory (Hugging Face or Meta layout), a .gguf file, or 'builtin'",
    "data": "training data: JSON list / JSONL files or directories of them (Alpaca records, or conversations: "
    "OpenAI 'messages' or ShareGPT 'conversations')",
    "out": "output directory (adapter.safetensors, config.yaml, metrics.jsonl, loss.png, checkpoint.pt)",
    "val_data": "validation data files/directories (same format)",
    "val_fraction": "hold out this fraction of the training records for validation (seeded)",
    "template": "auto (alpaca for Alpaca records, chat for conversations), chat (the base's own chat template), "
    "an instruction template (alpaca, plain) or the path of a template .json",
    "train_on": "assistant turns of a conversation that the loss covers: all, or only the last",
    "max_length": "truncate BOS + prompt + output + EOS to this many tokens",
    "epochs": "training epochs (fractional allowed)",
    "warmup_epochs": "linear warm-up epochs before the half-cosine decay",
    "batch_size": "effective batch per optimiser step, over all processes",
    "micro_batch": "rows per forward/backward (gradient accumulation up to --batch-size)",
    "blr": "base learning rate; lr = blr * batch_size / 256",
    "lr": "absolute learning rate (overrides --blr scaling)",
    "weight_decay": "AdamW weight decay (prompts; not gates or biases)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "prompt_length": "adaption prompt length K",
    "layers": "number of top layers with adaption prompts L (default min(30, n_layers))",
    "gate": "gate function: tanh or linear",
    "attention": "zero-init (gated, the method) or rand-init (Table-5 baseline)",
    "dtype": "dtype of the frozen base: bf16, fp16 or fp32 (adapter and optimiser are fp32)",
    "quantize": "weight-only quantize the frozen base's projections: int8 or int4 (CPU; needs torchao)",
    "seed": "random seed (adapter init, data order, validation split)",
    "save_every": "write checkpoint.pt every N steps (0: only at the end)",
    "resume": "continue the run in this directory (or from this checkpoint.pt)",
    "overwrite": "replace an earlier run in --out (without it, such an --out is refused)",
    "skip_invalid": "skip invalid records (and report how many) instead of stopping",
    "max_steps": "stop after N optimiser steps (smoke runs; the lr schedule is unchanged)",
    "device": "auto, cpu, cuda or cuda:N",
    "fsdp": "shard the frozen base's layers across processes with FSDP2 (GPUs: saves memory per GPU)",
    "compile": "torch.compile each transformer block",
    "image_encoder": "CLIP vision checkpoint directory: conditions records with an 'image' (and, frame by frame, "
    "those with a 'video') on it",
    "image_root": "directory that record 'image' / 'audio' / 'video' paths are relative to",
    "feature_cache": "directory to cache encoder features in (images, audio, video)",
    "audio_encoder": "audio encoder checkpoint directory (Whisper or CLAP, with its preprocessor_config.json): "
    "conditions records with an 'audio' clip on it",
    "video_frames": "frames sampled uniformly from each video, each through --image-encoder",
    "video_pool": "pooling of the video frames' features over time: mean, or mean+max",
    "progress": "show a progress bar",
    "adapter_name": "name of the adapter inside the model while training",
    "loss_chunk": "supervised positions per logits chunk in the loss (default: the compute backend's, 512 on a CPU "
    "and 256 elsewhere; the logits of a chunk are held at once: chunk x vocab values)",
}


CHOICES = {
    "gate": ["tanh", "linear"],
    "attention": ["zero-init", "rand-init"],
    "dtype": list(DTYPE_NAMES),
    "quantize": list(QUANTIZE_NAMES),
    "train_on": ["all", "last"],
    "video_pool": ["mean", "mean+max"],
}


def _flag_type(tp: str) -> Any:
    base = tp.replace(" | None", "")
    conv = {"int": int, "float": float, "str": str}[base]
    if "None" not in tp:
        return conv

    def optional(s: str) -> Any:
        return None if s.lower() in ("none", "null", "") else conv(s)

    optional.__name__ = base  # argparse names the type in its error: "invalid int value: 'abc'"
    return optional


def register(sub: argparse._SubParsersAction) -> None:
    from llama_adapter.training.config import TrainConfig

    p = sub.add_parser(
        "finetune",
        help="instruction-tune an adapter on Alpaca-format data",
        description="Train a zero-init attention adapter on a frozen base with the paper's recipe "
        "(AdamW, blr 9e-3 x batch/256, 5 epochs, 2 warm-up, cosine). Resumable (--resume), "
        "distributed with torchrun (DDP). The adapter is named 'default' while training.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="YAML/JSON file of options (e.g. a previous run's config.yaml)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        h = HELP.get(f.name, f.name) + f" (default: {default})"
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=h)
        elif f.type == "list[str]":
            p.add_argument(flag, nargs="+", action="extend", metavar="PATH", help=h)
        else:
            p.add_argument(flag, type=_flag_type(str(f.type)), choices=CHOICES.get(f.name), help=h)
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> Any:
    from llama_adapter.errors import UserError
    from llama_adapter.training.config import TrainConfig

    explicit = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    base: dict[str, Any] = {}
    cfg_file = getattr(args, "config", None)
    resume = explicit.get("resume")
    if cfg_file is None and resume and Path(resume).is_dir() and (Path(resume) / "config.yaml").is_file():
        cfg_file = str(Path(resume) / "config.yaml")
    if cfg_file:
        import yaml

        path = Path(cfg_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML/JSON ({e})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: expected a mapping of options")
        base = loaded
    merged = base | explicit
    if resume and "out" not in explicit and Path(resume).is_dir():
        merged["out"] = resume
    return TrainConfig.from_dict(merged, source=cfg_file or "options")


def run(args: argparse.Namespace) -> int:
    from llama_adapter.training.loop import train

    cfg = build_config(args)
    result = train(cfg)  # user errors are UserError (one line, exit 2 in cli.main); anything else is a bug
    if os.environ.get("RANK", "0") == "0":
        print(
            json.dumps(
                {
                    "adapter": str(result.adapter_path),
                    "steps": result.steps,
                    "final_train_loss": result.final_train_loss,
                    "val_loss": result.val_loss,
                    "train_time_s": round(result.train_time_s, 2),
                }
            )
        )
    return 0
