"""CPU fast paths for the frozen base's non-matmul work, equal in value to the stock PyTorch ops.

Training: an adapter's backward pass runs through every frozen layer above the lowest adapted one, so on a CPU
the elementwise work and attention of that pass cost as much as the matmuls they sit between
(`benchmarks/train_throughput.py`). Autograd's generic graph for an RMSNorm is eight kernels forward and more
backward; PyTorch's flash-attention kernel for CPUs is tuned for long sequences and slow at 256 tokens with
64-wide heads, and its per-call cost dominates when decoding one token per row against a short cache.
These functions compute the same values with fewer, larger kernels. The CPU backend (`backends.cpu`) reaches
them through its module subclasses; GPUs keep the stock paths, where the fused SDPA kernels win.

Decoding reads every weight once per step for a few rows. `pack_linear` lays a frozen bf16 weight out once for that:
in 4-row blocks that are one sequential stream each for the C++ kernel (`native()`,
backends/cpu/csrc/decode_cpu.cpp, on CPUs with AVX512-BF16), or else in oneDNN's blocked layout (the one inductor's
freezing pass uses). `linear` then uses the pack whenever no gradient is wanted, and falls back to `F.linear`
whenever the pack no longer matches its weight. The oneDNN pack gives bit-identical results; the C++ kernel sums in
a different order (fp32 sums of bf16 products, like oneDNN), so results agree to bf16 rounding.

The C++ kernels are compiled by `torch.utils.cpp_extension` on first use (a C++ compiler is needed; the build is
cached under ~/.cache/torch_extensions). Without a compiler, on other CPUs, or with LLAMA_ADAPTER_CPU_KERNELS=0,
everything runs on the PyTorch paths, which compute the same things.
"""

from __future__ import annotations

import contextlib
import functools
import math
import mmap
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from llama_adapter.zero_init_attention import PromptKV


def use_cpu_training_kernels(x: Tensor) -> bool:
    return x.device.type == "cpu" and torch.is_grad_enabled()


_NATIVE_SOURCE = Path(__file__).parent / "csrc" / "decode_cpu.cpp"
_native: dict[str, Any] = {}


def native() -> Any | None:
    """The compiled C++ kernels (csrc/decode_cpu.cpp), or None where they are unavailable (`native_unavailable`)."""
    if "ext" in _native:
        return _native["ext"]
    _native["ext"], _native["why"] = None, None
    if os.environ.get("LLAMA_ADAPTER_CPU_KERNELS", "1") == "0":
        _native["why"] = "disabled by LLAMA_ADAPTER_CPU_KERNELS=0"
        return None
    try:
        from torch.utils import cpp_extension

        name = "llama_adapter_decode_cpu"
        try:
            build_dir = Path(cpp_extension._get_build_directory(name, False))
            built = any(build_dir.glob(f"{name}*.so"))
            clear_stale_build_lock(build_dir)
        except Exception:  # a private helper; only decides whether to announce the build
            built = True
        if not built:
            print("llama-adapter: compiling the CPU kernels (first use only, about a minute)...", file=sys.stderr)
        t = time.perf_counter()
        ext = cpp_extension.load(
            name, [str(_NATIVE_SOURCE)], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False
        )
        if time.perf_counter() - t > 5:
            print(
                f"llama-adapter: built the CPU kernels in {time.perf_counter() - t:.0f} s (cached for next time)",
                file=sys.stderr,
            )
        _native["ext"], _native["bf16_dot"] = ext, bool(ext.has_bf16_dot())
        # the blocked bf16 product of decoding: AVX512-BF16 dot products, or AVX2 FMAs on the widened weights
        _native["blocked"] = bool(getattr(ext, "has_blocked_linear", ext.has_bf16_dot)())
        _native["int8"] = bool(getattr(ext, "has_int8_linear", lambda: False)())
        # SLEEF's vector expf as libtorch exports it, and AVX512-BF16: the exact SwiGLU (decoding's and training's)
        # and the training loss's softmax
        _native["exact_silu"] = bool(getattr(ext, "has_exact_silu", lambda: False)())
        # AVX2 without AVX512-BF16: SLEEF's 8-wide expf, the SwiGLU of a forward without gradients (ATen's values)
        _native["silu_rows"] = bool(getattr(ext, "has_silu_rows_avx2", lambda: False)())
        # the engine of training's causal attention in one pass per key/value group: "amx" (AMX-BF16 tiles usable
        # by this process), "avx512" (AVX512-BF16 dot products) or "" (ATen's batched products)
        _native["fused_attention"] = str(getattr(ext, "fused_attention_kind", lambda: "")())
    except Exception as e:  # no compiler, no headers, unsupported platform: the PyTorch paths still work
        lines = str(e).strip().splitlines()
        _native["why"] = f"{type(e).__name__}: {lines[-1] if lines else ''}"
        print(f"llama-adapter: CPU kernels unavailable ({_native['why']}); using plain PyTorch", file=sys.stderr)
    return _native["ext"]


STALE_LOCK_S = 600  # a build takes about a minute; a lock this old was left by a build that was killed


def clear_stale_build_lock(build_dir: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove the build lock an interrupted build left behind (Ctrl-C during the first build); True if removed.

    torch's extension builder waits on that lock forever, so without this every later run would hang silently.
    """
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return False
    if age < max_age_s:
        return False  # another process may be building right now
    print(f"llama-adapter: removing a stale build lock ({lock}, {age / 60:.0f} min old)", file=sys.stderr)
    lock.unlink(missing_ok=True)
    return True


def native_with(feature: str) -> Any | None:
    """The compiled kernels where this CPU has what `feature` needs, read once at load ("bf16_dot": AVX512-BF16;
    "exact_silu": that and libtorch's SLEEF expf; "blocked" and "int8": the decode products, AVX-512 or AVX2 with
    FMA; "fused_attention": an engine for training's causal attention), else None."""
    ext = native()
    return ext if ext is not None and _native.get(feature, False) else None


def native_unavailable() -> str | None:
    return _native.get("why")


@dataclass
class PackedWeight:
    """A frozen weight laid out for decoding ("blocked": the C++ kernel's, "onednn": oneDNN's), valid while the
    weight tensor is the one it was made from."""

    packed: Tensor
    source: Tensor
    version: int
    data_ptr: int
    kind: str = "onednn"

    def valid_for(self, weight: Tensor) -> bool:
        return weight is self.source and weight._version == self.version and weight.data_ptr() == self.data_ptr


def available_memory() -> int | None:
    """Bytes of memory available for new allocations (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def can_pack(weight: Tensor) -> bool:
    """A plain frozen bf16 matrix on the CPU (not a quantized tensor subclass, which reports its original dtype)."""
    return (
        type(weight) in (Tensor, torch.nn.Parameter)
        and weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and not weight.is_inference()
    )  # (an inference tensor has no version counter to tell a changed weight)


@functools.cache
def _onednn_bf16() -> bool:
    """oneDNN multiplies bf16 matrices on this CPU (AVX512-BF16, AMX, AVX-512 or AVX2-VNNI-NE); elsewhere (AVX2 alone:
    AMD Zen 2/3, Intel client CPUs before them) ATen's bf16 matmul falls back to plain loops, ~7x slower than its
    fp32 one (19.5 against 147 GFLOP/s on the 2-core Zen 3 VM of docs/speed/decoding.md)."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (
        mkldnn is not None
        and torch.backends.mkldnn.is_available()
        and hasattr(mkldnn, "_reorder_linear_weight")
        and hasattr(mkldnn, "_linear_pointwise")
        and bool(mkldnn._is_mkldnn_bf16_supported())
    )


def _blocked_kernel(weight: Tensor) -> Any | None:
    """The C++ extension where a packable `weight` takes its blocked layout (AVX512-BF16 or AVX2, K % 32 == 0),
    else None."""
    return native_with("blocked") if weight.shape[1] % 32 == 0 else None


def pack_linear(weight: Tensor, kind: str | None = None) -> PackedWeight | None:
    """The decode-time layout of a frozen [out, in] bf16 weight on a CPU (`kind`: "blocked", "onednn" or the best
    available), or None where there is none."""
    if not can_pack(weight):
        return None
    w = weight.detach()
    with torch.no_grad():
        ext = _blocked_kernel(weight) if kind in (None, "blocked") else None
        if ext is not None:
            return PackedWeight(ext.pack(w), weight, weight._version, weight.data_ptr(), "blocked")
        if kind in (None, "onednn") and _onednn_bf16():
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
            return PackedWeight(packed, weight, weight._version, weight.data_ptr(), "onednn")
    return None


HUGE_PAGE = 2 << 20  # bytes of an x86-64 transparent huge page


class HugePageArena:
    """`nbytes` of fresh memory starting on a 2 MiB boundary, which Linux backs with transparent huge pages where its
    THP mode allows it (`madvise` or `always`; plain memory elsewhere), filled front to back by `take`.

    Decoding streams every packed weight once per step. In 4 KiB pages the SmolLM2-135M step's 269 MB are 66K
    pages, each a page walk for the streaming loads and prefetches; from one arena in 2 MiB pages the step's
    products streamed 4.6 % and 8.2 % faster than from a tensor per weight on the AMD EPYC VM (two runs, paired
    medians of 300 alternations; the same arena in 4 KiB pages: 2.7-6.5 % slower). PyTorch's own allocator asks for
    huge pages only with THP_MEM_ALLOC_ENABLE=1, which `import llama_adapter` can set only before torch is
    imported, and only for tensors of >= 2 MiB (most single projections are smaller): so the weights a decode step
    streams share one arena of their own (`pack_linears`, `quantize.int8_into_huge_pages`)."""

    def __init__(self, nbytes: int) -> None:
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        if advice is None or nbytes < HUGE_PAGE:
            self.bytes = torch.empty(nbytes, dtype=torch.uint8)
        else:
            mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            with contextlib.suppress(OSError):  # (THP "never", or a kernel without it: 4 KiB pages)
                mapping.madvise(advice)
            whole = torch.from_numpy(np.frombuffer(mapping, dtype=np.uint8))  # (the array keeps the mapping alive)
            start = -whole.data_ptr() % HUGE_PAGE
            self.bytes = whole[start : start + nbytes]
        self.used = 0

    def take(self, t: Tensor) -> Tensor:
        """A copy of the contiguous `t` in the arena's next free bytes (they live as long as any tensor taken)."""
        n = t.numel() * t.element_size()
        home = self.bytes[self.used : self.used + n].view(t.dtype).view(t.shape)
        home.copy_(t)
        self.used += n
        return home


def _blocked_numel(weight: Tensor) -> int | None:
    """Elements of `pack_linear(weight)`'s blocked layout ([ceil(N / 4), K / 32, 4, 32]), or None where it would
    not take that layout."""
    if not can_pack(weight) or _blocked_kernel(weight) is None:
        return None
    return (weight.shape[0] + 3) // 4 * 4 * weight.shape[1]


def pack_linears(weights: Sequence[Tensor]) -> list[PackedWeight | None]:
    """`pack_linear` of each weight, the blocked packs laid end to end in one `HugePageArena` (each pack is made,
    copied in and dropped in turn: the arena is the only lasting copy)."""
    sizes = [_blocked_numel(w) for w in weights]
    total = sum(n for n in sizes if n is not None)
    if total * 2 < HUGE_PAGE:
        return [pack_linear(w) for w in weights]
    arena = HugePageArena(total * 2)
    out: list[PackedWeight | None] = []
    for w, n in zip(weights, sizes, strict=True):
        p = pack_linear(w)
        if p is not None and n is not None and p.kind == "blocked" and p.packed.numel() == n:
            p = PackedWeight(arena.take(p.packed), p.source, p.version, p.data_ptr, p.kind)
        out.append(p)
    return out


@dataclass
class Projection:
    """One frozen projection as the C++ decode plan (`fused_decode`) runs it: `kind` 0: a "blocked" bf16 pack (`a`);
    1: int8 rows `a` [N, K] with fp32 row scales `b` (`linear_int8`); 2: ATen's CPU int4 pack `a` with its
    scale_and_zero `b`, groups of `group` inputs. `bias` in the dtype the kernel adds it in; `n` output features."""

    kind: int
    a: Tensor
    b: Tensor
    bias: Tensor | None
    n: int
    group: int = 0


BLOCKED_MAX_ROWS = 32  # measured on the SmolLM2-135M shape: the blocked kernel wins up to here, F.linear beyond


def widens_bf16_products(x: Tensor, weight: Tensor) -> bool:
    """Whether a product of these operands takes `widened_linear` / `widened_mm`: both bf16 on a CPU where oneDNN
    has no bf16 matmul (`_onednn_bf16`), so ATen's would run its plain loops, and the weight frozen (not inside a
    compiled block, which leaves its products to inductor)."""
    return not weight.requires_grad and weight.dtype == torch.bfloat16 and _widens(x)


def _widens(x: Tensor) -> bool:
    """bf16 products of `x` take fp32 on the widened operands (see `widens_bf16_products`)."""
    return (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not _onednn_bf16()
    )


class _WidenedFrozenLinear(torch.autograd.Function):
    """x W^T + b for bf16 x and a frozen bf16 W (and b) as ATen's fp32 matmul of the widened operands, rounded once
    to bf16; backward dx = g W the same way. bf16 products are exact in fp32 and ATen's bf16 matmul sums in fp32
    too, so the values are its values up to the order of the sums: on the Zen 3 VM (AVX2, no AVX-512) ATen's fp32
    matmul ran 114-121 GFLOP/s there against ~20 for its bf16 one, the widening a pass over the weight a call."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None]:
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        dx = torch.mm(g.reshape(-1, g.shape[-1]).float(), weight.float()).to(g.dtype)
        return dx.view(*g.shape[:-1], weight.shape[1]), None, None


def widened_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return _WidenedFrozenLinear.apply(x, weight, bias)


def widened_mm(a: Tensor, b: Tensor, out: Tensor) -> None:
    """out = a @ b (bf16, no gradient) as ATen's fp32 matmul of the widened operands, rounded once."""
    out.copy_(torch.mm(a.float(), b.float()))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, packed: PackedWeight | None) -> Tensor:
    """F.linear, through the packed weight when there is a valid one and no gradient is wanted; where bf16 products
    would run ATen's plain loops (`widens_bf16_products`), in fp32 on the widened operands."""
    if packed is None or torch.is_grad_enabled() or x.dtype != weight.dtype or not packed.valid_for(weight):
        if widens_bf16_products(x, weight) and (bias is None or not bias.requires_grad):
            return widened_linear(x, weight, bias)
        return F.linear(x, weight, bias)
    if packed.kind == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, packed.packed, bias, "none", [], "")
    rows = x.numel() // x.shape[-1]
    if rows > BLOCKED_MAX_ROWS and _onednn_bf16():  # a prefill: compute-bound, where oneDNN's own GEMM is faster
        return F.linear(x, weight, bias)
    ext = native()
    assert ext is not None  # a "blocked" pack is only ever made by the compiled kernels
    out = ext.linear(x.reshape(rows, x.shape[-1]).contiguous(), packed.packed, weight.shape[0], bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def blocked_projection(weight: Tensor, bias: Tensor | None, packed: PackedWeight | None) -> Projection | None:
    """The decode plan's projection for a weight with a valid "blocked" pack, else None."""
    if packed is None or packed.kind != "blocked" or not packed.valid_for(weight):
        return None
    return Projection(0, packed.packed, torch.empty(0), bias, weight.shape[0])


def int8_projection(qdata: Tensor, scale: Tensor, bias: Tensor | None) -> Projection | None:
    """The decode plan's projection for int8 rows with one scale each, where `linear_int8`'s kernel takes them."""
    if qdata.dtype != torch.int8 or qdata.shape[1] % 16 != 0 or native_with("int8") is None:
        return None
    b = None if bias is None else bias.detach().float().contiguous()
    return Projection(1, qdata.contiguous(), scale.detach().reshape(-1).float().contiguous(), b, qdata.shape[0])


def linear_int8(x: Tensor, qdata: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor | None:
    """x (q * scale)^T in bf16 for int8 weights q [N, K] with one fp32 scale per row (torchao's `Int8Tensor`, read
    in place) through the C++ kernel; None where it does not apply (no kernels, neither AVX-512 nor AVX2, gradients,
    not bf16, K % 16, more than BLOCKED_MAX_ROWS rows where oneDNN multiplies bf16), and the caller takes torchao's
    product."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (
        torch.is_grad_enabled()
        or x.dtype != torch.bfloat16
        or x.shape[-1] % 16 != 0
        or rows == 0
        or (rows > BLOCKED_MAX_ROWS and _onednn_bf16())  # (torchao's product widens to a bf16 matmul: ATen's loops)
        or qdata.dtype != torch.int8
    ):
        return None
    ext = native_with("int8")
    if ext is None:
        return None
    b = None if bias is None else bias.float()
    xr, sc = x.reshape(rows, x.shape[-1]).contiguous(), scale.reshape(-1).float().contiguous()
    out = ext.linear_int8(xr, qdata.contiguous(), sc, b)
    return out.view(*x.shape[:-1], qdata.shape[0])


def argmax_rows(logits: Tensor) -> Tensor | None:
    """`logits.argmax(-1)` of bf16 logits [B, vocab] on the CPU through the C++ kernel (the same indices: the first
    of each row's maximum, a row's first NaN where it has one); None where it does not apply."""
    if logits.dtype != torch.bfloat16 or logits.dim() != 2 or logits.device.type != "cpu" or logits.shape[1] == 0:
        return None
    ext = native()
    if ext is None or not hasattr(ext, "argmax_rows"):
        return None
    return ext.argmax_rows(logits.contiguous())


def sample_rows(
    logits: Tensor, temperature: Tensor, top_p: Tensor, top_k: Tensor, u: Tensor, greedy: Tensor
) -> Tensor | None:
    """`inference.sampling.sample_at` for CPU logits [B, V] (bf16 or fp32) in one C++ pass a row (the tokens within
    e^-12 of the best ranked, the whole row only where they hold less than top_p); None where it does not apply."""
    if logits.dim() != 2 or logits.device.type != "cpu" or logits.dtype not in (torch.bfloat16, torch.float32):
        return None
    ext = native()
    if ext is None or not hasattr(ext, "sample_rows") or logits.shape[1] == 0:
        return None
    return ext.sample_rows(logits.contiguous(), temperature, top_p, top_k, u, greedy)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up of h = [gate | up] [rows, 2F] bf16, forward and backward one C++ pass each."""

    @staticmethod
    def forward(ctx: Any, h: Tensor) -> Tensor:
        ctx.save_for_backward(h)
        return native().silu_mul(h)  # type: ignore[union-attr]  # (swiglu checked the kernels are there)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (h,) = ctx.saved_tensors
        return native().silu_mul_backward(h, g.contiguous())  # type: ignore[union-attr]


def swiglu(h: Tensor) -> Tensor | None:
    """silu(gate) * up for h = [gate | up] (..., 2F) in bf16 on a CPU, with a backward of one pass instead of
    autograd's five kernels; values and gradients are ATen's bit for bit (`silu_mul_backward` rounds where ATen's
    mul and silu_backward round). On AVX2 without AVX512-BF16 the forward alone (no gradients: a prefill's), the
    same values. None where it does not apply (neither, no SLEEF in libtorch, not bf16)."""
    if h.device.type != "cpu" or h.dtype != torch.bfloat16 or h.shape[-1] % 2:
        return None
    rows = h.reshape(-1, h.shape[-1]).contiguous()
    if native_with("exact_silu") is None:
        ext = native_with("silu_rows")  # (AVX2: a forward without gradients, a prefill's)
        if ext is None or torch.is_grad_enabled():
            return None
        return ext.silu_mul(rows).view(*h.shape[:-1], h.shape[-1] // 2)
    return _SwiGLU.apply(rows).view(*h.shape[:-1], h.shape[-1] // 2)


# ---- training: a frozen bf16 weight's products through oneDNN's pre-packed layout, where measured faster ----------
# An adapter's backward multiplies every frozen weight of the adapted layers by the output gradient (x's gradient
# = g W). On the Xeon with AMX we measured, oneDNN's GEMM with an unpacked weight ran the products with 576-wide
# outputs (g W for q/k/v, o and gate/up on the SmolLM2-135M shape) at 1.0-1.4 TFLOP/s, with W^T pre-packed
# (`mkldnn._reorder_linear_weight`) at 2.0-2.8: -10 % of the step. Elsewhere the unpacked GEMM can be as fast, so each
# direction of each weight is timed once, at its first training call, and packed where that is at least as fast; the
# packs cost a copy of those weights, so they are made only while they take < 1/4 of the available memory. (A first
# rule kept packs only where >= 10 % faster. On the AMD EPYC VM (AVX512-BF16) the packs timed 0.5-14 % faster alone,
# so about half of the layers took them, differently from run to run, while inside a step every shape ran faster
# packed (7-12 %, per-shape profiles of 5 alternations): all packed, the step 2.001 -> 1.932 s, medians of 10
# alternations, for 440 MiB of packs on the SmolLM2-135M shape.)

TRAINING_PACK_MIN_ROWS = 256  # a training batch; decoding and short calls keep the plain products
_PACK_GAIN = 1.0  # a pack is kept where it takes no longer than the plain product
MAX_TRAINING_PACKS = 3  # per module: a weight replaced more often than this trains with the plain products


@dataclass
class TrainingPack:
    """The oneDNN packs a frozen weight trains with: `fwd` of W for x W^T, `bwd` of W^T for g W; None where the plain
    product was as fast (or memory too short). Valid while the weight tensor is the one it was made from."""

    fwd: Tensor | None
    bwd: Tensor | None
    source: Tensor
    version: int

    def valid_for(self, weight: Tensor) -> bool:
        return weight is self.source and weight._version == self.version

    # oneDNN's packs are opaque tensors that cannot be copied or pickled: a copied model (copy.deepcopy, pickle) has
    # no packs and makes its own at its first training call
    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _no_pack, ()


def _no_pack() -> None:
    return None


def _best_of(fn: Any, reps: int = 3) -> float:
    fn()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _pack_fits(weight: Tensor, copies: int) -> bool:
    """oneDNN's bf16 path is there, and `copies` packs of `weight` take < 1/4 of the available memory."""
    free = available_memory()
    return _onednn_bf16() and (free is None or copies * weight.numel() * weight.element_size() <= free // 4)


def _gradient_pack(g: Tensor, w: Tensor) -> Tensor | None:
    """oneDNN's pack of W^T for the input gradient g W of x W^T, where it times no slower than the plain product at
    g's rows (`_PACK_GAIN`); else None."""
    mk = torch.ops.mkldnn
    bwd = mk._reorder_linear_weight(w.t().contiguous(), 1)
    plain = _best_of(lambda: torch.mm(g, w))
    packed = _best_of(lambda: mk._linear_pointwise(g, bwd, None, "none", [], ""))
    return bwd if packed <= _PACK_GAIN * plain else None


def training_pack(x: Tensor, weight: Tensor, bias: Tensor | None) -> TrainingPack:
    """Time the plain and the packed products of `weight` for rows like `x` (forward and backward) and keep the
    packs that win; an empty pack where oneDNN's bf16 path is missing or memory is short."""
    if not _pack_fits(weight, 2):
        return TrainingPack(None, None, weight, weight._version)
    mk = torch.ops.mkldnn
    with torch.no_grad():
        w = weight.detach()
        rows = x.detach().reshape(-1, x.shape[-1])[:1024].contiguous()
        fwd = mk._reorder_linear_weight(w, 1)
        plain = _best_of(lambda: F.linear(rows, w, bias))
        packed = _best_of(lambda: mk._linear_pointwise(rows, fwd, bias, "none", [], ""))
        keep_fwd = fwd if packed <= _PACK_GAIN * plain else None
        keep_bwd = _gradient_pack(torch.randn(rows.shape[0], w.shape[0], dtype=w.dtype), w)
    return TrainingPack(keep_fwd, keep_bwd, weight, weight._version)


def head_gradient_pack(weight: Tensor, rows: int) -> TrainingPack:
    """The training loss's gradient product (softmax - onehot) W for a frozen output matrix W [vocab, dim], `rows`
    rows at a time: a pack of W^T (`bwd`) where it times faster. On the AMD EPYC VM (AVX512-BF16) the plain product
    ran 512 x 49152 by 49152 x 576 at ~350 GFLOP/s, the packed one at ~420 (the loss 388 -> 336 ms a step of the
    SmolLM2-135M benchmark, medians of 10 alternations); the forward's product h W^T stays unpacked (it was faster).
    An empty pack where W is not a bf16 CPU matrix, oneDNN's bf16 path is missing or memory is short."""
    if not can_pack(weight) or weight.requires_grad or not _pack_fits(weight, 1):
        return TrainingPack(None, None, weight, weight._version)
    with torch.no_grad():
        w = weight.detach()
        keep_bwd = _gradient_pack(torch.randn(rows, w.shape[0], dtype=w.dtype), w)
    return TrainingPack(None, keep_bwd, weight, weight._version)


def packed_gradient_product(g: Tensor, pack: TrainingPack) -> Tensor:
    """g W through the pack of W^T (`pack.bwd`, made by `training_pack` or `head_gradient_pack`)."""
    assert pack.bwd is not None
    return torch.ops.mkldnn._linear_pointwise(g.contiguous(), pack.bwd, None, "none", [], "")


class _FrozenLinear(torch.autograd.Function):
    """x W^T + b for a frozen W (no gradient for W or b), each direction through its oneDNN pack where it has one."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, pack: TrainingPack) -> Tensor:
        ctx.weight, ctx.pack = weight, pack
        if pack.fwd is not None:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), pack.fwd, bias, "none", [], "")
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        if ctx.pack.bwd is not None:
            dx = packed_gradient_product(g, ctx.pack)
        else:
            dx = g @ ctx.weight
        return dx, None, None, None


def frozen_linear(x: Tensor, weight: Tensor, bias: Tensor | None, pack: TrainingPack) -> Tensor:
    return _FrozenLinear.apply(x, weight, bias, pack)


def cross_entropy_grad_(logits: Tensor, target: Tensor) -> Tensor | None:
    """Each row's cross-entropy (fp32 [n]) of bf16 `logits` [n, V] against `target` [n], with `logits` overwritten by
    its gradient softmax - onehot (bf16), in one C++ pass per row; None where the kernel does not apply (not a
    contiguous bf16 CPU matrix, no AVX512-BF16, no kernels), and `logits` is then untouched. Equal to the fp32 ATen
    softmax rounded to bf16 to 1 bf16 unit in the last place (the sum of exponentials is taken in another order)."""
    if logits.device.type != "cpu" or logits.dtype != torch.bfloat16 or logits.dim() != 2 or not logits.is_contiguous():
        return None
    ext = native_with("exact_silu")
    if ext is None:
        return None
    with torch.no_grad():
        return ext.cross_entropy_grad_(logits, target.to(torch.long))


class _RMSNorm(torch.autograd.Function):
    """y = w * cast(x * rsqrt(mean(x^2) + eps)), statistics in fp32 (as Llama's reference does)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        ext = _rms_ext(x, weight)
        if ext is not None:  # bf16 rows: one C++ pass (the same formula; the sum of squares in another order)
            y, r = ext.rms_norm_train(x.reshape(-1, x.shape[-1]).contiguous(), weight, eps)
            ctx.save_for_backward(x, weight, r.view(*x.shape[:-1], 1))
            return y.view(x.shape)
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, r)
        return weight * (xf * r).to(x.dtype)  # rounded twice, like the reference and the inference path

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight, r = ctx.saved_tensors
        ext = _rms_ext(x, weight)
        if ext is not None and ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]:  # a frozen weight
            rows = x.reshape(-1, x.shape[-1]).contiguous()
            dx = ext.rms_norm_train_backward(rows, weight, r.reshape(-1), dy.reshape(rows.shape).contiguous())
            return dx.view(x.shape), None, None
        xhat = x.float() * r  # (not in place: .float() of an fp32 tensor is the tensor itself)
        dxhat = dy.float() * weight.float()
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy.float() * xhat.to(x.dtype).float()).flatten(0, -2).sum(0).to(weight.dtype)
        proj = (dxhat * xhat).mean(-1, keepdim=True)
        dx = dxhat.sub_(xhat.mul_(proj)).mul_(r).to(x.dtype) if ctx.needs_input_grad[0] else None
        return dx, dw, None


def _rms_ext(x: Tensor, weight: Tensor) -> Any | None:
    """The C++ kernels where they take this RMSNorm (bf16 rows of a width divisible by 16 on AVX512-BF16), else None."""
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.shape[-1] % 16 or x.device.type != "cpu":
        return None
    return native_with("bf16_dot")


def _rms_rows_ext(x: Tensor, weight: Tensor) -> Any | None:
    """The C++ kernels where their rows without gradients are vectors (bf16 rows of a width divisible by 8): on
    AVX512-BF16 (16 lanes where the width allows) or AVX2, the CPUs of the blocked products."""
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.shape[-1] % 8 or x.device.type != "cpu":
        return None
    return native_with("blocked")


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _RMSNorm.apply(x, weight, eps)


def rms_norm_no_grad(x: Tensor, weight: Tensor, eps: float) -> Tensor | None:
    """`_RMSNorm`'s forward without autograd (a prefill's norms: the values of the decode plan's norm, one C++ call
    instead of ATen's six ops), or None where the kernel does not take it (the caller takes the stock ops)."""
    ext = _rms_rows_ext(x, weight)
    if ext is None:
        return None
    return ext.rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), weight, eps).view(x.shape)


class _AddRMSNorm(torch.autograd.Function):
    """(h = x + a, RMSNorm(h)) of bf16 training rows with a frozen weight, one C++ pass each way: the residual sum is
    written in the norm's pass, and backward adds h's gradient from its other use (the next residual) to the norm's
    in the norm's backward pass; the values of the add and `_RMSNorm`, and of autograd's accumulation, bit for bit."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, a: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        shape = x.shape
        h, y, r = _native["ext"].add_rms_norm_train(
            x.reshape(-1, shape[-1]).contiguous(), a.reshape(-1, shape[-1]).contiguous(), weight, eps
        )
        ctx.save_for_backward(h, weight, r)
        return h.view(shape), y.view(shape)

    @staticmethod
    def backward(ctx: Any, dh: Tensor | None, dy: Tensor | None) -> tuple[Tensor | None, ...]:
        h, weight, r = ctx.saved_tensors
        rows = h.shape
        if dy is None:
            dsum = dh
        else:
            dres = None if dh is None else dh.reshape(rows).contiguous()
            dsum = _native["ext"].rms_norm_train_backward(h, weight, r, dy.reshape(rows).contiguous(), dres)
            dsum = dsum.view(dy.shape)
        return dsum, dsum, None, None


def add_rms_norm(x: Tensor, a: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor] | None:
    """`RMSNorm.add_norm` for bf16 with a frozen weight in one C++ pass each way (`_AddRMSNorm`; without gradients
    its forward); None where it does not apply (no kernels, other dtypes, a weight that trains), and the
    caller takes the two ops."""
    if a.dtype != x.dtype or a.shape != x.shape or weight.requires_grad:
        return None
    if _rms_ext(x, weight) is None:
        ext = _rms_rows_ext(x, weight)  # (AVX2: a forward without gradients, a prefill's)
        if ext is None or torch.is_grad_enabled():
            return None
        D = x.shape[-1]
        h, y = ext.add_rms_norm_rows(x.reshape(-1, D).contiguous(), a.reshape(-1, D).contiguous(), weight, eps)
        return h.view(x.shape), y.view(x.shape)
    h, y = _AddRMSNorm.apply(x, a, weight, eps)
    return h, y


class _RopeQKV(torch.autograd.Function):
    """The fused q/k/v projection's output -> rotated q, k and v with heads contiguous, one C++ pass each way."""

    @staticmethod
    def forward(ctx: Any, qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv: int) -> tuple[Tensor, ...]:
        ctx.save_for_backward(cos, sin)
        return tuple(_native["ext"].rope_qkv(qkv, cos, sin, n_heads, n_kv))

    @staticmethod
    def backward(ctx: Any, dq: Tensor, dk: Tensor, dv: Tensor) -> tuple[Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        g = (dq.contiguous(), dk.contiguous(), dv.contiguous())
        return _native["ext"].rope_qkv_backward(*g, cos, sin), None, None, None, None


def rope_qkv(qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """`Attention.forward`'s rotation and head split of a training step (bf16, every row at positions 0..T-1:
    cos/sin [1, 1, T, d]), bit for bit `model.apply_rope`; None where the C++ kernel does not apply."""
    d = cos.shape[-1]
    if (
        qkv.dtype != torch.bfloat16
        or cos.dtype != torch.bfloat16
        or cos.shape[:2] != (1, 1)
        or d % 32 != 0
        or not qkv.is_contiguous()
        or native_with("blocked") is None  # (AVX512-BF16 or AVX2: the vector kernels)
    ):
        return None
    q, k, v = _RopeQKV.apply(qkv, cos.contiguous(), sin.contiguous(), n_heads, n_kv)
    return q, k, v


_causal_bias: dict[tuple[int, int, torch.dtype, torch.device], Tensor] = {}


def _key_value_groups(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q [B, H, T, d], k/v [B, n_kv, T, d] -> one batch entry per key/value head: the query heads that share it
    stacked along the sequence [B * n_kv, H / n_kv * T, d], its keys and values [B * n_kv, T, d]."""
    B, H, T, d = q.shape
    n_kv = k.shape[1]
    return q.reshape(B * n_kv, H // n_kv * T, d), k.reshape(B * n_kv, T, d), v.reshape(B * n_kv, T, d)


def _causal_forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
    """bf16 causal attention as two batched products around the C++ softmax (`causal_softmax_`): the scores and
    probabilities [B * n_kv, rep * T, T] are computed once, in place; or, where `_fused_attention` names an engine,
    the C++ pass per key/value group. Returns the output and the tensors `_causal_backward` needs (P among them, as
    autograd keeps it for the ATen version, or the fused pass's softmax row stats); ctx gets the shapes and the
    path."""
    B, H, T, d = q.shape
    n_kv = k.shape[1]
    qg, kg, vg = _key_value_groups(q, k, v)
    ctx.scale = 1.0 / math.sqrt(d)
    ctx.shape = (B, H, T, d, n_kv)
    ctx.fused = _fused_attention(T, d)
    if ctx.fused:  # one pass per group (AMX tiles or AVX512-BF16); the softmax's row stats kept instead of P
        qg, kg, vg = qg.contiguous(), kg.contiguous(), vg.contiguous()
        y, stats = _native["ext"].fused_causal_attention(qg, kg, vg, ctx.scale, ctx.fused)
        return y.view(B, H, T, d), (qg, kg, vg, stats)
    p = torch.bmm(qg, kg.transpose(1, 2))
    _native["ext"].causal_softmax_(p, T, ctx.scale)
    return torch.bmm(p, vg).view(B, H, T, d), (qg, kg, vg, p)


def _fused_attention(T: int, d: int) -> str:
    """The engine ("amx", "avx512") of the C++ kernels training's causal attention of T tokens with heads of d
    channels takes (`fused_causal_attention`, `fused_causal_attention_backward`: each key/value group's scores,
    probabilities and their gradients stay in the core's caches, only blocks on or below the diagonal are
    multiplied, and backward makes the probabilities again from the forward's row stats rather than keeping them,
    so no [T, T] tensor per layer waits for backward), or "" for the batched products below. On AMX tiles bit for
    bit the batched products and softmax passes at lengths that are multiples of 32 (oneDNN's fp32 sums of the same
    bf16 products run in the same order; tests compare them; at other lengths a key's gradient may sum its rows in
    other pieces: the kernels pad to the tiles' 32 rows inside); with AVX512-BF16 dot products (CPUs without AMX)
    the sums run in another order: within bf16 rounding of them."""
    kind = str(_native.get("fused_attention") or "")
    return kind if d in (64, 128) else ""


def _causal_backward(
    ctx: Any, saved: Sequence[Tensor], g: Tensor, dq_plus: Tensor | None = None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of q, k, v (each where ctx.needs_input_grad asks) from that of the output g; dq_plus, another
    gradient of q (a tensor of the caller's, overwritten), is added in q's product (one baddbmm_, in place) instead
    of by autograd afterwards."""
    qg, kg, vg, p = saved  # (p: the softmax's row stats where the forward took the fused kernels)
    B, H, T, d, n_kv = ctx.shape
    if ctx.fused:
        need = ctx.needs_input_grad
        plus = dq_plus.reshape(qg.shape).contiguous() if dq_plus is not None else None
        dq, dk, dv = _native["ext"].fused_causal_attention_backward(
            g.reshape(qg.shape).contiguous(), qg, kg, vg, p, ctx.scale, plus, *need[:3], ctx.fused
        )
        return (
            dq.view(B, H, T, d) if dq is not None else None,
            dk.view(B, n_kv, T, d) if dk is not None else None,
            dv.view(B, n_kv, T, d) if dv is not None else None,
        )
    gg = g.reshape(qg.shape)
    dv = torch.bmm(p.transpose(1, 2), gg).view(B, n_kv, T, d) if ctx.needs_input_grad[2] else None
    ds = torch.bmm(gg, vg.transpose(1, 2))
    _native["ext"].causal_softmax_backward_(ds, p, T, ctx.scale)
    dq = None
    if ctx.needs_input_grad[0]:
        dq = (torch.bmm(ds, kg) if dq_plus is None else dq_plus.view(qg.shape).baddbmm_(ds, kg)).view(B, H, T, d)
    dk = torch.bmm(ds.transpose(1, 2), qg).view(B, n_kv, T, d) if ctx.needs_input_grad[1] else None
    return dq, dk, dv


class _CausalAttention(torch.autograd.Function):
    """bf16 causal attention, forward and backward (`_causal_forward`, `_causal_backward`)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        y, saved = _causal_forward(ctx, q, k, v)
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return _causal_backward(ctx, ctx.saved_tensors, g)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal softmax(q k^T / sqrt(d)) v for q [B, H, T, d], k/v [B, n_kv, T, d] (grouped-query heads).

    Query heads sharing a key head are stacked along the sequence axis, so each key/value head takes part in
    one batched matmul without being repeated. bf16 with the C++ kernels: the softmax and its backward one pass
    each (`_CausalAttention`); else the scale and the causal mask ride in one baddbmm before ATen's softmax, in
    fp32 on the widened q/k/v where bf16 products would run ATen's plain loops (the result rounded once to bf16:
    on the Zen 3 VM the bf16 batched products took 8.4 s of a 17.9 s SmolLM2-135M training step).
    """
    if (
        q.dtype == torch.bfloat16
        and k.dtype == v.dtype == q.dtype
        and not torch.compiler.is_compiling()  # (a compiled block leaves attention to inductor, unbroken)
        and native_with("exact_silu") is not None
    ):
        return _CausalAttention.apply(q, k, v)
    if _widens(q):
        return causal_attention(q.float(), k.float(), v.float()).to(q.dtype)
    B, H, T, d = q.shape
    n_kv = k.shape[1]
    rep = H // n_kv
    key = (T, rep, q.dtype, q.device)
    bias = _causal_bias.get(key)
    if bias is None:
        if len(_causal_bias) > 16:
            _causal_bias.clear()
        tri = torch.full((T, T), float("-inf"), device=q.device).triu_(1)
        bias = _causal_bias[key] = tri.to(q.dtype).repeat(rep, 1)  # [rep * T, T]
    qg = q.reshape(B * n_kv, rep * T, d)
    scores = torch.baddbmm(
        bias.expand(B * n_kv, -1, -1), qg, k.reshape(B * n_kv, T, d).transpose(1, 2), alpha=1.0 / math.sqrt(d)
    )
    return torch.bmm(torch.softmax(scores, -1), v.reshape(B * n_kv, T, d)).view(B, H, T, d)


# from this many tokens a prefill's attention takes training's fused kernel (one key/value group at a time, blocks of
# queries against blocks of keys in the core's caches) rather than the decode step's one query at a time: per
# SmolLM2-135M layer (9 heads, 3 key/value heads, d 64, 2 threads, the AMD EPYC VM) 0.164 vs 0.327 ms at 128
# tokens, 1.96 vs 4.57 at 512, 7.4 vs 17.6 at 1024; equal at 32
FUSED_PREFILL_MIN_TOKENS = 64


# the CPU kernels' KV cache element types (a bf16 model's cache is bf16: `CpuBackend.kv_cache_dtype`)
KV_CACHE_DTYPES = (torch.float32, torch.bfloat16)


def prefill_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
    """Causal attention of a decoder's bf16 prefill (q [B, H, T, d]) against its cache (k/v [B, n_kv, T, d], this
    forward's own bf16 keys and values, as they are in a bf16 cache or widened in an fp32 one) by C++ kernels; None
    where it does not apply (gradients, no kernels, not bf16 queries with fp32 or bf16 keys, d % 16), and the
    caller takes SDPA (a forward without a cache is unchanged). Short prompts: the decode step's kernel, fp32
    arithmetic as the steps that follow (on CPUs with AVX2 and no AVX-512, from 16 tokens on, a blocked form of
    it: 3 query rows against 32 keys at a time, fp32 too); from FUSED_PREFILL_MIN_TOKENS on (AVX512-BF16),
    training's fused kernel on the keys and values as bf16 (exactly: they were bf16 before an fp32 cache widened
    them): fp32 sums of bf16 products, the probabilities rounded to bf16 for their product with the values, as
    training's forward and SDPA in bf16 do."""
    d = q.shape[-1]
    if torch.is_grad_enabled() or q.dtype != torch.bfloat16 or d % 16 != 0 or d > 256 or q.device.type != "cpu":
        return None
    ext = native()
    if k.dtype not in KV_CACHE_DTYPES or v.dtype != k.dtype or ext is None or not hasattr(ext, "prefill_attention"):
        return None
    B, H, T, _ = q.shape
    engine = _fused_attention(T, d)
    if T >= FUSED_PREFILL_MIN_TOKENS and engine:
        groups = _key_value_groups(q, k.to(torch.bfloat16), v.to(torch.bfloat16))
        y, _ = ext.fused_causal_attention(*(t.contiguous() for t in groups), 1.0 / math.sqrt(d), engine)
        return y.view(B, H, T, d)
    if k.stride(-1) != 1 or k.stride(-2) != d or k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    return ext.prefill_attention(q, k, v)


def cache_write(kc: Tensor, vc: Tensor, k: Tensor, v: Tensor, rows: Tensor, pos: Tensor) -> bool:
    """`Attention.store`'s two writes into an fp32 or bf16 CPU cache (kc/vc[rows, :, pos] = k/v, in the cache's
    dtype) by one C++ call; False where it does not apply (gradients, other dtypes, no kernels), and the caller takes
    ATen's index_put_."""
    if (
        torch.is_grad_enabled()
        or kc.dtype not in KV_CACHE_DTYPES
        or vc.dtype != kc.dtype
        or k.dtype not in (torch.bfloat16, torch.float32)
        or v.dtype != k.dtype
        or kc.device.type != "cpu"
        or not (kc.is_contiguous() and vc.is_contiguous())
        or k.stride(-1) != 1
        or v.stride(-1) != 1
    ):
        return False
    ext = native()
    if ext is None or not hasattr(ext, "cache_write"):
        return False
    ext.cache_write(kc, vc, k, v, rows, pos)
    return True


class _PromptAttention(torch.autograd.Function):
    """y + gate * softmax(q K_p^T / sqrt(d)) V_p (eq. 6-8's prompt half added to the token half), one C++ pass
    each way; the gradient of y is that of the output, unchanged."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, q: Tensor, pk: Tensor, pv: Tensor, gate: Tensor) -> Tensor:
        ctx.scale = 1.0 / math.sqrt(q.shape[-1])
        out, prob = _native["ext"].prompt_attention(y, q, pk, pv, gate, ctx.scale)
        ctx.save_for_backward(q, pk, pv, gate, prob)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        q, pk, pv, gate, prob = ctx.saved_tensors
        g = g.contiguous()
        dq, dk, dv, dgate = _native["ext"].prompt_attention_backward(g, q, pk, pv, gate, prob, ctx.scale)
        return g, dq, dk, dv, dgate


class _GatedCausalAttention(torch.autograd.Function):
    """Eq. 8 of a training step whole: the causal token attention (`_causal_forward`) plus the gated prompt
    attention (`prompt_attention`, added in its pass). One function instead of `_CausalAttention` then
    `_PromptAttention` because the two gradients of q then meet inside q's product in backward (a baddbmm) rather
    than in an add of autograd's, and the output gradient is made contiguous once."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor, gate: Tensor) -> Tensor:
        y, saved = _causal_forward(ctx, q, k, v)
        out, prob = _native["ext"].prompt_attention(y, q, pk, pv, gate, ctx.scale)
        ctx.save_for_backward(*saved, q, pk, pv, gate, prob)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        *saved, q, pk, pv, gate, prob = ctx.saved_tensors
        g = g.contiguous()
        dq_prompt, dpk, dpv, dgate = _native["ext"].prompt_attention_backward(g, q, pk, pv, gate, prob, ctx.scale)
        dq, dk, dv = _causal_backward(ctx, saved, g, dq_prompt) if any(ctx.needs_input_grad[:3]) else (None,) * 3
        return dq, dk, dv, dpk, dpv, dgate


def _prompt_operands(q: Tensor, prompts: PromptKV) -> tuple[Tensor, Tensor, Tensor] | None:
    """The prompt keys, values and gates [B, n_kv, K, d], [B, n_kv, K, d], [B, H] as the C++ prompt attention takes
    them for bf16 queries q [B, H, T, d]; None where it does not apply (no kernels, other dtypes, a padding mask of
    adapters with different prompt lengths, d % 16, more than 64 prompts)."""
    d = q.shape[-1]
    if (
        q.dtype != torch.bfloat16
        or prompts.k.dtype != q.dtype
        or prompts.v.dtype != q.dtype
        or prompts.mask is not None
        or d % 16 != 0
        or d > 256
        or not 1 <= prompts.k.shape[2] <= 64
        or native_with("exact_silu") is None
    ):
        return None
    B, H = q.shape[:2]
    gate = prompts.gate.float().expand(B, H).contiguous()
    pk, pv = (t.expand(B, -1, -1, -1).contiguous() for t in (prompts.k, prompts.v))
    return pk, pv, gate


def add_prompt_attention(y: Tensor, q: Tensor, prompts: PromptKV) -> Tensor | None:
    """y + the gated prompt attention of q [B, H, T, d] (`ZeroInitAttention.gated_prompt_attention`) for bf16
    training in one C++ pass each way; None where it does not apply (`_prompt_operands`), and the caller takes the
    PyTorch ops."""
    operands = _prompt_operands(q, prompts) if y.dtype == q.dtype else None
    if operands is None:
        return None
    out: Tensor = _PromptAttention.apply(y.contiguous(), q.contiguous(), *operands)
    return out


def gated_causal_attention(q: Tensor, k: Tensor, v: Tensor, prompts: PromptKV) -> Tensor | None:
    """Eq. 8 for a bf16 training step: causal attention over the tokens plus the gated prompt attention, as one
    autograd function (`_GatedCausalAttention`); None where the causal or the prompt kernel does not apply."""
    if k.dtype != q.dtype or v.dtype != q.dtype or torch.compiler.is_compiling():
        return None
    operands = _prompt_operands(q, prompts)
    if operands is None:
        return None
    out: Tensor = _GatedCausalAttention.apply(q.contiguous(), k, v, *operands)
    return out


def few_keys_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v against a few keys: q [B, n_kv, M, d], k/v [B, n_kv, K, d], mask broadcastable
    to [B, n_kv, M, K] (False = masked). Query heads of a key/value group are stacked in M by the caller."""
    return _attend(q * (1.0 / math.sqrt(q.shape[-1])), k, v, mask)


def _attend(q_scaled: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    if _widens(q_scaled):  # (as causal_attention)
        return _attend(q_scaled.float(), k.float(), v.float(), mask).to(q_scaled.dtype)
    scores = torch.matmul(q_scaled, k.transpose(-1, -2))
    if mask is not None:
        scores = torch.where(mask, scores, float("-inf"))
    return torch.matmul(F.softmax(scores, -1), v)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, prompts: PromptKV | None = None) -> Tensor:
    """One new token per row: attention over its cached keys plus the gated prompt attention of zero-init
    adapters (equation 8), in one pass. q [B, H, 1, d]; k/v [B, n_kv, L, d]; mask [B, 1, 1, L].

    Computed in fp32 from a bf16 or fp32 cache (the C++ decode step's arithmetic, which this path stands in for
    where that step does not apply): oneDNN's bf16 batched matmul costs ~200 us per call at these sizes (a new
    kernel for every cache length) and MKL's fp32 one ~20 us.
    """
    B, H, _, d = q.shape
    n_kv = k.shape[1]
    work = torch.float32 if k.dtype in (torch.bfloat16, torch.float16) else k.dtype
    qg = q.view(B, n_kv, H // n_kv, d).to(work) * (1.0 / math.sqrt(d))  # a group's query heads are its rows
    y = _attend(qg, k.to(work), v.to(work), mask)
    if prompts is not None:
        gate = prompts.gate.view(B, n_kv, H // n_kv, 1)
        pk, pv = prompts.k.to(work), prompts.v.to(work)
        y = y + _attend(qg.to(pk.dtype), pk, pv, prompts.mask) * gate
    return y.view(B, H, 1, d).to(q.dtype)
