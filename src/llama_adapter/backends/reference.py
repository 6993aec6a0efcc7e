"""The reference backend: the model's own modules, unchanged (GPUs: PyTorch's fused SDPA kernels do the work).

It is also the interface every backend implements: `backends.cpu.CpuBackend` subclasses it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from llama_adapter.inference.sampling import sample_at
from llama_adapter.model import KVCache, Transformer
from llama_adapter.zero_init_attention import PromptKV


class TorchBackend:
    """The reference: the model's own modules, unchanged."""

    name = "torch"
    # rows of logits the training loss computes at once (`training.loss.batch_loss`): chunk x vocab values held
    loss_chunk = 256

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.device_type = model.tok_embeddings.weight.device.type  # the device it was chosen for

    def install(self) -> None:
        """Swap faster modules into the model (the reference swaps nothing)."""

    def uninstall(self) -> None:
        """Give the model its stock modules back (before another backend is installed)."""

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """The decoder's KV cache dtype (the reference: the model's)."""
        return self.model.tok_embeddings.weight.dtype

    @property
    def prompt_kv_dtype(self) -> torch.dtype:
        """The dtype the decoder holds adapters' prompt keys/values in (the reference: the cache's)."""
        return self.kv_cache_dtype

    def prepare_decoding(self) -> None:
        """Lay weights out for decoding, once per decoder (the reference keeps them as they are)."""

    def prepare_training(self) -> None:
        """Ready the process for training steps, once per run (the reference changes nothing)."""

    def logits(self, hidden: Tensor) -> Tensor:
        return self.model.logits(hidden)

    def greedy(self, logits: Tensor) -> Tensor:
        """Each row's most likely token [B] from logits [B, vocab]: the first index of the row's maximum, as
        `torch.argmax` gives it (greedy decoding's choice, taken at every step)."""
        return logits.argmax(-1)

    def sample(
        self, logits: Tensor, temperature: Tensor, top_p: Tensor, top_k: Tensor, u: Tensor, greedy: Tensor
    ) -> Tensor:
        """Each row's next token from logits [B, vocab]: greedy's where its temperature is 0, else its draw at the
        uniform number u (`inference.sampling.sample_at`, which the reference takes)."""
        return sample_at(logits, temperature, top_p, top_k, u, greedy)

    def cross_entropy_grad_(self, logits: Tensor, target: Tensor) -> Tensor | None:
        """The training loss's softmax in one step: each row's cross-entropy (fp32), with `logits` [n, vocab]
        overwritten by softmax - onehot; None (logits untouched) where the backend has none and the loss takes
        PyTorch's ops (`training.loss`)."""
        return None

    def loss_logits_buffer(self, rows: int, vocab: int, like: Tensor) -> Tensor:
        """An uninitialised [rows, vocab] tensor of `like`'s dtype and device for the training loss's chunks of
        logits (`training.loss`), which the loss is done with when it returns (the reference: a new one each call)."""
        return like.new_empty(rows, vocab)

    def logits_product(self, h: Tensor, weight: Tensor, out: Tensor) -> bool:
        """out = h @ weight^T, the training loss's logits [n, vocab] of hidden rows h, in a faster form of the
        backend's; False (out untouched) where it has none and the loss takes `torch.mm` (`training.loss`)."""
        return False

    def logits_grad_product(self, dlogits: Tensor, weight: Tensor, out: Tensor) -> bool:
        """out = dlogits @ weight, the training loss's gradient of the hidden rows from that of their logits
        [n, vocab], in a faster form of the backend's; False (out untouched) where it has none and the loss takes
        `torch.mm` (`training.loss`)."""
        return False

    def fused_prompts(self, pkv: dict[int, PromptKV] | None) -> Any | None:
        """The batch's prompt K/V laid out for `decode_step`, or None where there is no fused step."""
        return None

    def decode_step(self, tokens: Tensor, pos: Tensor, cache: KVCache, prompts: Any, advance: bool = False) -> Tensor:
        """Logits [B, vocab] of one new token per row (tokens [B] at positions pos [B]) with `prompts` from
        `fused_prompts`. With `advance` the backend may also write each row's greedy choice into `tokens` and add 1
        to `pos`, in place (a greedy batch's next inputs); `advanced(logits)` says whether it did."""
        raise NotImplementedError("this backend has no fused decode step")

    def advanced(self, logits: Tensor) -> bool:
        """Whether the `decode_step` that gave these logits already advanced its tokens and positions."""
        return False
