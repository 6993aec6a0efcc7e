"""8-bit and 4-bit frozen bases (`--quantize int8|int4`): weight-only quantisation by torchao, swapped in from outside.

As gpt-fast's quantiser does, this module replaces the frozen base's `nn.Linear` weights after the model is built;
`model.py` stays plain PyTorch with no quantisation branch. What changes:
- the four projections of every block (wqkv, wo, w13, w2) get a torchao weight: int8: `Int8WeightOnlyConfig`
  (symmetric, one scale per output row); int4: torchao's CPU int4 tensor (`Int4OpaqueTensor`, under
  `torchao.prototype` in 0.18: its stable `Int4WeightOnlyConfig` packs for GPU kernels only; asymmetric, one scale
  and zero per group of `INT4_GROUP_SIZE` inputs, the layout of ATen's `_weight_int4pack_mm_for_cpu`);
- an untied output head gets int8 in both modes (as llama.cpp keeps its 4-bit files' output head at 6 bits): every
  logit goes through it, and the training loss reads it whole (`dequantized()`), which int8 gives cheaply;
- the token embedding stays in the base dtype: it is a lookup, and the training loss reads a tied head whole; but
  decoding on the CPU takes the logits of a tied head from an int8 copy (`Transformer.int8_head`, 1 byte a weight
  more in memory): it is the largest single read of a step (a fifth of SmolLM2-135M), and llama.cpp's 8- and
  4-bit files quantize it too;
- their modules become `Int8Linear` / `Int4Linear` (same parameters): the CPU backend only swaps exact `nn.Linear`s,
  so it neither re-packs nor re-wraps them, and its fused decode step calls them like any projection;
- every `Attention` becomes `QuantizedAttention`, whose `kv_weights()` hands the prompts (eq. 2-4) the dequantized
  key/value rows of the same quantized projection the tokens go through.
The adapter (prompts, gates, projections) and its gradients stay in fp32 as before: gradients flow through the
frozen quantized projections to the prompts, nothing of the base is trained. A fresh adapter still leaves the
quantized base's outputs unchanged bit for bit (its gates are zero).

torchao is an optional dependency (`pip install 'llama-adapter[quant]'`); without it `--quantize` is a one-line
`QuantizeError`. Quantised bases run on the CPU (the int4 kernel is a CPU kernel), and not under FSDP (which would
have to shard torchao's tensor subclasses).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import re
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama_adapter.adapter_batch import KVWeights
from llama_adapter.backends.cpu import kernels
from llama_adapter.config import ModelConfig
from llama_adapter.errors import QuantizeError
from llama_adapter.model import Attention, Transformer

QUANTIZE_MODES = ("int8", "int4")
# inputs per int4 scale/zero group: 32, as llama.cpp's Q4_1 (5 bits a weight: 4 + 16 + 16 bits per 32). Measured
# (benchmarks/quantized_quality.py, issue 15's notes): on SmolLM2-135M read from its Q4_1 GGUF, groups of 32 keep
# the perplexity of the dequantized base (133.79 vs 133.75; they fall on the file's own blocks), 64 and 128 raise
# it to 186 and 153; 64 would save half a bit a weight. A projection whose input width is not a multiple of the
# group stays unquantized, as does one whose output width is not a multiple of INT4_ROWS (the kernel's packing).
INT4_GROUP_SIZE = 32
INT4_ROWS = 16
# rows quantized at a time (`quantize_weight`): a multiple of 64, the rows torchao's CPU int4 pack lays out together,
# so packing blocks of rows gives the pack of the whole (tests/test_quantize.py)
INT4_PACK_ROWS = 64
INT4_CHUNK_ROWS = 2 * INT4_PACK_ROWS
INT4_GROUP_SIZES = (INT4_GROUP_SIZE,)
# rows quantized to int8 at a time: one scale per row, so blocks of rows give the whole's tensors (tested); torchao's
# temporaries for a whole matrix (fp32 copies) took ~4x its bf16 size (+504 MB for TinyLlama's 32000 x 2048 head)
INT8_CHUNK_ROWS = 256
# int8 inputs of up to this many rows (decoding) that the C++ kernel does not take go to ATen's int8 weight-only
# product; more rows (a prefill) to torchao's, which widens the weight once and runs one GEMM
INT8_PACK_MAX_ROWS = 32

# the frozen projections that are quantized (state-dict names); the embedding and the norms are not
_QUANTIZED = re.compile(r"(layers\.\d+\.(attention\.(wqkv|wo)|feed_forward\.(w13|w2))|output)\.weight")


def check_quantize(mode: str | None, device: str | torch.device | None = None, fsdp: bool = False) -> None:
    """QuantizeError (one line) for a combination that cannot run: an unknown mode, a non-CPU device, FSDP, or no
    torchao. Called before anything is loaded, so the error comes first."""
    if mode is None:
        return
    if mode not in QUANTIZE_MODES:
        raise QuantizeError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, not {mode!r}")
    if fsdp:
        raise QuantizeError(f"--quantize {mode} cannot be combined with --fsdp (FSDP does not shard quantized weights)")
    if device is not None and torch.device(device).type != "cpu":
        raise QuantizeError(f"--quantize {mode} runs on the CPU only (the base was asked for on {device})")
    _torchao(mode)


# what importing torchao logs that is not ours to act on: its CUDA-only extensions that a CPU machine cannot load
# ("Failed to load .../_C_mxfp8...so"), torch's deprecation of its Enum registrations. A user of --quantize saw both
# before the first line of their answer.
_IMPORT_NOISE = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _IMPORT_NOISE]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _torchao(mode: str) -> Any:
    """The torchao config for `mode`; QuantizeError when torchao (or its CPU int4 tensor) cannot be imported."""
    try:
        with _quiet_import():
            if mode == "int8":
                from torchao.quantization import Int8WeightOnlyConfig

                return Int8WeightOnlyConfig()
            from torchao.prototype.quantization.int4 import Int4OpaqueTensor

            return Int4OpaqueTensor
    except ImportError as e:
        raise QuantizeError(
            f"--quantize {mode} needs torchao ({e}): pip install 'llama-adapter[quant]' (or: pip install torchao)"
        ) from None


def is_quantized(t: Tensor) -> bool:
    """Whether `t` is a quantized weight (a tensor subclass of torchao's) rather than a plain tensor."""
    return type(t) not in (Tensor, nn.Parameter)


def quantizes(name: str) -> bool:
    """Whether the base weight called `name` (a state-dict key) is one that `--quantize` quantizes."""
    return _QUANTIZED.fullmatch(name) is not None


def mode_for(name: str, mode: str) -> str:
    """The mode the weight called `name` is quantized to under `--quantize mode` (the output head: int8)."""
    return "int8" if name == "output.weight" else mode


@runtime_checkable
class RowSource(Protocol):
    """A matrix that hands out blocks of its rows without being held whole (`loading` reads a checkpoint's tensor
    this way while quantizing it: a block of rows in full precision at a time instead of the whole tensor)."""

    @property
    def shape(self) -> torch.Size: ...

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows start..stop-1 as a fresh tensor."""
        ...


def _rows(w: Tensor | RowSource, start: int, stop: int) -> Tensor:
    stop = min(stop, w.shape[0])
    return w.rows(start, stop) if isinstance(w, RowSource) else w[start:stop].detach()


# the dimension of the weight's rows in each part of a torchao tensor (qdata, scale, zero_point: 0)
_ROW_DIM = {"scale_and_zero": 1}  # int4: [groups, rows, 2]


def _by_rows(w: Tensor | RowSource, rows: int, quantize: Any) -> Any:
    """`quantize` (a block of rows -> a torchao tensor whose parts hold one entry per weight row along `_ROW_DIM`)
    applied to `rows` rows of `w` at a time, the parts written into tensors of the whole's size: torchao's
    temporaries, and a row source's full-precision rows, are then those of one block."""
    n = w.shape[0]
    first = quantize(_rows(w, 0, min(n, rows)))
    trim_heap()
    if n <= rows:
        return first
    names, attributes = first.__tensor_flatten__()
    whole = {}
    for k in names:
        shape = list(getattr(first, k).shape)
        shape[_ROW_DIM.get(k, 0)] = n
        whole[k] = getattr(first, k).new_empty(shape)
    for i in range(0, n, rows):
        part = first if i == 0 else quantize(_rows(w, i, i + rows))
        for k in names:
            whole[k].narrow(_ROW_DIM.get(k, 0), i, min(rows, n - i)).copy_(getattr(part, k))
        del part
        trim_heap()
    size = torch.Size((n, w.shape[1]))
    if "shape" in attributes:  # (int4's tensor keeps its logical shape as an attribute)
        attributes = {**attributes, "shape": size}
    return type(first).__tensor_unflatten__(whole, attributes, size, None)


def quantize_weight(w: Tensor | RowSource, mode: str) -> Tensor:
    """`w` [out, in] as torchao's quantized tensor for `mode` (int4: `w` itself where the kernel cannot take its
    shape: no group size divides `in`, or `out` is not a multiple of INT4_ROWS), quantized a block of rows at a time
    (the same tensors as quantizing it whole, tested): loading then holds one block's temporaries, not a matrix's."""
    config = _torchao(mode)
    if mode == "int8":
        from torchao.quantization.quant_api import _int8_weight_only_quantize_tensor

        return _by_rows(w, INT8_CHUNK_ROWS, lambda block: _int8_weight_only_quantize_tensor(block, config))
    group = next((g for g in INT4_GROUP_SIZES if w.shape[1] % g == 0), None)
    if group is None or w.shape[0] % INT4_ROWS != 0:
        return _rows(w, 0, w.shape[0])  # (a row source read whole)
    # bf16 scales whatever the base dtype: ATen's int4 kernel is vectorised for bf16 only (its fp32 path is a
    # scalar reference, ~100x slower on a 2048 x 5632 projection), so int4 products run in bf16 (`Int4Linear`).
    # Blocks of INT4_CHUNK_ROWS, a multiple of the 64 rows torchao's CPU pack lays out together: their packs, joined,
    # are the whole's pack (torchao's temporaries are ~10 bytes a weight)
    return _by_rows(w, INT4_CHUNK_ROWS, lambda block: config.from_hp(block.to(torch.bfloat16), [1, group]))


def _parts_rows(name: str, cfg: ModelConfig) -> list[int]:
    """The row counts of the parts a fused projection is read in (q, k, v; gate, up)."""
    if ".wqkv." in name:
        return [cfg.n_heads * cfg.head_dim] + [cfg.n_kv_heads * cfg.head_dim] * 2
    return [cfg.hidden_dim] * 2


def quantize_part(name: str, t: Tensor | RowSource, *, cfg: ModelConfig, mode: str) -> Tensor | RowSource:
    """A part of the fused projection `name` (q, k or v of wqkv; gate or up of w13) quantized on its own where the
    packs of the parts, joined (`join_rows`), are the pack of the fused weight: int4, every part a multiple of 64
    rows (the rows torchao's CPU pack lays out together) and its width of the group size. Else `t` unchanged, and
    the fused weight is quantized whole. Loading then never holds a fused projection in full precision."""
    if mode != "int4" or not name.endswith(".weight") or not quantizes(name) or t.shape[1] % INT4_GROUP_SIZE:
        return t
    if any(rows % INT4_PACK_ROWS for rows in _parts_rows(name, cfg)):
        return t
    return quantize_weight(t, "int4")


def join_rows(parts: list[Tensor]) -> Tensor:
    """Parts stacked along their rows: plain tensors by torch.cat, int4 parts (`quantize_part`) by their packs."""
    if not any(is_quantized(p) for p in parts):
        return torch.cat(parts)
    config = _torchao("int4")
    qs: list[Any] = parts
    block = qs[0].block_size
    shape = (sum(q.shape[0] for q in qs), qs[0].shape[1])
    return config(torch.cat([q.qdata for q in qs]), torch.cat([q.scale_and_zero for q in qs], 1), block, shape)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Give the pages of freed temporaries back to the system (glibc's `malloc_trim`; a no-op elsewhere).

    glibc keeps freed blocks smaller than its mmap threshold (up to 32 MB) in its heap, and the quantized tensors
    allocated between them stop the heap from shrinking: loading a 1B base in int4 ended at 1.5x its quantized size
    in resident memory without this."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class QuantizedLinear(nn.Linear):
    """A frozen base projection whose weight is a torchao quantized tensor (what `dequantized()` gives back)."""

    base_dtype: torch.dtype = torch.bfloat16  # the dtype of the base it belongs to (set by `quantize_model`)

    def dequantized(self) -> Tensor:
        """The weight as the quantized product sees it, [out, in] in the base dtype."""
        raise NotImplementedError


class Int8Linear(QuantizedLinear):
    """int8 weights, one scale per output row (torchao `Int8Tensor`).

    Decode-sized inputs without gradients take the CPU backend's int8 kernel (bf16, where it is built), else ATen's
    int8 weight-only kernel (torchao's own eager path widens the whole weight to the activation dtype on every
    call, ~20x slower at one row); anything else takes torchao's differentiable product."""

    def forward(self, x: Tensor) -> Tensor:
        w: Any = self.weight
        y = kernels.linear_int8(x, w.qdata, w.scale, self.bias)  # the C++ product for decode-sized bf16 inputs
        if y is not None:
            return y
        rows = x.numel() // x.shape[-1]
        if (torch.is_grad_enabled() and x.requires_grad) or rows > INT8_PACK_MAX_ROWS or rows == 0:
            return F.linear(x, w, self.bias)
        scale = w.scale.reshape(-1).to(x.dtype)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, x.shape[-1]).contiguous(), w.qdata, scale)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], w.shape[0])

    def dequantized(self) -> Tensor:
        return self.weight.dequantize()  # torchao's

    def decode_projection(self) -> kernels.Projection | None:
        """This projection for the C++ decode plan: the same kernel `forward` takes for decode-sized bf16 inputs.
        Kept while its tensors (int8 rows, scales, bias) are the same objects, unchanged: a batch's plan is made
        again whenever its membership changes, and making its 120 projections (SmolLM2-135M) was 1 ms of the
        plan's 1.4."""
        w: Any = self.weight
        sources = (w.qdata, w.scale, self.bias)
        versions = tuple(None if t is None else t._version for t in sources)
        made = self.__dict__.get("_decode_projection")
        if made is None or any(a is not b for a, b in zip(made[0], sources, strict=True)) or made[1] != versions:
            made = self.__dict__["_decode_projection"] = (
                sources,
                versions,
                kernels.int8_projection(w.qdata, w.scale, self.bias),
            )
        return made[2]


class _Int4Product(torch.autograd.Function):
    """x W^T through the int4 kernel; the input's gradient through the dequantized weight (the kernel has none)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, module: Int4Linear, bias: Tensor | None) -> Tensor:
        ctx.module = module
        return module.product(x, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        w = ctx.module.dequantized()
        return grad @ w.to(grad.dtype), None, None


class Int4Linear(QuantizedLinear):
    """int4 weights in groups along the input (torchao `Int4OpaqueTensor`, ATen's CPU int4 kernel).

    The product runs in bf16 (the kernel's fast path) and comes back in the input's dtype. The kernel has no
    backward and torchao's tensor no dequantize or slicing, so `dequantized()` asks the kernel itself: the product
    of the identity with W^T is W, exactly as the kernel expands it. That costs one GEMM as wide as the input (once
    per backward of the projection, or per prompt projection), not a copy kept around."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _Int4Product.apply(x, self, self.bias)
        return self.product(x, self.bias)

    def product(self, x: Tensor, bias: Tensor | None) -> Tensor:
        y = F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        return y if bias is None else y + bias

    def decode_projection(self) -> kernels.Projection | None:
        """This projection for the C++ decode plan: ATen's int4 kernel on torchao's pack, as `product` calls it."""
        w: Any = self.weight
        if getattr(w, "act_pre_scale", None) is not None or getattr(w, "act_mapping_type", None) is not None:
            return None
        return kernels.Projection(2, w.qdata, w.scale_and_zero, self.bias, w.shape[0], int(w.block_size[1]))

    def dequantized(self) -> Tensor:
        w = self.weight
        dtype = self.bias.dtype if self.bias is not None else self.base_dtype
        with torch.no_grad():
            eye = torch.eye(w.shape[1], dtype=torch.bfloat16, device=w.device)
            return F.linear(eye, w).t().to(dtype)


class QuantizedAttention(Attention):
    """Attention whose prompts (eq. 2-4) go through the dequantized key/value rows of its quantized wqkv: the
    projection the tokens' keys and values come from, without slicing a quantized tensor."""

    def kv_weights(self) -> KVWeights:
        wqkv = self.wqkv
        if not isinstance(wqkv, QuantizedLinear):
            return super().kv_weights()
        w, b, q, kv = wqkv.dequantized(), wqkv.bias, self.q_size, self.kv_size
        if b is None:
            return w[q : q + kv], w[q + kv :], None, None
        return w[q : q + kv], w[q + kv :], b[q : q + kv], b[q + kv :]


_LINEARS: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "int4": Int4Linear}


def int8_into_huge_pages(model: Transformer) -> None:
    """Move the int8 weights a CPU decode step streams (each `Int8Linear`'s torchao `qdata`, the tied head's int8
    copy) end to end into one `kernels.HugePageArena`, each copied in and its old storage dropped in turn (no second
    copy lasts). The values, and every product that reads them, are unchanged; on the AMD EPYC VM decoding the
    int8 SmolLM2-135M ran 7.2 % faster (paired medians of 10 alternating rounds), as the bf16 packs do from theirs."""
    weights: list[Any] = [m.weight for m in model.modules() if isinstance(m, Int8Linear)]
    rows = [w.qdata for w in weights] + ([model.int8_head[0]] if model.int8_head is not None else [])
    total = sum(t.numel() for t in rows)
    if total < kernels.HUGE_PAGE or any(t.device.type != "cpu" or not t.is_contiguous() for t in rows):
        return
    del rows  # (each old storage is freed as its weight moves)
    arena = kernels.HugePageArena(total)
    for w in weights:  # (each old storage given back before the next copy: at most one weight is held twice)
        w.qdata = arena.take(w.qdata)
        trim_heap()
    if model.int8_head is not None:
        model.int8_head = (arena.take(model.int8_head[0]), model.int8_head[1])
        trim_heap()


def quantize_model(model: Transformer, mode: str) -> Transformer:
    """Quantize the frozen base of `model` in place (weights already quantized at load time are kept) and reinstall
    its backend; returns the model. QuantizeError where `mode` cannot run (see `check_quantize`)."""
    check_quantize(mode, model.tok_embeddings.weight.device)
    current = quantization_of(model)
    if current not in (None, mode):
        raise QuantizeError(f"the base is already quantized to {current}; load it again for {mode}")
    backend = model.backend
    if backend is not None:
        backend.uninstall()  # give the stock classes back first (PackedLinear -> nn.Linear)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and quantizes(name + ".weight"):
            cls = _LINEARS[mode_for(name + ".weight", mode)]
            if not is_quantized(m.weight):
                q = quantize_weight(m.weight, mode_for(name + ".weight", mode))
                if not is_quantized(q):
                    continue  # int4: no group size divides its input width; it stays as it is
                m.weight = nn.Parameter(q, requires_grad=False)
            m.__class__ = cls
            assert isinstance(m, QuantizedLinear)
            m.base_dtype = model.tok_embeddings.weight.dtype
        elif type(m) is Attention:
            m.__class__ = QuantizedAttention
    if model.output is None and model.int8_head is None:  # a tied head: an int8 copy for decoding's logits
        head: Any = quantize_weight(model.tok_embeddings.weight, "int8")
        model.int8_head = (head.qdata.contiguous(), head.scale.reshape(-1).float().contiguous())
    if mode == "int8":  # (an int4 base's int8 head stays put: copying it costs its size at the peak of loading, and
        int8_into_huge_pages(model)  # its step streams int4 through ATen's kernel, not from our arena)
    if backend is not None:
        from llama_adapter.backends import install

        install(model)
    return model


def quantization_of(model: nn.Module) -> str | None:
    """The mode of a base quantized by this module ("int8", "int4"), None for a plain one."""
    kinds = {type(m) for m in model.modules()}
    return "int4" if Int4Linear in kinds else "int8" if Int8Linear in kinds else None


def base_weights(model: Transformer) -> str:
    """What an adapter was trained on, for its file's metadata: "int8", "int4" or the base dtype ("bf16", ...)."""
    q = quantization_of(model)
    if q is not None:
        return q
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    dtype = model.tok_embeddings.weight.dtype
    return names.get(dtype, str(dtype).removeprefix("torch."))
