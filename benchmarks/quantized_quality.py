"""What `--quantize int8|int4` costs and buys (a benchmark, not a test): perplexity, decode speed, memory, and the
accuracy of an adapter fine-tuned on each precision.

    python benchmarks/quantized_quality.py                       # all four parts
    python benchmarks/quantized_quality.py --parts ppl decode    # some of them

- ppl: perplexity of the built-in base on held-out pre-training text (corpus seed 1; it was trained on seed 0),
  and of `--ppl-base` (e.g. a real .gguf or HF directory) on `--ppl-text` (default docs/DESIGN.md), in bf16 /
  int8 / int4.
- decode: batch-1 greedy decode tokens/s (prompt 32, 64 new tokens, EOS ignored) of a random checkpoint of
  `--decode-shape` (benchmarks/load_memory.py's shapes), loaded through `load_model(..., quantize=)`; the
  precisions alternate for `--repeat` rounds after a warm-up; median and best.
- memory: peak RSS, RSS and anonymous RSS after `load_model` of a 1B shape (TinyLlama-1.1B, random bf16
  safetensors) in a fresh process per precision, minus those of importing the library, and the bytes of the
  loaded weights (a quantized tensor's parts); each / bf16's (target for int4's peak: <= 0.35). A bf16 load maps
  the file and uses its pages as the weights (file-backed, not anonymous); a quantized load reads it unmapped.
- demo: the built-in demo's recipe (`builtin.demo`, `--demo-steps` steps) fine-tunes an adapter on the fp32 base
  and on its int8 / int4 versions; held-out exact-match accuracy of each (target: within 5 points of fp32).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
PRECISIONS: list[str | None] = [None, "int8", "int4"]


def label(q: str | None, dtype: str = "bf16") -> str:
    return q or dtype


# ---- perplexity ------------------------------------------------------------------------------------------
def perplexity(model: Any, ids: list[int], window: int) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, window):
            chunk = torch.tensor(ids[s : s + window + 1])[None]
            if chunk.shape[1] < 2:
                break
            logits = model(chunk[:, :-1]).float()
            nll += float(torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum"))
            n += chunk.shape[1] - 1
    return math.exp(nll / n)


def part_ppl(args: argparse.Namespace) -> list[dict[str, Any]]:
    import llama_adapter as la
    from llama_adapter.builtin import corpus

    rows = []
    texts = {"builtin": "\n".join(corpus.pretrain_documents(seed=1, n=args.ppl_docs))}
    bases = {"builtin": "builtin"}
    if args.ppl_base:
        bases[Path(args.ppl_base).name] = args.ppl_base
        texts[Path(args.ppl_base).name] = Path(args.ppl_text).read_text()
    for name, base in bases.items():
        for q in PRECISIONS:
            model = la.load_model(base, dtype=torch.bfloat16, quantize=q)
            assert model.tokenizer is not None
            ids = model.tokenizer.encode(texts[name])[: args.ppl_tokens]
            window = min(256, model.config.max_seq_len - 1)
            t = time.perf_counter()
            ppl = perplexity(model, ids, window)
            rows.append(
                {
                    "base": name,
                    "precision": label(q),
                    "tokens": len(ids),
                    "ppl": round(ppl, 4),
                    "s": round(time.perf_counter() - t, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


# ---- decode ----------------------------------------------------------------------------------------------
def part_decode(args: argparse.Namespace) -> list[dict[str, Any]]:
    from load_memory import write_checkpoint

    import llama_adapter as la
    from llama_adapter.inference.generate import generate_tokens

    path = Path(args.dir) / args.decode_shape
    if not (path / "model.safetensors").is_file():
        write_checkpoint(path, args.decode_shape)
    models = {label(q): la.load_model(path, dtype=torch.bfloat16, quantize=q, tokenizer=False) for q in PRECISIONS}
    for m in models.values():
        a = m.add_adapter("a", la.AdapterConfig(prompt_length=10, layers=min(28, m.config.n_layers)))
        with torch.no_grad():
            a.gates.normal_(0, 0.5)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 1000, (1, args.prompt_len), generator=g).tolist()

    def run(m: Any) -> float:
        t = time.perf_counter()
        generate_tokens(m, prompt, adapter="a", max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
        return args.new_tokens / (time.perf_counter() - t)

    for m in models.values():
        run(m)  # warm-up: kernels, packing
    got: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.repeat):
        for k, m in models.items():
            got[k].append(run(m))
    rows = []
    base = statistics.median(got["bf16"])
    for k, v in got.items():
        rows.append(
            {
                "shape": args.decode_shape,
                "precision": k,
                "tok_s_median": round(statistics.median(v), 2),
                "tok_s_best": round(max(v), 2),
                "vs_bf16_median": round(statistics.median(v) / base, 2),
                "runs": [round(x, 2) for x in v],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ---- memory ----------------------------------------------------------------------------------------------
CHILD = """
import json, pathlib, sys, torch
import llama_adapter as la
q = sys.argv[2] if sys.argv[2] != "none" else None
m = la.load_model(sys.argv[1], dtype=torch.bfloat16, quantize=q, tokenizer=False)
s = pathlib.Path("/proc/self/status").read_text()
kb = lambda k: int(s.split(k + ":")[1].split()[0]) * 1024
def nbytes(t):
    if hasattr(t, "__tensor_flatten__"):
        return sum(nbytes(getattr(t, n)) for n in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()
w = sum(nbytes(p) for p in m.parameters())
r = {"peak_rss": kb("VmHWM"), "rss_after_load": kb("VmRSS"), "anon_after_load": kb("RssAnon"), "weights": w}
print(json.dumps(r))
"""
IMPORT = """
import json, pathlib, torch, llama_adapter, llama_adapter.quantize, torchao
s = pathlib.Path("/proc/self/status").read_text()
kb = lambda k: int(s.split(k + ":")[1].split()[0]) * 1024
print(json.dumps({"peak_rss": kb("VmHWM"), "rss_after_load": kb("VmRSS"), "anon_after_load": kb("RssAnon")}))
"""


def part_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    from load_memory import write_checkpoint

    path = Path(args.dir) / "tinyllama"
    if not (path / "model.safetensors").is_file():
        write_checkpoint(path, "tinyllama")
    py = [sys.executable, "-c"]
    imp = json.loads(subprocess.run([*py, IMPORT], capture_output=True, text=True, check=True).stdout)
    rows = []
    for q in PRECISIONS:
        out = subprocess.run([*py, CHILD, str(path), q or "none"], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "shape": "tinyllama-1.1b",
                "precision": label(q),
                "weights_gib": round(r["weights"] / 2**30, 3),
                "peak_rss_above_import_gib": round((r["peak_rss"] - imp["peak_rss"]) / 2**30, 3),
                "rss_after_load_above_import_gib": round((r["rss_after_load"] - imp["rss_after_load"]) / 2**30, 3),
                "anon_after_load_above_import_gib": round((r["anon_after_load"] - imp["anon_after_load"]) / 2**30, 3),
            }
        )
    ref = rows[0]
    for r in rows:
        for k in ("weights", "peak_rss", "rss_after_load"):
            key = k + ("_gib" if k == "weights" else "_above_import_gib")
            r[k + "_vs_bf16"] = round(r[key] / ref[key], 3)
        print(json.dumps(r), flush=True)
    return rows


# ---- demo accuracy ---------------------------------------------------------------------------------------
def part_demo(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The demo's recipe on the built-in base in fp32, bf16, int8 and int4 (quantized from fp32), `--demo-seeds`
    seeds each (the adapter's initialisation and the data order): held-out accuracy, mean and spread, and the
    points each precision is from bf16 (the issue's reference) and fp32."""
    import llama_adapter as la
    from llama_adapter.builtin import corpus
    from llama_adapter.builtin.demo import DEMO_TRAIN_PER_TASK, demo_train_config, evaluate
    from llama_adapter.training.loop import train

    train_recs = corpus.instruction_data("train", seed=0, n_per_task=DEMO_TRAIN_PER_TASK)
    held = corpus.instruction_data("heldout")
    rows = []
    for name, dtype, q in (
        ("fp32", torch.float32, None),
        ("bf16", torch.bfloat16, None),
        *((m, torch.float32, m) for m in ("int8", "int4")),
    ):
        accs, secs = [], 0.0
        for seed in range(args.demo_seeds):
            torch.manual_seed(seed)
            model = la.load_model("builtin", dtype=dtype, quantize=q)
            with tempfile.TemporaryDirectory() as out:
                cfg = demo_train_config(
                    out,
                    len(train_recs),
                    model.config.n_layers,
                    steps=args.demo_steps,
                    seed=seed,
                    progress=False,
                    dtype=name if q is None else "fp32",
                )
                cfg.quantize = q
                t = time.perf_counter()
                res = train(cfg, model=model, records=train_recs)
                secs += time.perf_counter() - t
            accs.append(evaluate(model, held, adapter=res.adapter_name).accuracy)
        rows.append(
            {
                "precision": name,
                "steps": args.demo_steps,
                "seeds": args.demo_seeds,
                "heldout_after": [round(a, 4) for a in accs],
                "mean": round(statistics.mean(accs), 4),
                "std": round(statistics.stdev(accs), 4) if len(accs) > 1 else 0.0,
                "train_s_per_seed": round(secs / len(accs), 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    by = {r["precision"]: r["mean"] for r in rows}
    for r in rows:
        r["points_vs_bf16"] = round(100 * (r["mean"] - by["bf16"]), 1)
        r["points_vs_fp32"] = round(100 * (r["mean"] - by["fp32"]), 1)
    print(
        json.dumps([{k: r[k] for k in ("precision", "mean", "std", "points_vs_bf16", "points_vs_fp32")} for r in rows])
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["ppl", "decode", "memory", "demo"])
    ap.add_argument("--ppl-base", default=None, help="a real base (directory or .gguf) for perplexity")
    ap.add_argument("--ppl-text", default=str(HERE.parent / "docs" / "DESIGN.md"))
    ap.add_argument("--ppl-docs", type=int, default=200)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--decode-shape", default="smollm2-135m", choices=["smollm2-135m", "tinyllama"])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--demo-steps", type=int, default=600)
    ap.add_argument("--demo-seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dir", default="/tmp/llama_adapter_load_bench")
    ap.add_argument("--json", default=None, help="also write all rows to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    parts = {"ppl": part_ppl, "decode": part_decode, "memory": part_memory, "demo": part_demo}
    results = {}
    for p in args.parts:
        print(f"-- {p} --", flush=True)
        results[p] = parts[p](args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
