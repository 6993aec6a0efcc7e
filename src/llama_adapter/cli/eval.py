"""`llama-adapter eval scienceqa ...`: ScienceQA accuracy in the layout of the paper's Table 2.

`llama-adapter eval caption | mme | open-qa ...`: the multi-modal benchmarks people report (COCO Caption's
BLEU / METEOR / ROUGE-L / CIDEr, MME's yes/no scores, free-form answers' BLEU / ROUGE-L / METEOR / BERTScore /
VQA accuracy), each from the benchmark's official layout, with the adapter's own encoders.

`llama-adapter eval scienceqa-data ...` converts a ScienceQA split into training records (Alpaca fields plus
"image") for `llama-adapter finetune --image-encoder DIR`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from llama_adapter.cli.common import DTYPE_NAMES, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="benchmarks: ScienceQA (paper Table 2), COCO Caption, MME, open-ended QA",
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
    _add_output(s, "runs/eval/scienceqa-<name>-<split>.jsonl", "accuracies")
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

    c = bench.add_parser(
        "caption",
        help="COCO Caption: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap)",
        description="Caption every annotated image (greedy) and score the captions against the references with "
        "the COCO caption tool's scorers (pycocoevalcap): BLEU-1..4, ROUGE-L, CIDEr, and METEOR where Java and its "
        "resources are present. --annotations: a COCO captions JSON (annotations/captions_val2014.json); "
        "--images: the folder of the images it names (val2014/).",
    )
    c.add_argument("--annotations", required=True, help="COCO caption annotations JSON ('images' + 'annotations')")
    c.add_argument("--images", required=True, help="folder of the images the annotations name")
    c.add_argument(
        "--prompt",
        default=None,
        help="the instruction asked for each image (default: 'Generate a caption for this image.')",
    )
    _add_meteor(c)
    _add_common(c, "caption", max_new_tokens=30)
    c.set_defaults(func=run_caption)

    m = bench.add_parser(
        "mme",
        help="MME: yes/no accuracy and accuracy+ per subtask, perception and cognition totals",
        description="Answer MME's yes/no questions (greedy) and score them as the MME tool does: per subtask acc "
        "(questions right), acc+ (images with both questions right) and their sum; perception = the sum of the 10 "
        "perception subtasks, cognition of the 4 cognition subtasks. --data: the MME_Benchmark_release_version "
        "folder (one folder per subtask: image + question .txt side by side, or images/ + questions_answers_YN/).",
    )
    m.add_argument("--data", required=True, help="MME folder (one subfolder per subtask)")
    m.add_argument("--subtasks", nargs="+", default=None, metavar="NAME", help="only these subtasks (default: all)")
    m.add_argument(
        "--suffix",
        default=" Please answer yes or no.",
        help="text appended to each question, unless it is already there (default: ' Please answer yes or no.')",
    )
    _add_common(m, "mme", max_new_tokens=8)
    m.set_defaults(func=run_mme)

    q = bench.add_parser(
        "open-qa",
        help="free-form answers (MusicQA / VQA style): BLEU, METEOR, ROUGE-L, BERTScore, VQA accuracy",
        description="Answer free-form questions (each with an image, an audio clip or a video, or none; greedy) and "
        "score the answers against the references: BLEU (sacrebleu), ROUGE-L (rouge-score), METEOR where Java and "
        "its resources are present, BERTScore with a local model (--bertscore-model), VQA accuracy. --data: a "
        "JSONL / JSON list of records (question / answer(s) / image, audio or audio_name, video; MusicQA and VQA "
        "field names are understood).",
    )
    q.add_argument("--data", required=True, help="questions JSONL or JSON list")
    q.add_argument("--media-root", default=None, help="folder relative input paths start from (default: the file's)")
    q.add_argument("--bertscore-model", default=None, metavar="DIR", help="local model directory for BERTScore")
    q.add_argument("--bertscore-layers", type=int, default=None, help="its layer to use (default: the last)")
    _add_meteor(q)
    _add_common(q, "open-qa", max_new_tokens=64)
    q.set_defaults(func=run_open_qa)


def _add_meteor(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--meteor",
        choices=["auto", "on", "off"],
        default="auto",
        help="METEOR (Java): auto = where Java and its resources are present (default), on = required, off",
    )


def _add_common(p: argparse.ArgumentParser, benchmark: str, max_new_tokens: int) -> None:
    """The options every generative benchmark shares: the model, its encoders, decoding, output."""
    p.add_argument("--base", required=True, help="base checkpoint directory or 'builtin'")
    p.add_argument("--adapter", default=None, help="adapter .safetensors (omit to evaluate the base alone)")
    p.add_argument("--image-encoder", default=None, help="CLIP directory (default: the one the adapter records)")
    p.add_argument("--audio-encoder", default=None, help="audio encoder directory (default: the adapter's)")
    p.add_argument(
        "--no-media", action="store_true", help="ignore images / audio / video even for a multi-modal adapter"
    )
    p.add_argument("--template", default=None, help="prompt template (default: the adapter's, else alpaca)")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N items")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default: 8)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default: {max_new_tokens}")
    _add_output(p, f"runs/eval/{benchmark}-<name>.jsonl", "scores")


def _add_output(p: argparse.ArgumentParser, default_out: str, what: str) -> None:
    """The options every benchmark command shares: where predictions go, the row label, the base's dtype and
    device, JSON output and progress."""
    p.add_argument("--out", default=None, help=f"predictions JSONL (default: {default_out}; runs/ is git-ignored)")
    p.add_argument("--name", default=None, help="row label in the table (default: the adapter file name)")
    p.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="fp32",
        metavar="{bf16,fp16,fp32}",
        help="base weight dtype (default: fp32)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--json", action="store_true", help=f"print the {what} as JSON")
    p.add_argument(
        "--quiet", action="store_true", help="no progress (a bar on a terminal, a line per 10%% in a log; stderr)"
    )


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
    from llama_adapter.eval.answering import write_jsonl
    from llama_adapter.eval.scienceqa import load_captions, to_record

    problems = _problems(args)
    caps = load_captions(args.captions) if args.captions else {}
    rows = [to_record(p, caps.get(p.pid), args.answer_format) for p in problems if p.answer is not None]
    out = write_jsonl(args.out, rows)
    n_img = sum(1 for r in rows if "image" in r)
    print(f"wrote {len(rows)} records ({n_img} with an image) to {out}")
    return 0


def default_predictions_path(label: str, split: str) -> Path:
    """Where ScienceQA predictions go without --out: the benchmarks' path (`answering.predictions_path`), with
    the split."""
    from llama_adapter.eval.answering import predictions_path

    p = predictions_path("scienceqa", label)
    return p.with_name(f"{p.stem}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', split)}.jsonl")


def run_scienceqa(args: argparse.Namespace) -> int:
    from llama_adapter.errors import UserError
    from llama_adapter.eval.answering import write_jsonl
    from llama_adapter.eval.scienceqa import evaluate, format_table, group_accuracy, load_captions
    from llama_adapter.multimodal.encoder import ImageEncoder

    problems = _problems(args)
    model, device = _load_base(args)
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
    label = _row_label(args)
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


# ---- the generative benchmarks ---------------------------------------------------------------------------------
def _model_and_adapter(args: argparse.Namespace) -> tuple[Any, str | None, str, Any, str]:
    """(model, adapter name or None, template, encoders or None, row label) for the benchmark commands."""
    from llama_adapter.errors import UserError
    from llama_adapter.multimodal.modalities import AdapterEncoders

    if args.max_samples is not None and args.max_samples < 1:
        raise UserError("--max-samples must be >= 1")
    model, device = _load_base(args)
    name, encoders, template = None, None, args.template or "alpaca"
    if args.adapter:
        name = "evaluated"  # not "eval": an adapter's name becomes a module attribute, and Module.eval exists
        adapter = model.load_adapter(args.adapter, name)
        template = args.template or adapter.meta.get("template") or "alpaca"
        if adapter.visual_proj is not None and not args.no_media:
            encoders = AdapterEncoders(device, {"image": args.image_encoder, "audio": args.audio_encoder})
    return model, name, template, encoders, _row_label(args)


def _load_base(args: argparse.Namespace) -> tuple[Any, str]:
    """(the frozen base from --base/--dtype on --device or the default device, that device)."""
    import torch

    from llama_adapter.config import DTYPES
    from llama_adapter.errors import UserError
    from llama_adapter.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.base, dtype=DTYPES[args.dtype], device=device)
    if model.tokenizer is None:
        raise UserError(f"{args.base}: no tokenizer next to the checkpoint")
    return model, device


def _row_label(args: argparse.Namespace) -> str:
    """The table's row label: --name, else the adapter's run directory (for adapter.safetensors) or file name."""
    if args.name or not args.adapter:
        return args.name or "base"
    a = Path(args.adapter)
    return a.parent.name if a.stem == "adapter" and a.parent.name else a.stem


def _answer(args: argparse.Namespace, model: Any, name: str | None, template: str, encoders: Any, items: list) -> list:
    from llama_adapter.eval.answering import answer_items

    if not args.quiet:
        print(
            f"answering {len(items)} questions ({'with' if encoders else 'without'} media, template {template})",
            file=sys.stderr,
            flush=True,
        )
    return answer_items(
        model,
        name,
        items,
        template=template,
        encoders=encoders,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        progress=not args.quiet,
        label=args.benchmark,
    )


def _meteor_choice(args: argparse.Namespace) -> bool | None:
    return {"auto": None, "on": True, "off": False}[args.meteor]


def _report(
    args: argparse.Namespace, label: str, scores: dict, columns: Any, notes: list[str], out: Path, n: int
) -> None:
    from llama_adapter.eval.answering import format_metric_table

    if args.json:
        print(json.dumps({"name": label, "scores": scores, "notes": notes, "predictions": str(out)}, indent=2))
        return
    print(format_metric_table({label: scores}, columns))
    for note in notes:
        print(f"note: {note}")
    print(f"{n} items; predictions written to {out}")


def run_caption(args: argparse.Namespace) -> int:
    from llama_adapter.eval.answering import predictions_path, write_jsonl
    from llama_adapter.eval.caption import (
        CAPTION_COLUMNS,
        DEFAULT_PROMPT,
        caption_items,
        load_coco_captions,
        score_captions,
    )

    images = load_coco_captions(args.annotations, args.images)[: args.max_samples]
    model, name, template, encoders, label = _model_and_adapter(args)
    answers = _answer(args, model, name, template, encoders, caption_items(images, args.prompt or DEFAULT_PROMPT))
    scores, notes = score_captions(
        {im.image_id: im.references for im in images},
        {im.image_id: a for im, a in zip(images, answers, strict=True)},
        meteor=_meteor_choice(args),
    )
    rows = [
        {"image_id": im.image_id, "image": str(im.path), "caption": a, "references": im.references}
        for im, a in zip(images, answers, strict=True)
    ]
    out = write_jsonl(args.out or predictions_path("caption", label), rows)
    _report(args, label, scores, CAPTION_COLUMNS, notes, out, len(rows))
    return 0


def run_mme(args: argparse.Namespace) -> int:
    from llama_adapter.eval.answering import Item, predictions_path, write_jsonl
    from llama_adapter.eval.mme import format_mme_table, load_mme, mme_items, mme_scores, parse_yes_no

    questions = load_mme(args.data, args.subtasks)[: args.max_samples]
    model, name, template, encoders, label = _model_and_adapter(args)
    items = [
        Item(it.id, it.question if it.question.endswith(args.suffix.strip()) else it.question + args.suffix, it.inputs)
        for it in mme_items(questions)
    ]
    answers = _answer(args, model, name, template, encoders, items)
    scores = mme_scores(questions, answers)
    rows = [
        {
            "subtask": q.subtask,
            "image": str(q.image),
            "question": q.question,
            "answer": q.answer,
            "prediction": a,
            "parsed": parse_yes_no(a),
            "correct": parse_yes_no(a) == q.answer,
        }
        for q, a in zip(questions, answers, strict=True)
    ]
    out = write_jsonl(args.out or predictions_path("mme", label), rows)
    if args.json:
        print(json.dumps({"name": label, "scores": scores, "predictions": str(out)}, indent=2))
    else:
        print(format_mme_table(label, scores))
        print(f"{len(rows)} questions; predictions written to {out}")
    return 0


def run_open_qa(args: argparse.Namespace) -> int:
    from llama_adapter.eval.answering import predictions_path, write_jsonl
    from llama_adapter.eval.open_qa import OPEN_QA_COLUMNS, load_open_qa, open_qa_items, open_qa_scores

    questions = load_open_qa(args.data, args.media_root)[: args.max_samples]
    model, name, template, encoders, label = _model_and_adapter(args)
    answers = _answer(args, model, name, template, encoders, open_qa_items(questions))
    scores, vqa, notes = open_qa_scores(
        questions,
        answers,
        meteor=_meteor_choice(args),
        bertscore_model=args.bertscore_model,
        bertscore_layers=args.bertscore_layers,
    )
    rows = [
        {"id": q.id, "question": q.question, "prediction": a, "answers": q.answers, "vqa_accuracy": v, **q.inputs}
        for q, a, v in zip(questions, answers, vqa, strict=True)
    ]
    out = write_jsonl(args.out or predictions_path("open-qa", label), rows)
    _report(args, label, scores, OPEN_QA_COLUMNS, notes, out, len(rows))
    return 0
