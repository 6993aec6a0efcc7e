"""Compute backends: the same model and method, with faster modules and kernels swapped in from outside.

The model (`llama_adapter.model`) and the method (`llama_adapter.zero_init_attention`) are plain PyTorch with no
device branches. A backend is chosen once per model, by `install(model)` (called by `load_model`, or on first use
by the decoder), from the device the model's weights are on:

- `reference.TorchBackend` (GPUs and anything else): the stock modules; PyTorch's fused SDPA kernels do the work.
- `backends.cpu.CpuBackend`: swaps in subclasses of `RMSNorm`, `ZeroInitAttention` and `nn.Linear` that compute
  the same values with fewer, larger kernels on a CPU (training and decoding), keeps a bf16 model's decoding KV
  cache in bf16 (its kernels attend in fp32; other models' in fp32), lays frozen bf16 weights out for decoding,
  and offers a fused C++ decode step.

What a backend offers the decoder (`inference.decoder.BatchDecoder`): `kv_cache_dtype`, `prompt_kv_dtype`,
`prepare_decoding()`, `logits(hidden)`, `greedy(logits)`, and optionally a fused step (`fused_prompts(pkv)` -> a
handle or None, `decode_step(...)`).
Install a backend after moving the model to its device: the CPU one computes the same values on any device, but
only pays off on a CPU.
"""

from __future__ import annotations

from llama_adapter.backends.reference import TorchBackend
from llama_adapter.model import Transformer

Backend = TorchBackend  # the interface every backend implements (CpuBackend subclasses it)


def install(model: Transformer) -> TorchBackend:
    """Choose the model's backend from its device and swap its modules in; returns it (`model.backend`)."""
    if isinstance(model.backend, TorchBackend):
        model.backend.uninstall()
    if model.tok_embeddings.weight.device.type == "cpu":
        from llama_adapter.backends.cpu import CpuBackend

        backend: TorchBackend = CpuBackend(model)
    else:
        backend = TorchBackend(model)
    backend.install()
    model.backend = backend
    return backend


def backend_of(model: Transformer) -> TorchBackend:
    """The model's backend, installing one on first use (a model built by hand rather than by `load_model`) or
    again when the model has moved to another kind of device since (loaded on the CPU, then moved to a GPU)."""
    backend = model.backend
    if isinstance(backend, TorchBackend) and backend.device_type == model.tok_embeddings.weight.device.type:
        return backend
    return install(model)
