"""`llama-adapter eval scienceqa ...`: ScienceQA accuracy in the layout of the paper's Table 2.

`llama-adapter eval scienceqa-data ...` converts a ScienceQA split into training records (Alpaca fields plus
"image") for `llama-adapter finetune --image-encoder DIR`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from llama_adapter.cli.common import DTYPE_NAMES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="benchmarks: ScienceQA (paper Table 2)",
        description="Evaluate adapters on benchmarks, or prepare benchmark training data.",
    )
    bench = p.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    bench.required = True

    s = bench.add_parser(
        "scienceqa",
        help="ScienceQA accuracy overall and by group (greedy decoding)",
        description="Greedy answers to ScienceQA questions; prints accuracy overall and by NAT / SOC / LAN / TXT "
        "/ IMG / NO / G1-6 / G7-12 (the groups the data's fields allow; '-' for the others) and writes "
        "per-question predictions as JSONL. --data: a directory in the official layout (problems.json, "
        "pid_splits.json, images/<split>/<pid>/image.png) or LLaVA's llava_test_CQM-A.json.",
    )
    s.add_argument("--base", required=True, help="base checkpoint directory or 'builtin'")
    s.add_argument("--adapter", default=None, help="adapter .safetensors (omit to evaluate the base alone)")
    s.add_argument("--data", required=True, help="ScienceQA directory (official layout) or LLaVA test JSON file")
    s.add_argument("--split", default="test", help="split of pid_splits.json (default: test)")
    s.add_argument(
        "--image-root",
        default=None,
        help="image folder (default: DATA/images; for the LLaVA file, the folder holding <pid>/image.png)",
    )
    s.add_argument(
        "--image-encoder",
        default=None,
        help="CLIP vision checkpoint directory (default: the one recorded in the adapter)",
    )
    s.add_argument("--no-images", action="store_true", help="ignore images even for a multi-modal adapter")
    s.add_argument("--captions", default=None, help="captions.json: add each image's caption to the context")
    s.add_argument("--template", default=None, help="prompt template (default: the adapter's, else alpaca)")
    s.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N problems")
    s.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default: 8)")
    s.add_argument("--max-new-tokens", type=int, default=16, help="default: 16")
    s.add_argument(
        "--skip-missing-images",
        action="store_true",
        help="evaluate problems whose image is missing without it instead of stopping",
    )
    s.add_argument(
        "--out",
        default=None,
        help="predictions JSONL (default: runs/eval/scienceqa-<name>-<split>.jsonl, <name> as in --name; "
        "runs/ is git-ignored)",
    )
    s.add_argument("--name", default=None, help="row label in the table (default: the adapter file name)")
    s.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="fp32",
        metavar="{bf16,fp16,fp32}",
        help="base weight dtype (default: float32)",
    )
    s.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    s.add_argument("--json", action="store_true", help="print the accuracies as JSON")
    s.add_argument(
        "--quiet", action="store_true", help="no progress (a bar on a terminal, a line per 10%% in a log; stderr)"
    )
    s.set_defaults(func=run_scienceqa)

    d = bench.add_parser(
        "scienceqa-data",
        help="ScienceQA split -> training records (JSONL with an 'image' field)",
        description="Write one Alpaca record per problem (question, context and options as the instruction, "
        "'The answer is (X).' as the output, and 'image' with the image path when the problem has one).",
    )
    d.add_argument("--data", required=True, help="ScienceQA directory (official layout)")
    d.add_argument("--split", default="train", help="default: train")
    d.add_argument("--image-root", default=None, help="image folder (default: DATA/images)")
    d.add_argument("--captions", default=None, help="captions.json: add captions to the context")
    d.add_argument(
        "--answer-format",
        default="The answer is ({letter}).",
        help="training target with {letter} / {text} fields (default: 'The answer is ({letter}).')",
    )
    d.add_argument("--out", required=True, help="output JSONL file")
    d.set_defaults(func=run_export)


def _problems(args: argparse.Namespace) -> list:
    from llama_adapter.errors import UserError
    from llama_adapter.eval.scienceqa import ScienceQAError, load_scienceqa

    try:
        problems = load_scienceqa(args.data, args.split, args.image_root)
    except ScienceQAError as e:
        raise UserError(str(e)) from None
    if getattr(args, "max_samples", None):
        problems = problems[: args.max_samples]
    if not problems:
        raise UserError(f"{args.data}: no problems in split {args.split!r}")
    return problems


def run_export(args: argparse.Namespace) -> int:
    from llama_adapter.eval.scienceqa import load_captions, to_record, write_jsonl

    problems = _problems(args)
    caps = load_captions(args.captions) if args.captions else {}
    rows = [to_record(p, caps.get(p.pid), args.answer_format) for p in problems if p.answer is not None]
    out = write_jsonl(args.out, rows)
    n_img = sum(1 for r in rows if "image" in r)
    print(f"wrote {len(rows)} records ({n_img} with an image) to {out}")
    return 0


def default_predictions_path(label: str, split: str) -> Path:
    """Where predictions go without --out: under runs/ (git-ignored), never loose in the working directory."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._") or "base"
    return Path("runs") / "eval" / f"scienceqa-{safe}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', split)}.jsonl"


def run_scienceqa(args: argparse.Namespace) -> int:
    import torch

    from llama_adapter.config import DTYPES
    from llama_adapter.errors import UserError
    from llama_adapter.eval.scienceqa import evaluate, format_table, group_accuracy, load_captions, write_jsonl
    from llama_adapter.loading import load_model
    from llama_adapter.multimodal.encoder import ImageEncoder

    problems = _problems(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.base, dtype=DTYPES[args.dtype], device=device)
    if model.tokenizer is None:
        raise UserError(f"{args.base}: no tokenizer next to the checkpoint")
    name = None
    encoder = None
    if args.adapter:
        name = "scienceqa"
        adapter = model.load_adapter(args.adapter, name)
        if adapter.visual_proj is not None and not args.no_images:
            enc_dir = args.image_encoder or adapter.meta.get("image_encoder")
            if not enc_dir:
                raise UserError(
                    f"{args.adapter}: multi-modal adapter without a recorded image encoder; "
                    "pass --image-encoder DIR (or --no-images)"
                )
            encoder = ImageEncoder.load(enc_dir, device=device)
            recorded = adapter.meta.get("image_encoder_fingerprint")
            if recorded and json.loads(recorded).get("feature_dim") != encoder.feature_dim:
                raise UserError(
                    f"{enc_dir}: gives {encoder.feature_dim} features, the adapter was trained on "
                    f"{json.loads(recorded).get('feature_dim')}"
                )
        template = args.template or adapter.meta.get("template") or "alpaca"
    else:
        template = args.template or "alpaca"
    caps = load_captions(args.captions) if args.captions else None
    if not args.quiet:
        print(
            f"evaluating {len(problems)} problems ({'with' if encoder else 'without'} images, template {template})",
            file=sys.stderr,
            flush=True,
        )
    results = evaluate(
        model,
        name,
        problems,
        template=template,
        encoder=encoder,
        captions=caps,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        progress=not args.quiet,
        skip_missing_images=args.skip_missing_images,
    )
    label = args.name or "base"
    if args.adapter and not args.name:
        a = Path(args.adapter)
        label = a.parent.name if a.stem == "adapter" and a.parent.name else a.stem
    out = args.out or default_predictions_path(label, args.split)
    write_jsonl(out, results)
    acc = group_accuracy(results)
    if args.json:
        print(json.dumps({"name": label, "accuracy": acc, "predictions": str(out)}, indent=2))
    else:
        print(format_table({label: acc}))
        n_cut = sum(r["truncated"] for r in results)
        print(
            f"{len(results)} problems; predictions written to {out}"
            + (f"; {n_cut} prompts shortened to fit the context" if n_cut else "")
        )
    return 0
