"""`llama-adapter encoder`: zero-init attention on Hugging Face encoders (ViT, RoBERTa/BERT, CLIP).

encoder finetune   train prompts (or a baseline) for a task; writes adapter.safetensors, metrics.jsonl, loss.png
encoder eval       score an adapter on a data set
encoder pretrain   pre-train one of the miniature encoders (vit, roberta, clip) from scratch
encoder make-data  write one of the miniature downstream sets (counting, fact-qa, base-novel)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from llama_adapter.cli.common import positive_int

FINETUNE_HELP = {
    "model": "encoder checkpoint directory (transformers layout: config.json + model.safetensors; "
    "tokenizer.json for text, preprocessor_config.json for images)",
    "task": "image-classification (ViT), text-classification (BERT/RoBERTa), question-answering (BERT/RoBERTa, "
    "SQuAD), clip (CLIP: classify by similarity to class-name texts)",
    "method": "zero-init (gated prompts: the method), rand-init (prompts without gate, one joint softmax), "
    "linear-probe (head only; for CLIP its projections), full (every weight)",
    "data": "training data: an ImageFolder directory or JSONL {image,label} (images); JSONL {text,label} or CSV "
    "text,label (text); SQuAD v1.1/v2.0 JSON (question answering)",
    "eval_data": "evaluation data in the same format, scored at the end (and every --eval-every steps); for clip, "
    "classes not in --data are scored as novel classes",
    "out": "output directory (adapter.safetensors, config.json, metrics.jsonl, loss.png, result.json)",
    "prompt_length": "prompts K per adapted layer",
    "layers": "adapted layers L, counted from the top (0: all)",
    "gate": "gate function: tanh or linear",
    "epochs": "training epochs (fractional allowed)",
    "batch_size": "records per optimiser step",
    "lr": "peak learning rate (default by method: prompts and linear-probe 1e-2, full 1e-3)",
    "weight_decay": "AdamW weight decay on prompts and head weights (not gates, not biases)",
    "warmup_fraction": "fraction of the steps spent in linear warm-up before the half-cosine decay",
    "seed": "random seed (prompt and head initialisation, data order)",
    "max_length": "longest token sequence (text, question + context; longer contexts are cut)",
    "max_answer_tokens": "longest answer span considered when decoding QA predictions",
    "class_template": "text a CLIP class name is put in ({} is replaced by the name)",
    "eval_every": "also evaluate on --eval-data every N steps (0: only at the end)",
    "threads": "CPU threads for torch (default 1: tiny models on a busy machine run fastest on one)",
    "progress": "show a progress bar (lines when not on a terminal)",
    "overwrite": "replace an earlier run in --out",
}
CHOICES: dict[str, list[str]] = {
    "task": ["image-classification", "text-classification", "question-answering", "clip"],
    "method": ["zero-init", "rand-init", "linear-probe", "full"],
    "gate": ["tanh", "linear"],
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encoder",
        help="zero-init attention prompts on ViT / RoBERTa / CLIP encoders",
        description="Gated prompts (zero-init attention) in Hugging Face encoders, with the paper's comparison "
        "methods, and the miniature encoders and data sets to try them on.",
    )
    esub = p.add_subparsers(dest="encoder_command", metavar="ENCODER_COMMAND")
    _finetune_parser(esub)
    e = esub.add_parser("eval", help="score an encoder adapter on a data set", description="Score an adapter.")
    e.add_argument("--model", required=True, help="the encoder checkpoint directory the adapter was trained on")
    e.add_argument("--adapter", required=True, help="adapter.safetensors written by `encoder finetune`")
    e.add_argument("--data", required=True, help="evaluation data in the adapter's task format")
    e.add_argument("--batch-size", type=int, default=64, help="records per forward (default: 64)")
    e.add_argument("--threads", type=positive_int, default=1, help="CPU threads for torch (default: 1)")
    e.set_defaults(func=run_eval)
    pt = esub.add_parser(
        "pretrain",
        help="pre-train a miniature encoder from scratch",
        description="Pre-train a tiny encoder (a minute or two on a CPU): vit (shape and colour of drawn shapes), "
        "roberta (masked LM on the built-in corpus), clip (drawn shapes vs captions).",
    )
    pt.add_argument("recipe", choices=["vit", "roberta", "clip"], help="which encoder")
    pt.add_argument("--out", required=True, help="checkpoint directory to write")
    pt.add_argument("--steps", type=int, default=None, help="pre-training steps (default: the recipe's)")
    pt.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    pt.add_argument("--threads", type=positive_int, default=1, help="CPU threads for torch (default: 1)")
    pt.set_defaults(func=run_pretrain)
    md = esub.add_parser(
        "make-data",
        help="write a miniature downstream data set",
        description="counting (ImageFolder, 1-4 shapes: for the vit), fact-qa (SQuAD v2.0 over corpus facts: for the "
        "roberta), base-novel (ImageFolder, few shots of 8 base classes + a test set of all 16: for the clip).",
    )
    md.add_argument("dataset", choices=["counting", "fact-qa", "base-novel"], help="which set")
    md.add_argument("--out", required=True, help="directory to write (train and test inside)")
    md.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    md.set_defaults(func=run_make_data)
    p.set_defaults(func=lambda args: _no_command(p))


def _no_command(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def _finetune_parser(esub: Any) -> None:
    from llama_adapter.encoders.train import EncoderTrainConfig

    f = esub.add_parser(
        "finetune",
        help="train prompts (or a baseline) on an encoder task",
        description="Fine-tune a frozen encoder with zero-init gated prompts in its top layers (or a comparison "
        "method). AdamW, warm-up + cosine; writes adapter.safetensors, metrics.jsonl, loss.png, result.json.",
    )
    defaults = EncoderTrainConfig()
    required = {"model", "task", "data", "out"}
    for name in EncoderTrainConfig.field_names():
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        if name == "threads":
            default = 1
        help_text = FINETUNE_HELP[name] + ("" if name in required or default is None else f" (default: {default})")
        if isinstance(default, bool):
            f.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        kind: Any = {"epochs": float, "lr": float, "weight_decay": float, "warmup_fraction": float}.get(name)
        if kind is None:
            kind = int if isinstance(default, int) else str
        f.add_argument(
            flag,
            type=kind,
            default=None if name in required else default,
            required=name in required,
            choices=CHOICES.get(name),
            help=help_text,
        )
    f.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    from llama_adapter.encoders.train import EncoderTrainConfig, finetune

    names = EncoderTrainConfig.field_names()
    cfg = EncoderTrainConfig(**{k: getattr(args, k) for k in names if hasattr(args, k)})
    print(json.dumps(finetune(cfg)))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from llama_adapter.encoders.train import evaluate

    print(json.dumps(evaluate(args.model, args.adapter, args.data, args.batch_size, args.threads)))
    return 0


def run_pretrain(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import torch

    from llama_adapter.encoders import miniature

    torch.set_num_threads(args.threads)
    recipe = replace(miniature.RECIPES[args.recipe], seed=args.seed)
    if args.steps is not None:
        if args.steps < 1:
            from llama_adapter.errors import UserError

            raise UserError("--steps must be >= 1")
        recipe = replace(recipe, steps=args.steps)
    stats = miniature.PRETRAIN[args.recipe](args.out, recipe, lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(stats))
    return 0


def run_make_data(args: argparse.Namespace) -> int:
    from llama_adapter.encoders import miniature

    out = miniature.DATASETS[args.dataset](args.out, seed=args.seed)
    print(json.dumps({"dataset": args.dataset, "out": str(out)}))
    return 0
