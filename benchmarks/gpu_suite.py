"""The GPU suite: one command on a CUDA machine, one JSON and one markdown table (a benchmark, not a test).

    pip install -e ".[test,bench]"          # with the machine's CUDA build of torch already installed
    python benchmarks/gpu_suite.py          # --out runs/gpu_suite/ (default); about 5-8 minutes on one GPU
    python benchmarks/gpu_suite.py --device cpu --smoke --out /tmp/s   # the pieces, on tiny shapes, on a CPU

What it runs (random bf16 weights, adapter K=10 on the top n_layers-2 layers, everything on one device):
  (a) the test suite on the device: `python -m pytest --device cuda`, pass/fail/skip counts;
  (b) SmolLM2-135M and TinyLlama-1.1B shapes: adapter training tokens/s and peak memory
      (torch.cuda.max_memory_allocated) for ours, PEFT's adaption prompt and litgpt's adapter (when importable);
      decoding tokens/s (prompt 32, 64 new tokens, greedy, EOS ignored, prefill included) at batch 1, 8 and 64 with
      one adapter and with 8 different adapters (ours) against PEFT's `generate` (one adapter);
  (c) the Llama-2-7B shape: one training step (batch 1 and 2, seq 256, gradients only to the adapter): step time
      and peak memory, ours and PEFT.
Each measurement runs in its own subprocess on a GPU (peak memory is that configuration's alone and an
out-of-memory error costs one row); a measurement that fails is recorded with its error rather than stopping
the suite. Without CUDA it refuses in one line (exit 2) unless asked for the CPU smoke run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft_peer import SMOLLM2_135M  # benchmarks/ (a script's own folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": SMOLLM2_135M,
    "tinyllama-1.1b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632),
    "llama2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008),
    "tiny": dict(vocab_size=256, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=128),  # --smoke only
}
PROMPT_LENGTH = 10
PEERS = ("peft", "litgpt")


def adapter_layers(shape: dict[str, Any]) -> int:
    """The paper's placement (30 of LLaMA-7B's 32 layers): all but the two lowest layers."""
    return max(1, shape["n_layers"] - 2)


# ---------------------------------------------------------------------------------------------- measurement tools


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    """Peak allocated device memory since the last reset (None off CUDA: RSS would mix in the interpreter)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def random_ids(vocab: int, batch: int, seq: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)


# ---------------------------------------------------------------------------------------------------- the models


def build_ours(shape: dict[str, Any], device: torch.device, n_adapters: int):  # noqa: ANN201
    """Random frozen bf16 base on the device (built on `meta`, materialised there: no CPU copy of a 7B model),
    its backend installed as `load_model` does, and n adapters with non-zero gates."""
    from llama_adapter import AdapterConfig, ModelConfig, Transformer
    from llama_adapter.backends import install

    with torch.device("meta"):
        model = Transformer(ModelConfig(**{"max_seq_len": 2048, "bos_token_id": 1, "eos_token_ids": [2], **shape}))
    model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.fill_(1.0) if n.endswith("norm.weight") else p.normal_(0.0, 0.02)
    model.to(torch.bfloat16)
    model.freeze_base()
    model.eval()
    install(model)
    for i in range(n_adapters):
        a = model.add_adapter(f"a{i}", AdapterConfig(prompt_length=PROMPT_LENGTH, layers=adapter_layers(shape)))
        with torch.no_grad():
            a.gates.normal_(0, 0.5)
    return model


def build_peft(shape: dict[str, Any], device: torch.device):  # noqa: ANN201
    """transformers' Llama with the same shape, random bf16 weights, PEFT's adaption prompt (its LLaMA-Adapter)."""
    from peft_peer import build_peft as build

    return build(shape, PROMPT_LENGTH, adapter_layers(shape), torch.bfloat16, device)


def build_litgpt(shape: dict[str, Any], device: torch.device):  # noqa: ANN201
    """litgpt's adapter GPT (LLaMA layout: RMSNorm, SwiGLU, GQA) in bf16 with the adapter on the same layers."""
    from litgpt_peer import build_litgpt as build

    return build(shape, PROMPT_LENGTH, adapter_layers(shape), device)


# ---------------------------------------------------------------------------------------------- the measurements


def train(impl: str, shape: dict[str, Any], device: torch.device, batch: int, seq: int, steps: int) -> dict:
    """Adapter training steps (every position supervised, AdamW): median tokens/s and step time, peak memory."""
    ids = random_ids(shape["vocab_size"], batch, seq, device)
    reset_peak(device)
    if impl == "ours":
        from llama_adapter.training.loss import batch_loss

        model = build_ours(shape, device, 1)
        params = model.trainable_parameters("a0")
        data = {"input_ids": ids, "labels": ids.clone()}

        def loss_fn() -> torch.Tensor:
            loss, n = batch_loss(model, "a0", data)
            return loss / n

    elif impl == "peft":
        model = build_peft(shape, device)
        params = [p for p in model.parameters() if p.requires_grad]
        loss_fn = lambda: model(input_ids=ids, labels=ids).loss
    elif impl == "litgpt":
        from litgpt_peer import fresh_prompt_kv

        model = build_litgpt(shape, device)
        params = [p for p in model.parameters() if p.requires_grad]

        def loss_fn() -> torch.Tensor:
            fresh_prompt_kv(model)  # (litgpt keeps them from the first forward otherwise)
            logits = model(ids)
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    else:
        raise ValueError(impl)
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.02)
    model.train()
    losses: list[float] = []

    def step() -> None:
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    times = timed(step, device, warmup=1, repeat=steps)
    med = statistics.median(times)
    return {
        "tokens_per_s": round(batch * seq / med, 1),
        "step_time_s": round(med, 4),
        "peak_mib": peak_mib(device),
        "loss": round(losses[-1], 4),
        "trainable_params": sum(p.numel() for p in params),
    }


def decode(impl: str, shape: dict[str, Any], device: torch.device, batches: list[int], prompt: int, new: int) -> dict:
    """Greedy decoding tokens/s (generated tokens / wall time of the request, prefill included; best of 2 after
    a warm-up) per batch size; ours also with 8 different adapters in the batch."""
    prompts = random_ids(shape["vocab_size"], max(batches), prompt, torch.device("cpu"), seed=1)
    out: dict[str, Any] = {}
    if impl == "ours":
        from llama_adapter.inference.generate import generate_tokens

        model = build_ours(shape, device, 8)
        rows = prompts.tolist()

        def run(b: int, adapters: list[str | None]) -> Callable[[], object]:
            return lambda: generate_tokens(
                model,
                rows[:b],
                adapter=adapters,
                max_new_tokens=new,
                temperature=0.0,
                ignore_eos=True,
                max_batch_size=b,
            )

        for b in batches:
            settings = {"one adapter": ["a0"] * b} | ({"8 adapters": [f"a{i % 8}" for i in range(b)]} if b > 1 else {})
            for how, adapters in settings.items():
                out[f"batch {b}, {how}"] = round(b * new / min(timed(run(b, adapters), device, 1, 2)), 1)
    elif impl == "peft":
        model = build_peft(shape, device).eval()
        for b in batches:
            x = prompts[:b].to(device)
            kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

            def gen(x: torch.Tensor = x, kw: dict = kw) -> object:
                with torch.no_grad():
                    return model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)

            out[f"batch {b}, one adapter"] = round(b * new / min(timed(gen, device, 1, 2)), 1)
    else:
        raise ValueError(impl)
    out["peak_mib"] = peak_mib(device)
    return out


def measure(spec: dict[str, Any]) -> dict:
    """One measurement from its spec (what the subprocess runs)."""
    device = torch.device(spec["device"])
    shape = SHAPES[spec["shape"]]
    if spec["kind"] == "train":
        return train(spec["impl"], shape, device, spec["batch"], spec["seq"], spec["steps"])
    return decode(spec["impl"], shape, device, spec["batches"], spec["prompt"], spec["new"])


def run_spec(spec: dict[str, Any], in_process: bool, timeout: float) -> dict:
    """A measurement's result, or {"error": ...} (an import that fails, an OOM, a timeout): the suite goes on."""
    if spec["impl"] == "litgpt":
        try:
            import litgpt  # noqa: F401
        except Exception as e:  # not installed, or installed against another torch
            return {"unavailable": f"litgpt not importable ({type(e).__name__}: {e})".splitlines()[0]}
    if in_process:
        try:
            return measure(spec)
        except Exception as e:
            return {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines()
        return {"error": (lines[-1] if lines else f"exit {p.returncode}")[:300]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_tests(device: str, timeout: float) -> dict:
    """The project's test suite on the device: counts from pytest's summary line."""
    # the project's addopts already say -q (a second -q would drop the summary line); -rfE lists what failed
    cmd = [sys.executable, "-m", "pytest", "--device", device, "-rfE", "-p", "no:cacheprovider"]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd[1:]), "error": f"timed out after {timeout:.0f} s"}
    summaries = [ln for ln in p.stdout.splitlines() if re.search(r"\d+ (passed|failed|errors?) ", ln)]
    tail = summaries[-1].strip("= ") if summaries else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", tail)}
    failed = [
        ln.split(" - ")[0].split(" ", 1)[1] for ln in p.stdout.splitlines() if ln.startswith(("FAILED ", "ERROR "))
    ]
    return {
        "command": "python " + " ".join(cmd[1:]),
        "exit_code": p.returncode,
        "passed": counts.get("passed", 0),
        "failed": counts.get("failed", 0),
        "skipped": counts.get("skipped", 0),
        "errors": counts.get("errors", counts.get("error", 0)),
        "failures": failed[:50],
        "summary": tail,
        "wall_s": round(time.perf_counter() - t, 1),
    }


# ------------------------------------------------------------------------------------------------------- the plan


def plan(device: str, smoke: bool, peers: list[str]) -> list[dict[str, Any]]:
    """Every measurement, in order: the small shapes first, the 7B shape last (the likeliest to run out of time)."""
    if smoke:
        shapes, big, batches, prompt, new, seq, steps = ["tiny"], "tiny", [1, 2], 8, 4, 32, 2
    else:
        shapes, big, batches, prompt, new, seq, steps = (
            ["smollm2-135m", "tinyllama-1.1b"],
            "llama2-7b",
            [1, 8, 64],
            32,
            64,
            256,
            4,
        )
    impls = ["ours", *peers]
    specs: list[dict[str, Any]] = []
    for s in shapes:
        for impl in impls:
            specs.append(dict(section="train", kind="train", shape=s, impl=impl, batch=4, seq=seq, steps=steps))
        for impl in [i for i in impls if i != "litgpt"]:
            specs.append(
                dict(section="decode", kind="decode", shape=s, impl=impl, batches=batches, prompt=prompt, new=new)
            )
    for b in (1, 2):
        for impl in [i for i in impls if i != "litgpt"]:
            specs.append(dict(section="7b-train", kind="train", shape=big, impl=impl, batch=b, seq=seq, steps=steps))
    for s in specs:
        s["device"] = device
    return specs


def rows_of(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table row per number: section, shape, implementation, setting, tokens/s, step time, peak memory."""
    rows = []
    for r in results:
        spec, res = r["spec"], r["result"]
        base = {"section": spec["section"], "shape": spec["shape"], "impl": spec["impl"]}
        if "error" in res or "unavailable" in res:
            rows.append(base | {"setting": "-", "note": res.get("error") or res.get("unavailable")})
        elif spec["kind"] == "train":
            setting = f"batch {spec['batch']} x {spec['seq']}"
            keep = ("tokens_per_s", "step_time_s", "peak_mib")
            rows.append(base | {"setting": setting} | {k: res[k] for k in keep} | {"note": f"loss {res['loss']}"})
        else:
            for k, v in res.items():
                if k != "peak_mib":
                    rows.append(base | {"setting": k, "tokens_per_s": v, "peak_mib": res["peak_mib"], "note": ""})
    return rows


def markdown(report: dict[str, Any]) -> str:
    def cell(v: object) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).replace("|", "/")

    t = report["tests"]
    lines = [
        f"# GPU suite: {report['device_name']}",
        "",
        f"torch {report['torch']}, device {report['device']}, {report['mode']}, {report['elapsed_s']} s in all.",
        "",
        "Tests: " + (t.get("summary") or t.get("error") or t.get("skipped_reason", "-")),
        "",
        "| section | shape | impl | setting | tokens/s | step s | peak MiB | note |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        keys = ("section", "shape", "impl", "setting", "tokens_per_s", "step_time_s", "peak_mib", "note")
        lines.append("| " + " | ".join(cell(r.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu_suite/", help="folder for gpu_suite.json and gpu_suite.md")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N (or cpu with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, few steps: checks the pieces, measures nothing")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated: peft, litgpt (empty: ours only)")
    ap.add_argument("--skip-tests", action="store_true", help="skip (a), the test suite (the default with --smoke)")
    ap.add_argument("--in-process", action="store_true", help="no subprocess per measurement (the default off CUDA)")
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per measurement")
    ap.add_argument("--tests-timeout", type=float, default=240.0)
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole suite; later rows are skipped")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_suite: torch {torch.__version__} sees no CUDA device; nothing measured (CPU: --device cpu --smoke)")
        return 2
    if device.type != "cuda" and not args.smoke:
        print(f"gpu_suite: needs a CUDA device (got {device}); a CPU only runs the smoke mode: --device cpu --smoke")
        return 2
    peers = [p for p in args.peers.split(",") if p]
    if bad := [p for p in peers if p not in PEERS]:
        print(f"gpu_suite: unknown peer(s) {bad}; choose from {list(PEERS)}")
        return 2
    start = time.perf_counter()
    in_process = args.in_process or device.type != "cuda"
    if args.skip_tests or args.smoke:
        tests: dict[str, Any] = {"skipped_reason": "not run (--skip-tests or --smoke)"}
    else:
        tests = run_tests(str(device), args.tests_timeout)
        print(f"tests: {tests.get('summary') or tests.get('error')}", file=sys.stderr, flush=True)
    results = []
    for spec in plan(str(device), args.smoke, peers):
        left = args.budget - (time.perf_counter() - start)
        if left < 10:
            res = {"error": f"not run: the suite's {args.budget:.0f} s budget (--budget) was spent"}
        else:
            res = run_spec(spec, in_process, min(args.timeout, left))
        results.append({"spec": spec, "result": res})
        print(f"{spec['section']} {spec['shape']} {spec['impl']}: {res}", file=sys.stderr, flush=True)
    report: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "mode": "smoke (tiny shapes: no figure here means anything)" if args.smoke else "full",
        "peers": peers,
        "tests": tests,
        "results": results,
        "rows": rows_of(results),
        "elapsed_s": round(time.perf_counter() - start, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_suite.md").write_text(markdown(report))
    print(f"wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
