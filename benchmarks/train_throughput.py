"""Adapter fine-tuning throughput on the SmolLM2-135M shape (random weights), optionally against PEFT and litgpt.

Shape: vocab 49152, dim 576, 30 layers, 9 heads (3 KV), MLP 1536, tied embeddings. Adapter K=10, L=28.
Batch 4 x 256 tokens, every position supervised, one AdamW step per batch (no accumulation).

    python benchmarks/train_throughput.py                 # ours only
    python benchmarks/train_throughput.py --peer peft     # + transformers/PEFT AdaptionPrompt, fp32 and bf16 autocast
    python benchmarks/train_throughput.py --peer all --litgpt-python VENV/bin/python   # + litgpt's adapter (bf16 true
                                                          # and mixed), from a venv that has `pip install litgpt`

Ours also reports its matmul FLOP rate as a fraction of the bf16 matmul peak measured on the step's own product
shapes, and, from one more step under torch.profiler, the time in matrix products and the fraction of that peak
they alone would allow (the ceiling if everything between them took no time).
Each measurement runs in its own subprocess so peak RSS (ru_maxrss) belongs to that configuration alone.
Prints one JSON object. PEFT is the optional `bench` extra (`pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# transparent huge pages for PyTorch's large CPU blocks, as `import llama_adapter` sets them (see its __init__), for
# every configuration alike: the peers' subprocesses inherit it (set THP_MEM_ALLOC_ENABLE=0 to measure without)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
from peft_peer import SMOLLM2_135M  # noqa: E402 (benchmarks/: a script's own folder is on sys.path)

SHAPE = SMOLLM2_135M
K, L = 10, 28


RUNS = ["ours", "peft-bf16-autocast", "peft-fp32", "litgpt-bf16-true", "litgpt-bf16-mixed"]


def _batch(batch: int, seq: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, SHAPE["vocab_size"], (batch, seq), generator=g)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build_ours(dtype: torch.dtype):  # noqa: ANN201
    from llama_adapter import AdapterConfig, ModelConfig, Transformer
    from llama_adapter.backends import install

    cfg = ModelConfig(**SHAPE)  # type: ignore[arg-type]
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.freeze_base()
    model.eval()
    install(model)  # the compute backend for the CPU, as load_model does
    model.add_adapter("default", AdapterConfig(prompt_length=K, layers=L))
    return model


def step_flops(batch: int, seq: int) -> float:
    """Matmul FLOPs of one training step of ours (the adapter's own few are left out), counting what must be
    computed: the forward through every layer and the tied head; the backward's input gradients (the base is frozen:
    no weight gradients) through the head and the layers above the lowest adapted one, whose attention backward is
    four products to the forward's two; and in the lowest adapted layer only those its prompts' gradients pass
    through (the MLP and the attention output projection: its queries, keys and values do not depend on the
    adapter). Attention counts its causal half."""
    return sum(step_flops_parts(batch, seq))


def step_flops_parts(batch: int, seq: int) -> tuple[float, float]:
    """`step_flops` as (the weight products: projections and head, the attention products)."""
    d, n, hd = SHAPE["dim"], SHAPE["n_layers"], SHAPE["dim"] // SHAPE["n_heads"]
    q, kv, f, v = SHAPE["n_heads"] * hd, SHAPE["n_kv_heads"] * hd, SHAPE["hidden_dim"], SHAPE["vocab_size"]
    tokens = batch * seq
    qkv, rest = 2 * tokens * d * (q + 2 * kv), 2 * tokens * (q * d + 3 * d * f)  # projections
    attention = 2 * 2 * batch * SHAPE["n_heads"] * hd * seq * seq / 2  # q k^T and p v, causal half
    head = 2 * tokens * d * v
    weights = n * (qkv + rest) + head + head + (L - 1) * (qkv + rest) + rest  # forward, then backward
    return weights, n * attention + (L - 1) * 2 * attention


def bf16_peak_gflops(rounds: int = 3) -> float:
    """The CPU's bf16 matmul rate on this step's products (x W^T at batch x seq rows), best of each over `rounds`
    rounds, same threads: the peak the step is measured against. Several rounds, because on a shared VM one round
    can fall in a slow spell, and a low peak would flatter the fraction. On a CPU where oneDNN has no bf16 matmul
    the step multiplies widened operands in fp32 (`kernels.widens_bf16_products`): there the fp32 rate is the peak."""
    from llama_adapter.backends.cpu.kernels import _onednn_bf16

    dtype = torch.bfloat16 if _onednn_bf16() else torch.float32
    rows = 4 * 256
    d, f, v = SHAPE["dim"], SHAPE["hidden_dim"], SHAPE["vocab_size"]
    best = 0.0
    for _ in range(rounds):
        for n, k in ((3 * d, d), (2 * f, d), (d, f), (v, d)):
            x, w = torch.randn(rows, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            torch.nn.functional.linear(x, w)
            reps = max(3, int(2e10 / (2 * rows * n * k)))
            t = time.perf_counter()
            for _ in range(reps):
                torch.nn.functional.linear(x, w)
            best = max(best, 2 * rows * n * k * reps / (time.perf_counter() - t) / 1e9)
    return best


def cpu_ticks() -> tuple[int, int] | None:
    """(all, stolen) CPU time ticks since boot from /proc/stat (Linux), or None: the share of the timed steps' time
    the hypervisor gave to other guests tells whether a run on a shared VM was measured in a slow spell."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


def run_ours(args: argparse.Namespace) -> dict:
    from llama_adapter.training.data import IGNORE_INDEX
    from llama_adapter.training.loss import batch_loss

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = build_ours(dtype)
    if args.compile:
        for layer in model.layers:
            layer.compile(dynamic=False)
    ids = _batch(args.batch, args.seq)
    batch = {"input_ids": ids, "labels": ids.clone()}
    assert (batch["labels"] != IGNORE_INDEX).all()
    params = model.trainable_parameters("default")
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.02)
    model.train()
    model.backend.prepare_training()  # as training.loop.train does

    def step() -> float:
        loss, n = batch_loss(model, "default", batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()) / n

    res = _time(step, args)
    peak, flops = bf16_peak_gflops(), step_flops(args.batch, args.seq)
    gflops = flops / res["step_time_s"] / 1e9
    res.update(model_gflop_per_step=round(flops / 1e9, 1), achieved_gflop_s=round(gflops, 1))
    res.update(bf16_peak_gflop_s=round(peak, 1), fraction_of_bf16_peak=round(gflops / peak, 3))
    from llama_adapter.backends.cpu.kernels import _onednn_bf16

    res.update(peak_measured_in="bf16" if _onednn_bf16() else "fp32 (no bf16 matmul in oneDNN on this CPU)")
    products, wall, attention_timed = products_time(step)
    weights, attention = step_flops_parts(args.batch, args.seq)
    timed = weights + attention if attention_timed else weights
    res.update(
        products_s_per_step=round(products, 4),
        products_share_of_step=round(products / wall, 3),
        # the ceiling the timed matrix products set: their FLOPs at their own rate over the peak, i.e. the fraction
        # if everything between them took no time. Where attention runs in our fused C++ kernels, its products are
        # not among the timed ones, and its FLOPs are left out of this figure (not out of fraction_of_bf16_peak)
        attention_products_timed=attention_timed,
        fraction_of_bf16_peak_products_only=round(timed / products / 1e9 / peak, 3),
    )
    return res


# the matrix products of a step as the profiler names them (F.linear and matmul reach these)
PRODUCTS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm", "mkldnn::_linear_pointwise"}


def products_time(step) -> tuple[float, float, bool]:  # noqa: ANN001
    """(seconds of one step spent in its matrix products, the step's wall time, whether attention's batched products
    were among them), from one more step under torch.profiler: where the time goes besides the products is what a
    faster step would have to remove."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        step()
        wall = time.perf_counter() - t
    events = prof.key_averages()
    attention = any(e.key in ("aten::bmm", "aten::baddbmm") for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in PRODUCTS) / 1e6, wall, attention


def run_peft(args: argparse.Namespace, autocast: bool) -> dict:
    from peft_peer import build_peft

    model = build_peft(SHAPE, K, L)  # fp32 weights (with bf16 autocast: PEFT's best mode on a CPU)
    ids = _batch(args.batch, args.seq)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.02
    )
    model.train()

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return _time(step, args)


def run_litgpt(args: argparse.Namespace, precision: str) -> dict:
    """litgpt's LLaMA-Adapter (`litgpt.adapter`) on the same shape, trained as its `finetune/adapter.py` trains:
    logits with `lm_head_chunk_size=128`, `chunked_cross_entropy`; `precision` "bf16-true" (weights in bf16) or
    "bf16-mixed" (its default without a GPU: fp32 weights under bf16 autocast)."""
    from litgpt.utils import chunked_cross_entropy
    from litgpt_peer import build_litgpt, fresh_prompt_kv

    model = build_litgpt(SHAPE, K, L, bf16=precision == "bf16-true")
    with torch.no_grad():  # initialised as ours and PEFT's (a loss of ln(vocab) at the start)
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # the norms (no biases in this shape)
            elif "gating_factor" not in n:  # (zero-init gates stay zero)
                p.normal_(0.0, 0.02)
    ids = _batch(args.batch, args.seq)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.02
    )
    model.train()

    def step() -> float:
        fresh_prompt_kv(model)  # recomputed each step (litgpt keeps them from the first forward otherwise)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            logits = model(ids, lm_head_chunk_size=128)
            logits[-1] = logits[-1][..., :-1, :]
            loss = chunked_cross_entropy(logits, ids[..., 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return _time(step, args)


def _time(step, args: argparse.Namespace) -> dict:  # noqa: ANN001
    for _ in range(args.warmup):
        step()
    times, cpu = [], []
    ticks = cpu_ticks()
    for _ in range(args.steps):
        t, c = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    after = cpu_ticks()
    steal = None
    if ticks is not None and after is not None and after[0] > ticks[0]:
        steal = round((after[1] - ticks[1]) / (after[0] - ticks[0]), 3)
    times.sort()
    cpu.sort()
    med, cmed = times[len(times) // 2], cpu[len(cpu) // 2]
    return {
        "tokens_per_s": round(args.batch * args.seq / med, 1),
        "step_time_s": round(med, 4),
        # CPU seconds per step: on a shared machine with --threads 1 this is the uncontended step time
        "cpu_s_per_step": round(cmed, 4),
        "tokens_per_cpu_s": round(args.batch * args.seq / cmed, 1),
        "step_time_min_s": round(times[0], 4),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "loss": round(loss, 4),
        "threads": torch.get_num_threads(),
        # the hypervisor's share of the machine's CPU time during the timed steps (steal; None off Linux)
        "cpu_steal_share": steal,
    }


def _thp_mode() -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or None off Linux."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", choices=["none", "peft", "litgpt", "all"], default="none")
    ap.add_argument(
        "--litgpt-python",
        default=sys.executable,
        help="the Python that has litgpt (it pins huggingface-hub<1.4, so it usually lives in a venv of its own)",
    )
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6, help="timed steps (the median is reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="our frozen base's dtype")
    ap.add_argument("--compile", action="store_true", help="torch.compile our transformer blocks")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--only", choices=RUNS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only:
        if args.only == "ours":
            res = run_ours(args)
        elif args.only.startswith("litgpt-"):
            res = run_litgpt(args, args.only.removeprefix("litgpt-"))
        else:
            res = run_peft(args, autocast=args.only == "peft-bf16-autocast")
        print(json.dumps(res))
        return
    passthrough = [a for a in sys.argv[1:] if a not in ("--peer", "peft", "litgpt", "all", "none")]
    runs = ["ours"]
    if args.peer in ("peft", "all"):
        runs += ["peft-bf16-autocast", "peft-fp32"]
    if args.peer in ("litgpt", "all"):
        runs += ["litgpt-bf16-true", "litgpt-bf16-mixed"]
    out: dict = {
        "shape": SHAPE | {"K": K, "L": L, "batch": args.batch, "seq": args.seq},
        "ours_config": {"dtype": args.dtype, "compile": args.compile},
        "environment": {"THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"), "thp_mode": _thp_mode()},
    }
    for r in runs:
        python = args.litgpt_python if r.startswith("litgpt-") else sys.executable
        try:
            p = subprocess.run([python, __file__, *passthrough, "--only", r], capture_output=True, text=True)
        except OSError as e:  # a --litgpt-python that is not there
            out[r] = {"error": f"cannot run {python}: {e.strerror}"}
            print(f"{r}: {out[r]}", file=sys.stderr, flush=True)
            continue
        if p.returncode != 0:
            out[r] = {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"rc {p.returncode}"}
            continue
        out[r] = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"{r}: {out[r]}", file=sys.stderr, flush=True)
    for peer in ("peft", "litgpt"):
        peers = [out[r] for r in runs if r.startswith(peer + "-") and "tokens_per_s" in out.get(r, {})]
        if peers and "tokens_per_s" in out["ours"]:
            best = max(peers, key=lambda x: x["tokens_per_s"])
            out[f"speedup_vs_{peer}_best"] = round(out["ours"]["tokens_per_s"] / best["tokens_per_s"], 2)
            best_cpu = max(peers, key=lambda x: x["tokens_per_cpu_s"])
            cpu_ratio = out["ours"]["tokens_per_cpu_s"] / best_cpu["tokens_per_cpu_s"]
            out[f"cpu_speedup_vs_{peer}_best"] = round(cpu_ratio, 2)
            out[f"peak_rss_ratio_vs_{peer}_best"] = round(out["ours"]["peak_rss_mib"] / best["peak_rss_mib"], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
