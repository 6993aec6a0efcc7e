"""The decode-time matrix products alone, on the SmolLM2-135M shape (a benchmark, not a test).

    python benchmarks/matvec.py

For 1, 2, 4, 8 and 32 input rows: the 121 weights of one decode step (30 layers x 4 projections + the tied
output) through the C++ blocked kernel, oneDNN's packed product and plain `F.linear`, and a plain read of the
same bytes (a max over them, as int16) for reference. Every variant runs once per round, rounds interleaved;
min and median milliseconds over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from llama_adapter.backends.cpu import kernels as cpu_kernels

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    args = ap.parse_args()
    torch.manual_seed(0)
    ws = [torch.randn(o, i).mul(0.02).bfloat16() for o, i in SHAPES]
    blocked = [cpu_kernels.pack_linear(w, "blocked") for w in ws]
    onednn = [cpu_kernels.pack_linear(w, "onednn") for w in ws]
    nbytes = sum(w.numel() * 2 for w in ws)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(ws)} weights, {nbytes / 1e6:.0f} MB "
        f"bf16; C++ kernels: {cpu_kernels.native_unavailable() or 'built'}"
    )
    print("| rows | variant | min ms | median ms | GB/s of weights (min) |\n|---:|---|---:|---:|---:|")
    with torch.no_grad():
        for m in args.rows:
            xs = {i: torch.randn(m, i).bfloat16() for _, i in SHAPES}

            def through(packs: list[cpu_kernels.PackedWeight | None], xs: dict[int, torch.Tensor] = xs) -> list:
                return [cpu_kernels.linear(xs[w.shape[1]], w, None, p) for w, p in zip(ws, packs, strict=True)]

            variants: dict[str, Callable[[], object]] = {
                "plain read (reference)": lambda: [w.view(torch.int16).max() for w in ws],
                "F.linear": lambda: through([None] * len(ws)),
            }
            if onednn[0] is not None:
                variants["oneDNN packed"] = lambda: through(onednn)
            if blocked[0] is not None:
                variants["blocked (C++)"] = lambda: through(blocked)
            times: dict[str, list[float]] = {k: [] for k in variants}
            for fn in variants.values():
                fn()
            for _ in range(args.rounds):
                for k, fn in variants.items():
                    t = time.perf_counter()
                    fn()
                    times[k].append((time.perf_counter() - t) * 1e3)
            for k, v in times.items():
                print(f"| {m} | {k} | {min(v):.1f} | {statistics.median(v):.1f} | {nbytes / min(v) / 1e6:.1f} |")


if __name__ == "__main__":
    main()
