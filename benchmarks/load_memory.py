"""Peak memory of `load_model`: does a checkpoint load without a second full copy of its weights?

Writes a random checkpoint of a real shape (default TinyLlama-1.1B, bf16 safetensors, HF layout) and loads it in
a fresh process, reporting peak RSS and anonymous (non-file-backed) memory next to the weights' size. Clean
file-backed pages of the memory-mapped file count in RSS but can be dropped by the kernel at any time.

    python benchmarks/load_memory.py [--shape tinyllama|smollm2-135m] [--dtype bf16|fp32] [--dir /tmp/ckpt]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "tinyllama": dict(
        vocab_size=32000,
        hidden_size=2048,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
    ),
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        tie_word_embeddings=True,
    ),
}


def write_checkpoint(path: Path, shape: str) -> None:
    import torch
    from safetensors.torch import save_file

    s = SHAPES[shape]
    d, n, h, kv, m, v = (
        s["hidden_size"],
        s["num_hidden_layers"],
        s["num_attention_heads"],
        s["num_key_value_heads"],
        s["intermediate_size"],
        s["vocab_size"],
    )
    hd = d // h
    g = torch.Generator().manual_seed(0)

    def w(*shape_: int) -> torch.Tensor:
        return (torch.randn(*shape_, generator=g) * 0.02).to(torch.bfloat16)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    sd = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": ones(d)}
    if not s.get("tie_word_embeddings"):
        sd["lm_head.weight"] = w(v, d)
    for i in range(n):
        p = f"model.layers.{i}."
        sd.update(
            {
                p + "self_attn.q_proj.weight": w(h * hd, d),
                p + "self_attn.k_proj.weight": w(kv * hd, d),
                p + "self_attn.v_proj.weight": w(kv * hd, d),
                p + "self_attn.o_proj.weight": w(d, h * hd),
                p + "mlp.gate_proj.weight": w(m, d),
                p + "mlp.up_proj.weight": w(m, d),
                p + "mlp.down_proj.weight": w(d, m),
                p + "input_layernorm.weight": ones(d),
                p + "post_attention_layernorm.weight": ones(d),
            }
        )
    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "rms_norm_eps": 1e-5, **s}))


def _hwm() -> int:
    """Peak RSS of this process image (VmHWM restarts at exec, unlike ru_maxrss which a fork inherits)."""
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024


def child(path: str, dtype: str) -> None:
    import llama_adapter as la

    t = time.perf_counter()
    model = la.load_model(path, dtype=dtype)  # ("bf16" / "fp32": load_model takes the names)
    secs = time.perf_counter() - t
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    status = Path("/proc/self/status").read_text()
    anon = int(status.split("RssAnon:")[1].split()[0]) * 1024 if "RssAnon:" in status else -1
    print(
        json.dumps(
            {
                "load_s": round(secs, 2),
                "weights_bytes": weights,
                "peak_rss_bytes": _hwm(),
                "anon_rss_after_load_bytes": anon,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tinyllama", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--dir", default="/tmp/llama_adapter_load_bench")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.dtype)
    path = Path(a.dir) / a.shape
    if not (path / "model.safetensors").is_file():
        write_checkpoint(path, a.shape)
    base = subprocess.run(
        [
            sys.executable,
            "-c",
            "import llama_adapter, torch, pathlib; print(int(pathlib.Path("
            "'/proc/self/status').read_text().split('VmHWM:')[1].split()[0]) * 1024)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(path), "--dtype", a.dtype], capture_output=True, text=True, check=True
    )
    r = json.loads(out.stdout)
    r.update(
        shape=a.shape,
        dtype=a.dtype,
        import_rss_bytes=int(base.stdout),
        file_bytes=(path / "model.safetensors").stat().st_size,
    )
    gib = 2**30
    extra = r["peak_rss_bytes"] - r["import_rss_bytes"]
    r["peak_rss_minus_import_over_weights"] = round(extra / r["weights_bytes"], 3)
    print(json.dumps(r, indent=2))
    print(
        f"weights {r['weights_bytes'] / gib:.2f} GiB, peak RSS above import "
        f"{(r['peak_rss_bytes'] - r['import_rss_bytes']) / gib:.2f} GiB, anonymous after load "
        f"{r['anon_rss_after_load_bytes'] / gib:.2f} GiB"
    )


if __name__ == "__main__":
    main()
