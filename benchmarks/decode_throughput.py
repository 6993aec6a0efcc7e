"""Decode throughput on the SmolLM2-135M shape with random bf16 weights (a benchmark, not a test).

    python benchmarks/decode_throughput.py                 # ours: batch 1, batch 8, 8 adapters vs 1
    python benchmarks/decode_throughput.py --peer peft     # + transformers generate with a PEFT adaption prompt

Prompt 32 tokens, 64 new tokens, greedy, EOS ignored. tokens/s = generated tokens / wall time of the whole
request (prefill included); every setting (ours and the peer's) runs once per round, --repeat rounds after one
warm-up; best and median are reported. Also prints the batch-1 memory-bandwidth bounds: bytes of weights read
per step / measured bandwidth (of a copy, read + write; and of a pure read).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from peft_peer import SMOLLM2_135M, build_peft  # benchmarks/ (a script's own folder is on sys.path)

from llama_adapter import AdapterConfig, ModelConfig, Transformer
from llama_adapter.backends import install
from llama_adapter.inference.generate import generate_tokens

SHAPE = SMOLLM2_135M
ADAPTER = dict(prompt_length=10, layers=28)


def build_ours(dtype: torch.dtype, n_adapters: int) -> Transformer:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(ModelConfig(**SHAPE))  # type: ignore[arg-type]
    model.to_empty(device="cpu")
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in n else torch.randn_like(p) * 0.02)
    model.to(dtype)
    model.freeze_base()
    model.eval()
    install(model)  # the compute backend for the CPU, as load_model does
    for i in range(n_adapters):
        a = model.add_adapter(f"a{i}", AdapterConfig(**ADAPTER))  # type: ignore[arg-type]
        with torch.no_grad():
            a.gates.normal_(0, 0.5)
    return model


def best_of(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bandwidth_gbs() -> tuple[float, float]:
    """(copy bandwidth counting read + write, read-only bandwidth) over 256 MiB, far beyond the caches."""
    x = torch.empty(256 * 2**20, dtype=torch.uint8).fill_(1)
    y = torch.empty_like(x)
    t_copy = best_of(lambda: y.copy_(x), 5)
    xf = x.view(torch.float32)
    t_read = best_of(lambda: xf.sum(), 5)
    return 2 * x.numel() / t_copy / 1e9, x.numel() / t_read / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", choices=["peft"], default=None)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    P, N = args.prompt_len, args.new_tokens
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, SHAPE["vocab_size"], (8, P), generator=g).tolist()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, prompt {P}, "
        f"{N} new tokens, greedy"
    )

    model = build_ours(dtype, 8)
    wbytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("adapters."))
    bw, read_bw = bandwidth_gbs()
    bound, read_bound = bw * 1e9 / wbytes, read_bw * 1e9 / wbytes

    def ours(batch: int, adapters: list[str | None]) -> Callable[[], float]:
        def run() -> float:
            t = time.perf_counter()
            generate_tokens(
                model, prompts[:batch], adapter=adapters, max_new_tokens=N, temperature=0.0, ignore_eos=True
            )
            return batch * N / (time.perf_counter() - t)

        return run

    settings: dict[str, Callable[[], float]] = {
        "ours, batch 1": ours(1, ["a0"]),
        "ours, batch 8 (one adapter)": ours(8, ["a0"] * 8),
        "ours, batch 8 (8 adapters)": ours(8, [f"a{i}" for i in range(8)]),
    }
    if args.peer == "peft":
        peft = build_peft(SHAPE, ADAPTER["prompt_length"], ADAPTER["layers"], dtype).eval()
        ids = torch.tensor(prompts)

        def hf(batch: int) -> Callable[[], float]:
            x = ids[:batch]
            kw = dict(
                max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x)
            )

            def run() -> float:
                t = time.perf_counter()
                with torch.no_grad():
                    peft.generate(input_ids=x, **kw)
                return batch * N / (time.perf_counter() - t)

            return run

        settings |= {"PEFT adaption prompt, batch 1": hf(1), "PEFT adaption prompt, batch 8": hf(8)}
    for run in settings.values():  # warm-up (and the one-time kernel build and weight packing)
        run()
    got: dict[str, list[float]] = {k: [] for k in settings}
    for _ in range(args.repeat):  # interleaved, so a noisy neighbour hits every setting (ours and PEFT) alike
        for k, run in settings.items():
            got[k].append(run())
    best = {k: max(v) for k, v in got.items()}
    med = {k: statistics.median(v) for k, v in got.items()}
    r1 = best["ours, batch 1"]
    print(
        f"weights {wbytes / 1e6:.0f} MB, copy bandwidth {bw:.1f} GB/s -> batch-1 bound {bound:.0f} tok/s; "
        f"ours batch 1 = {r1 / bound:.0%} of it"
    )
    print(
        f"read bandwidth {read_bw:.1f} GB/s -> batch-1 bound {read_bound:.0f} tok/s; ours batch 1 = "
        f"{r1 / read_bound:.0%} of it"
    )
    for how, v in (("best", best), ("median", med)):
        mix = v["ours, batch 8 (8 adapters)"] / v["ours, batch 8 (one adapter)"]
        line = f"{how} of {args.repeat}: 8 different adapters / one adapter {mix:.2f}x"
        if args.peer == "peft":
            line += (
                f"; vs PEFT: batch 1 {v['ours, batch 1'] / v['PEFT adaption prompt, batch 1']:.1f}x, "
                f"batch 8 {v['ours, batch 8 (one adapter)'] / v['PEFT adaption prompt, batch 8']:.1f}x"
            )
        print(line)
    rows = [(k, best[k], med[k]) for k in settings]
    print("\n| setting | tokens/s (best) | tokens/s (median) |\n|---|---:|---:|")
    for name, b, m in rows:
        print(f"| {name} | {b:.1f} | {m:.1f} |")


if __name__ == "__main__":
    main()
