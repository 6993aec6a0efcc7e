"""The CPU backend: the model's modules swapped for subclasses that reach the CPU kernels, chosen once.

Each subclass computes what its parent computes (tests compare values and gradients) and differs only in how:
- `CpuRMSNorm`: in bf16 one C++ pass a row (the decode plan's: the sum of squares in 16 lanes), with the residual
  sum before it in the same pass (`kernels.add_rms_norm`); a hand-written backward while training;
- `CpuAttention`: RoPE and the head split of bf16 training, one C++ pass each way (`kernels.rope_qkv`); a forward's
  keys/values into the cache (bf16 for a bf16 model, else fp32) in one call (`kernels.cache_write`);
- `CpuFeedForward`: the SwiGLU in bf16 (training and prefill), forward and backward one C++ pass each
  (`kernels.swiglu`);
- `CpuZeroInitAttention`: batched causal and few-keys attention while training (in bf16: eq. 8 whole as one
  autograd function, the causal softmax and the gated prompt attention plus the sum as C++ passes,
  `kernels.gated_causal_attention`; `causal_attention` / `add_prompt_attention` where only one applies), and
  token + gated prompt attention in one pass when decoding one token per row against the cache
  (`kernels.decode_attention`);
- `PackedLinear`: once `prepare_decoding` packed its frozen bf16 weight, decodes through the pack; trains a frozen
  bf16 weight through oneDNN packs where they were timed faster (`kernels.training_pack`).
The subclasses add no parameters, so swapping a module's class keeps its weights, hooks and wrappers.
`fused_decode` holds the C++ decode step used for bf16 models where the kernels could be built.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from llama_adapter.backends.cpu import allocator, fused_decode, kernels
from llama_adapter.backends.reference import TorchBackend
from llama_adapter.model import Attention, FeedForward, KVCache, RMSNorm
from llama_adapter.zero_init_attention import PromptKV, ZeroInitAttention


def _no_grad_on_cpu(x: Tensor) -> bool:
    return x.device.type == "cpu" and not torch.is_grad_enabled()


class CpuRMSNorm(RMSNorm):
    def forward(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():
            if kernels.use_cpu_training_kernels(x):
                return kernels.rms_norm(x, self.weight, self.eps)
            if _no_grad_on_cpu(x):  # a prefill: the decode plan's norm, one pass
                y = kernels.rms_norm_no_grad(x, self.weight, self.eps)
                if y is not None:
                    return y
        return super().forward(x)

    def add_norm(self, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        if (kernels.use_cpu_training_kernels(x) or _no_grad_on_cpu(x)) and not torch.compiler.is_compiling():
            fused = kernels.add_rms_norm(x, a, self.weight, self.eps)  # the sum written in the norm's pass
            if fused is not None:
                return fused
        return super().add_norm(x, a)


class CpuFeedForward(FeedForward):
    def swiglu(self, h: Tensor) -> Tensor:
        # with or without gradients: the kernel's values are ATen's bit for bit (a prefill saves ATen's three ops)
        if h.device.type == "cpu" and not torch.compiler.is_compiling():
            y = kernels.swiglu(h)
            if y is not None:
                return y
        return super().swiglu(h)


# marks the keys/values a forward attends over from its cache (`CpuAttention.cached`): the prefill kernels take
# those, while a forward without a cache (the same bf16 keys in a bf16 model) keeps the stock attention unchanged
_FROM_CACHE = "_llama_adapter_from_cache"


def _from_cache(t: Tensor) -> bool:
    return bool(getattr(t, _FROM_CACHE, False))


class CpuAttention(Attention):
    def heads(self, qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if qkv.device.type == "cpu" and not torch.compiler.is_compiling():  # apply_rope's values bit for bit, as above
            heads = kernels.rope_qkv(qkv, cos, sin, self.n_heads, self.n_kv)
            if heads is not None:
                return heads
        return super().heads(qkv, cos, sin)

    def store(self, kc: Tensor, vc: Tensor, k: Tensor, v: Tensor, rows: Tensor, pos: Tensor) -> None:
        if not kernels.cache_write(kc, vc, k, v, rows, pos):  # both writes and casts in one C++ call
            super().store(kc, vc, k, v, rows, pos)

    def cached(self, cache: Any, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        kc, vc = super().cached(cache, k, v)
        setattr(kc, _FROM_CACHE, True)
        setattr(vc, _FROM_CACHE, True)
        return kc, vc


class CpuZeroInitAttention(ZeroInitAttention):
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, prompts: PromptKV | None) -> Tensor:
        if q.shape[2] == 1 and mask is not None and (prompts is None or not prompts.random_init):
            return kernels.decode_attention(q, k, v, mask, prompts)  # token and gated prompt attention at once
        if prompts is not None and not prompts.random_init and mask is None and q.shape[2] > 1:
            if kernels.use_cpu_training_kernels(q):  # a training step: eq. 8 whole, as one autograd function
                y = kernels.gated_causal_attention(q, k, v, prompts)
                if y is not None:
                    return y
        return super().forward(q, k, v, mask, prompts)

    def add_gated_prompt_attention(self, y: Tensor, q: Tensor, prompts: PromptKV) -> Tensor:
        if kernels.use_cpu_training_kernels(q) and not torch.compiler.is_compiling():
            fused = kernels.add_prompt_attention(y, q, prompts)  # the prompt half and the sum in one pass
            if fused is not None:
                return fused
        return super().add_gated_prompt_attention(y, q, prompts)

    def token_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        if q.shape[2] == 1 and mask is not None:  # one new token per row (rand-init's [prompts; tokens] too)
            return kernels.decode_attention(q, k, v, mask)
        if mask is None and q.shape[2] > 1:
            if kernels.use_cpu_training_kernels(q):
                return kernels.causal_attention(q, k, v)
            # a decoder's prefill (no gradients, over its cache), where the C++ kernel applies
            y = kernels.prefill_attention(q, k, v) if _from_cache(k) else None
            if y is not None:
                return y
        return super().token_attention(q, k.to(q.dtype), v.to(q.dtype), mask)  # (a cache of another dtype)

    def few_keys_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        if kernels.use_cpu_training_kernels(q):
            return kernels.few_keys_attention(q, k, v, mask)
        return super().few_keys_attention(q, k, v, mask)


class PackedLinear(nn.Linear):
    """nn.Linear that, once `CpuBackend.prepare_decoding` packed its frozen weight, decodes through the pack; and that
    trains through oneDNN packs of its frozen bf16 weight where they were measured faster (`kernels.training_pack`)."""

    packed: kernels.PackedWeight | None = None
    training_pack: kernels.TrainingPack | None = None
    training_packs_made = 0

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (
            not torch.compiler.is_compiling()  # (first: a compiled block leaves its products to inductor, unbroken)
            and kernels.use_cpu_training_kernels(x)
            and x.dtype == w.dtype
            and not w.requires_grad
            and x.numel() >= kernels.TRAINING_PACK_MIN_ROWS * x.shape[-1]
            and kernels.can_pack(w)  # (a plain bf16 CPU matrix)
            and not kernels.widens_bf16_products(x, w)  # (oneDNN multiplies bf16 here)
        ):
            pack = self.training_pack
            if pack is None or not pack.valid_for(w):
                self.training_packs_made += 1
                if self.training_packs_made > kernels.MAX_TRAINING_PACKS:  # a weight that is a new tensor at every
                    # call (FSDP's gathered copies) or keeps changing: timing and packing it again each time would
                    # cost more than the packs save
                    return kernels.linear(x, w, self.bias, self.packed)
                pack = self.training_pack = kernels.training_pack(x, w, self.bias)
            if pack.fwd is not None or pack.bwd is not None:
                return kernels.frozen_linear(x, w, self.bias, pack)
        return kernels.linear(x, w, self.bias, self.packed)

    def decode_projection(self) -> kernels.Projection | None:
        return kernels.blocked_projection(self.weight, self.bias, self.packed)


_STOCK_OF: dict[type[nn.Module], type[nn.Module]] = {}  # each class made by `_mixed` -> the class it was made for


def _mixed(cpu: type[nn.Module], cls: type[nn.Module]) -> type[nn.Module]:
    """`cpu`'s overrides over `cls` (a subclass of `cpu`'s stock parent), one class per pair."""
    for made, of in _STOCK_OF.items():
        if of is cls and issubclass(made, cpu):
            return made
    made = type(f"{cpu.__name__.removesuffix(cpu.__mro__[1].__name__)}{cls.__name__}", (cpu, cls), {})
    _STOCK_OF[made] = cls
    return made


class CpuBackend(TorchBackend):
    name = "cpu"
    # oneDNN's head product (h @ W^T, a vocabulary of outputs) runs faster with more rows: a SmolLM2-135M step
    # 0.647 -> 0.627, 0.645 -> 0.637 and 0.603 -> 0.593 s with 512 rows instead of 256 (medians of 8 alternations;
    # 1024 rows gained ~4 ms more for twice the buffer); the gradient's products stay at 256 rows (`training.loss`).
    # The logits buffer is 512 x vocab bf16 (48 MiB for a 49152 vocabulary)
    loss_chunk = 512

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.packed_head: kernels.PackedWeight | None = None  # the tied output matmul (embedding matrix)
        self.pack_skipped = False  # prepare_decoding found too little memory (said once)
        self.head_gradient_pack: kernels.TrainingPack | None = None  # the loss's (softmax - onehot) W, packed
        self.head_gradient_packs_made = 0
        self._greedy: tuple[Tensor, Tensor] | None = None  # the last fused step's (logits, their argmax)
        self._advanced: Tensor | None = None  # the last fused step's logits, where it advanced tokens and pos
        self._loss_logits: Tensor | None = None  # the training loss's logits buffer, kept from step to step

    SWAPS: dict[type[nn.Module], type[nn.Module]] = {
        RMSNorm: CpuRMSNorm,
        Attention: CpuAttention,
        FeedForward: CpuFeedForward,
        ZeroInitAttention: CpuZeroInitAttention,
        nn.Linear: PackedLinear,
    }

    def install(self) -> None:
        for m in self._base_modules():
            new = self._swap_for(type(m))
            if new is not None:
                m.__class__ = new

    def _swap_for(self, cls: type[nn.Module]) -> type[nn.Module] | None:
        """The class a base module of class `cls` runs as here: the stock classes' CPU subclasses (SWAPS), and for a
        subclass of a stock block made elsewhere (`quantize.QuantizedAttention`), the CPU subclass's hooks mixed
        over it, where it overrides none of them (else it keeps its class: its own computation stands). nn.Linear
        subclasses keep their class: a quantized projection's product is already its own kernel."""
        new = self.SWAPS.get(cls)
        if new is not None or issubclass(cls, nn.Linear) or cls in _STOCK_OF:
            return new
        for stock, cpu in self.SWAPS.items():
            if issubclass(cls, stock):
                hooks = [n for n, v in vars(cpu).items() if callable(v) and not n.startswith("__")]
                if all(getattr(cls, n) is getattr(stock, n) for n in hooks):
                    return _mixed(cpu, cls)
        return None

    def uninstall(self) -> None:
        stock = {new: old for old, new in self.SWAPS.items()} | _STOCK_OF
        for m in self._base_modules():
            old = stock.get(type(m))
            if old is not None:
                m.__dict__.pop("packed", None)
                m.__dict__.pop("training_pack", None)
                m.__dict__.pop("training_packs_made", None)
                m.__class__ = old
        self.packed_head = None
        self.head_gradient_pack = None
        self._loss_logits = None

    def _base_modules(self) -> list[nn.Module]:
        """Every module of the frozen base (not the adapters: their visual projections keep stock Linears)."""
        model = self.model
        tops = [*model.layers, model.norm] + ([model.output] if model.output is not None else [])
        return [m for top in tops for m in top.modules()]

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """bf16 for a bf16 model where the C++ kernels are built: its keys and values are bf16 values, which the
        kernels' fp32 attention widens exactly, so the cache takes half the memory, and a long context's step half
        the reading, of an fp32 one, for the same results. fp32 otherwise (the eager attention works in fp32:
        small bf16 batched matmuls are slow on CPUs, `kernels.decode_attention`)."""
        bf16 = self.model.tok_embeddings.weight.dtype == torch.bfloat16
        return torch.bfloat16 if bf16 and kernels.native() is not None else torch.float32

    @property
    def prompt_kv_dtype(self) -> torch.dtype:
        # fp32: a prefill's gated prompt attention (the model's own ops) then runs in fp32, as the decode steps'
        # (the prompts' K/V are a few rows a layer)
        return torch.float32

    def prepare_training(self) -> None:
        allocator.keep_freed_memory()  # a step's buffers are reused, not page-faulted in again

    def prepare_decoding(self) -> None:
        """Lay the frozen base's matmul weights out for fast CPU decoding (bf16 only; else a no-op).

        Keeps a second copy of those weights (`kernels.pack_linears`: one arena in huge pages), so it is skipped,
        with a note, when that copy would take more than half the memory still available; the plain path is taken
        whenever gradients are on or a weight has changed since it was packed.
        """
        model = self.model
        todo: list[tuple[PackedLinear | None, Tensor]] = [
            (m, m.weight)
            for m in model.modules()
            if isinstance(m, PackedLinear)
            and not m.weight.requires_grad
            and kernels.can_pack(m.weight)
            and (m.packed is None or not m.packed.valid_for(m.weight))
        ]
        w, p = model.tok_embeddings.weight, self.packed_head
        if (
            model.output is None
            and model.int8_head is None
            and not w.requires_grad
            and kernels.can_pack(w)
            and (p is None or not p.valid_for(w))
        ):
            todo.append((None, w))
        need = sum(t.numel() * t.element_size() for _, t in todo)
        free = kernels.available_memory()
        if need and free is not None and need > free // 2:
            if not self.pack_skipped:
                print(
                    f"llama-adapter: not packing weights for CPU decoding ({need / 2**30:.1f} GiB more, "
                    f"{free / 2**30:.1f} GiB available): decoding will be slower",
                    file=sys.stderr,
                )
                self.pack_skipped = True
            return
        for (m, _), packed in zip(todo, kernels.pack_linears([t for _, t in todo]), strict=True):
            if m is None:
                self.packed_head = packed
            else:
                m.packed = packed

    def logits(self, hidden: Tensor) -> Tensor:
        if self.model.output is not None:
            return self.model.output(hidden)
        if self.model.int8_head is not None:  # a quantized base's tied head: as llama.cpp's 8- and 4-bit files do,
            # decoding's logits come from an 8-bit copy (lookups and the training loss keep the full matrix)
            y = kernels.linear_int8(hidden, *self.model.int8_head, None)  # None: gradients on, or no int8 kernel
            if y is not None:
                return y
        return kernels.linear(hidden, self.model.tok_embeddings.weight, None, self.packed_head)

    def head_projection(self) -> kernels.Projection | None:
        """`logits` as the C++ decode plan's last projection (the same kernel on the same weights), or None where
        it has no kernel there."""
        model = self.model
        if model.output is not None:
            return getattr(model.output, "decode_projection", lambda: None)()
        if model.int8_head is not None:
            return kernels.int8_projection(*model.int8_head, None)
        return kernels.blocked_projection(model.tok_embeddings.weight, None, self.packed_head)

    def greedy(self, logits: Tensor) -> Tensor:
        if self._greedy is not None and self._greedy[0] is logits:  # the C++ step's own argmax of these logits
            return self._greedy[1]
        chosen = kernels.argmax_rows(logits)  # 16 lanes at a time (ATen's walks a 49K-logit row in ~55 us)
        return logits.argmax(-1) if chosen is None else chosen

    def sample(
        self, logits: Tensor, temperature: Tensor, top_p: Tensor, top_k: Tensor, u: Tensor, greedy: Tensor
    ) -> Tensor:
        chosen = kernels.sample_rows(logits, temperature, top_p, top_k, u, greedy)  # one C++ pass a row
        return super().sample(logits, temperature, top_p, top_k, u, greedy) if chosen is None else chosen

    def cross_entropy_grad_(self, logits: Tensor, target: Tensor) -> Tensor | None:
        return kernels.cross_entropy_grad_(logits, target)  # one C++ pass per row for bf16 logits

    def loss_logits_buffer(self, rows: int, vocab: int, like: Tensor) -> Tensor:
        """The same memory at every call (grown where a call needs more): a step's 48 MiB of logits (512 x 49152
        bf16) allocated afresh each step now and then met no free block of that size in the heap, which then grew,
        and every page of the new block was faulted in while the head's product wrote it; on the 2-core VM of
        docs/speed/training.md 23 huge-page faults added ~0.2 s to such a step (~1.8 s) in its first ten."""
        buf, n = self._loss_logits, rows * vocab
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._loss_logits = like.new_empty(n)
        return buf[:n].view(rows, vocab)

    def logits_product(self, h: Tensor, weight: Tensor, out: Tensor) -> bool:
        if not kernels.widens_bf16_products(h, weight):
            return False
        kernels.widened_mm(h, weight.t(), out)
        return True

    def logits_grad_product(self, dlogits: Tensor, weight: Tensor, out: Tensor) -> bool:
        if kernels.widens_bf16_products(dlogits, weight):
            kernels.widened_mm(dlogits, weight, out)
            return True
        if dlogits.dtype != weight.dtype:
            return False
        pack = self.head_gradient_pack
        if pack is None or not pack.valid_for(weight):
            if dlogits.shape[0] < kernels.TRAINING_PACK_MIN_ROWS:  # decided on a training batch's rows (then kept)
                return False
            self.head_gradient_packs_made += 1
            if self.head_gradient_packs_made > kernels.MAX_TRAINING_PACKS:  # a new matrix at every step (a quantized
                # head's dequantized copy, FSDP's gathered one): timing and packing it each time would cost more
                return False
            pack = self.head_gradient_pack = kernels.head_gradient_pack(weight, dlogits.shape[0])
        if pack.bwd is None:
            return False
        out.copy_(kernels.packed_gradient_product(dlogits, pack))
        return True

    def fused_prompts(self, pkv: dict[int, PromptKV] | None) -> fused_decode.FusedPrompts | None:
        if not fused_decode.supported(self.model) or any(p.random_init for p in (pkv or {}).values()):
            return None
        return fused_decode.FusedPrompts(pkv)

    def decode_step(self, tokens: Tensor, pos: Tensor, cache: KVCache, prompts: Any, advance: bool = False) -> Tensor:
        logits, chosen = fused_decode.decode_step(
            self.model,
            tokens,
            pos,
            cache,
            prompts,
            head=self.logits,
            head_projection=self.head_projection,
            advance=advance,
        )
        self._greedy = (logits, chosen) if chosen is not None else None
        self._advanced = logits if advance and chosen is not None else None
        return logits

    def advanced(self, logits: Tensor) -> bool:
        return self._advanced is logits
