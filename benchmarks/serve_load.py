"""Serving load on loopback: the OpenAI server in-process, the SmolLM2-135M shape with random bf16 weights (a
benchmark, not a test).

    python benchmarks/serve_load.py --out serve_load.json           # full run
    python benchmarks/serve_load.py --quick                         # about 3-4 minutes on 2 cores

For 1, 8 and 32 concurrent clients, with one adapter and with 16 adapters drawn at random per request, a fixed
number of streaming /v1/completions requests (greedy, `max_tokens` each) is sent with httpx; every setting also has
a time limit. Reported: requests/s and generated tokens/s (usage's completion tokens / wall time of the setting),
p50/p90/p99 time to first token (request sent -> first SSE chunk) and inter-token latency (per request:
(last chunk - first chunk) / (completion tokens - 1), then percentiles over requests: a mean per request, robust
to tokens whose text is empty and so sends no chunk).

Tokenizer: the random model has no tokenizer of its own, and the server needs one, so it gets the builtin base's
(1024 tokens, all ids valid in the 49152-token vocabulary). Its prompts are text. So that generated tokens decode
to text (one chunk per token), the embedding rows of ids >= 1024 are zeroed: with tied embeddings their logits
are 0, and greedy decoding picks an id the tokenizer knows; the compute per step is that of the real shape.

Targets (PASS/FAIL printed): 16 random adapters >= 0.9x the tokens/s of one adapter at 32 clients; p99 TTFT at
8 clients <= 3x its p50.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

sys.path.insert(0, str(Path(__file__).parent))
from decode_throughput import build_ours  # noqa: E402

import llama_adapter as la  # noqa: E402
from llama_adapter.serving.app import GracefulServer, create_app  # noqa: E402

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def build_model(n_adapters: int) -> la.Transformer:
    model = build_ours(torch.bfloat16, n_adapters)
    tok = la.load_model("builtin").tokenizer
    assert tok is not None
    with torch.no_grad():
        model.tok_embeddings.weight[tok.vocab_size :] = 0  # see the module docstring: only known ids are picked
    model.tokenizer = tok
    return model


def start(model: la.Transformer, batch: int) -> tuple[GracefulServer, threading.Thread, str]:
    app = create_app(model, max_batch_size=batch, max_queue=512, max_context=512)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = GracefulServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"), grace_s=0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


async def one(client: httpx.AsyncClient, model: str, max_tokens: int) -> dict[str, float]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                raise RuntimeError(obj["error"])
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            elif obj["choices"] and obj["choices"][0]["text"]:
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
    ttft = (first or time.perf_counter()) - t0
    itl = (last - first) / (tokens - 1) if first is not None and last is not None and tokens > 1 else float("nan")
    return {"ttft": ttft, "itl": itl, "tokens": tokens}


async def setting(url: str, clients: int, adapters: list[str], n: int, max_tokens: int, limit_s: float) -> dict:
    rng = random.Random(clients * 100 + len(adapters))
    sem = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(base_url=url, timeout=limit_s, limits=httpx.Limits(max_connections=clients)) as c:

        async def task() -> dict[str, float]:
            async with sem:
                return await one(c, rng.choice(adapters), max_tokens)

        t0 = time.perf_counter()
        res = await asyncio.wait_for(asyncio.gather(*(task() for _ in range(n))), timeout=limit_s)
        wall = time.perf_counter() - t0

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(x for x in xs if x == x)
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")

    ttft, itl = [r["ttft"] for r in res], [r["itl"] for r in res]
    return {
        "clients": clients,
        "adapters": len(adapters),
        "requests": n,
        "wall_s": wall,
        "requests_per_s": n / wall,
        "tokens_per_s": sum(r["tokens"] for r in res) / wall,
        **{f"ttft_p{q}": pct(ttft, q / 100) for q in (50, 90, 99)},
        **{f"itl_p{q}": pct(itl, q / 100) for q in (50, 90, 99)},
        "mean_tokens": statistics.mean(r["tokens"] for r in res),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests and tokens (about 3-4 minutes on 2 cores)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--limit-s", type=float, default=600.0, help="time limit of each setting (default: 600)")
    args = ap.parse_args()
    # requests per setting: per_client x clients, at least `least` (percentiles need some)
    max_tokens = 16 if args.quick else 64
    per_client, least = (16, 64) if args.quick else (32, 128)
    torch.manual_seed(0)
    model = build_model(16)
    server, thread, url = start(model, batch=32)
    rows: list[dict[str, Any]] = []
    try:
        asyncio.run(setting(url, 1, ["a0"], 2, max_tokens, args.limit_s))  # warm-up
        for clients in (1, 8, 32):
            n = max(least, per_client * clients)
            for adapters in (["a0"], [f"a{i}" for i in range(16)]):
                rows.append(asyncio.run(setting(url, clients, adapters, n, max_tokens, args.limit_s)))
                print(f"  {clients} clients, {len(adapters)} adapters: done", flush=True)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    print(f"\nserve_load {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, max_tokens {max_tokens}")
    print("| clients | adapters | requests | req/s | tok/s | TTFT p50/p90/p99 (ms) | ITL p50/p90/p99 (ms) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ttft = "/".join(f"{1000 * r[f'ttft_p{q}']:.0f}" for q in (50, 90, 99))
        itl = "/".join(f"{1000 * r[f'itl_p{q}']:.0f}" for q in (50, 90, 99))
        print(
            f"| {r['clients']} | {r['adapters']} | {r['requests']} | {r['requests_per_s']:.2f} "
            f"| {r['tokens_per_s']:.1f} | {ttft} | {itl} |"
        )
    by = {(r["clients"], r["adapters"]): r for r in rows}
    ratio = by[32, 16]["tokens_per_s"] / by[32, 1]["tokens_per_s"]
    spread = by[8, 1]["ttft_p99"] / by[8, 1]["ttft_p50"]
    targets = {
        "16 random adapters >= 0.9x one adapter's tokens/s at 32 clients": (ratio >= 0.9, f"{ratio:.2f}x"),
        "p99 TTFT <= 3x p50 at 8 clients (1 adapter)": (spread <= 3.0, f"{spread:.2f}x"),
    }
    for name, (ok, got) in targets.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name} ({got})")
    if args.out:
        out = {
            "max_tokens": max_tokens,
            "rows": rows,
            "targets": {k: {"pass": v[0], "value": v[1]} for k, v in targets.items()},
        }
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0 if all(ok for ok, _ in targets.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
