"""The training loss: summed cross-entropy over the response tokens only, logits a chunk at a time.

`batch_loss` runs the model to its final hidden states and takes the loss only at supervised positions
(labels != IGNORE_INDEX, i.e. the response and EOS, or a conversation's assistant turns; the prompt is never a
target). `linear_cross_entropy` then applies the frozen output matrix a chunk of rows at a time, so a [B, T, vocab]
logits tensor never exists.
The caller divides by the step's supervised-token count (a token-level mean over the whole effective batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from llama_adapter.training.data import IGNORE_INDEX

if TYPE_CHECKING:
    from llama_adapter.model import Transformer


# The gradient's products (softmax - onehot [rows, vocab] @ W [vocab, dim]) are issued 256 rows at a time whatever the
# chunk: on the Xeon (AMX) measured, oneDNN ran 512 rows of that product at half the rate of two calls of 256, while
# the forward's product (h @ W^T) gains from more rows (a CPU backend's chunk is 512).
GRAD_ROWS = 256


def _logits_grad_product(dlogits: Tensor, weight: Tensor, out: Tensor, product: GradProduct | None) -> None:
    """out = dlogits @ W (the rows' gradient), GRAD_ROWS rows a product: the backend's form of it where it has one."""
    for r in range(0, dlogits.shape[0], GRAD_ROWS):
        g, o = dlogits[r : r + GRAD_ROWS], out[r : r + GRAD_ROWS]
        if product is None or not product(g, weight, o):
            torch.mm(g, weight, out=o)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum CE(h @ W^T, y) for a frozen W, a chunk of rows at a time. The gradient w.r.t. h is produced in
    the forward pass chunk by chunk, so neither logits nor probabilities are kept for backward."""

    @staticmethod
    def forward(
        ctx: Any,
        h: Tensor,
        weight: Tensor,
        target: Tensor,
        chunk: int,
        fused: FusedSoftmax | None,
        product: GradProduct | None,
        buffer: LogitsBuffer | None,
        logits_product: LogitsProduct | None,
    ) -> Tensor:
        n_rows, vocab = h.shape[0], weight.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        # two buffers for the whole call, reused by every chunk: fresh [chunk, vocab] tensors per chunk cost
        # more in page faults (CPU) or allocator churn than the softmax itself (a backend may keep the logits'
        # one from call to call: `buffer`)
        c = min(chunk, n_rows)
        logits_buf = buffer(c, vocab, h) if buffer is not None else h.new_empty(c, vocab)
        probs_buf = logits_buf if h.dtype == torch.float32 else None  # an fp32 buffer, made when first needed
        wt = weight.t()
        for s in range(0, n_rows, chunk):
            y = target[s : s + chunk]
            n = len(y)
            logits = logits_buf[:n]
            if logits_product is None or not logits_product(h[s : s + n], weight, logits):
                torch.mm(h[s : s + n], wt, out=logits)
            row_loss = fused(logits, y) if fused is not None else None  # the steps below at once (a backend's)
            if row_loss is not None:
                total += row_loss.sum()
                if grad is not None:
                    _logits_grad_product(logits, weight, grad[s : s + n], product)
                continue
            if probs_buf is None:
                probs_buf = torch.empty(c, vocab, device=h.device)
            p = probs_buf[:n]
            if p is not logits:
                p.copy_(logits)  # fp32 softmax
            picked = p.gather(1, y[:, None]).squeeze(1)
            mx = p.amax(dim=-1, keepdim=True)
            z = p.sub_(mx).exp_().sum(dim=-1, keepdim=True)
            total += (mx.squeeze(1) + z.squeeze(1).log() - picked).sum()
            if grad is not None:
                p.div_(z)[torch.arange(n, device=y.device), y] -= 1.0  # d(CE)/d(logits) = softmax - onehot
                if p is not logits:
                    logits.copy_(p)
                _logits_grad_product(logits, weight, grad[s : s + n], product)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None, None, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad * g.to(grad.dtype) if grad is not None else None), None, None, None, None, None, None, None


# (logits [n, vocab], target [n]) -> each row's CE, logits overwritten by softmax - onehot; or None: not applicable
FusedSoftmax = Callable[[Tensor, Tensor], Tensor | None]
# (dlogits [n, vocab], W [vocab, dim], out [n, dim]) -> True where out = dlogits @ W was written; False: not applicable
GradProduct = Callable[[Tensor, Tensor, Tensor], bool]
# (h [n, dim], W [vocab, dim], out [n, vocab]) -> True where out = h @ W^T was written; False: not applicable
LogitsProduct = Callable[[Tensor, Tensor, Tensor], bool]
# (rows, vocab, h) -> an uninitialised [rows, vocab] tensor of h's dtype and device for the chunks' logits, which the
# loss overwrites and no longer needs when it returns (a backend's may be the same memory at every call)
LogitsBuffer = Callable[[int, int, Tensor], Tensor]


LOSS_CHUNK = 256  # rows of logits at a time where no backend says otherwise


def linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    target: Tensor,
    chunk: int = LOSS_CHUNK,
    fused: FusedSoftmax | None = None,
    product: GradProduct | None = None,
    buffer: LogitsBuffer | None = None,
    logits_product: LogitsProduct | None = None,
) -> Tensor:
    """Summed cross-entropy of rows h [N, dim] against a frozen output matrix; fp32 result. `fused`: a backend's
    one-step softmax (`TorchBackend.cross_entropy_grad_`), tried on each chunk of logits; `product`: a backend's
    gradient product (`TorchBackend.logits_grad_product`), tried on each piece of GRAD_ROWS rows; `buffer`: a
    backend's logits buffer (`TorchBackend.loss_logits_buffer`); `logits_product`: a backend's product of the
    logits (`TorchBackend.logits_product`), tried on each chunk."""
    if weight.requires_grad:  # a trainable head: plain autograd
        return F.cross_entropy(F.linear(h, weight).float(), target, reduction="sum")
    return _LinearCrossEntropy.apply(h, weight, target, chunk, fused, product, buffer, logits_product)


def output_weight(model: Transformer) -> Tensor:
    """The output head's matrix; a quantized head (`llama_adapter.quantize`) gives its dequantized weight, since
    the loss multiplies by it and by its transpose."""
    if model.output is None:
        return model.tok_embeddings.weight
    dequantized = getattr(model.output, "dequantized", None)
    return dequantized() if dequantized is not None else model.output.weight


def batch_loss(
    model: Transformer, adapter: str, batch: dict[str, Tensor], chunk: int | None = None
) -> tuple[Tensor, int]:
    """(summed CE over the supervised positions, number of them); logits only where labels != -100, `chunk` rows
    of them at a time (default: the compute backend's `loss_chunk`)."""
    dev = output_weight(model).device
    ids = batch["input_ids"].to(dev, non_blocking=True)
    labels = batch["labels"].to(dev, non_blocking=True)
    feats = batch.get("image_features")
    h = model(ids, adapter=adapter, return_hidden=True, image_features=feats.to(dev) if feats is not None else None)
    tgt = labels[:, 1:]
    mask = tgt != IGNORE_INDEX
    sel = h[:, :-1][mask]
    backend = model.backend
    fused = backend.cross_entropy_grad_ if backend is not None else None
    product = backend.logits_grad_product if backend is not None else None
    buffer = backend.loss_logits_buffer if backend is not None else None
    logits_product = backend.logits_product if backend is not None else None
    if chunk is None:
        chunk = backend.loss_chunk if backend is not None else LOSS_CHUNK
    loss = linear_cross_entropy(sel, output_weight(model), tgt[mask], chunk, fused, product, buffer, logits_product)
    return loss, int(mask.sum())
