"""The backend seam: the model and the method are plain PyTorch; a backend, chosen once per model from its device,
swaps in modules that compute the same values."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import llama_adapter as la
from llama_adapter.backends import backend_of, install
from llama_adapter.backends.cpu import CpuBackend, CpuRMSNorm, CpuZeroInitAttention, PackedLinear
from llama_adapter.backends.reference import TorchBackend
from llama_adapter.model import RMSNorm
from llama_adapter.zero_init_attention import ZeroInitAttention

SRC = Path(la.__file__).parent


def test_model_and_method_have_no_device_branches() -> None:
    """No module of the model or the method looks at a device or imports a backend."""
    for name in ("model.py", "zero_init_attention.py", "adapter_batch.py"):
        tree = ast.parse((SRC / name).read_text())
        nodes = list(ast.walk(tree))
        strings = {n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not strings & {"cpu", "cuda", "mps", "xpu"}, name
        device_checks = [
            n
            for n in nodes
            if isinstance(n, ast.Attribute)
            and n.attr in ("is_cuda", "is_cpu")
            or isinstance(n, ast.Attribute)
            and n.attr == "type"
            and isinstance(n.value, ast.Attribute)
            and n.value.attr == "device"
        ]
        assert not device_checks, name
        imports = [n.module or "" for n in nodes if isinstance(n, ast.ImportFrom)]
        assert not any("backends" in m for m in imports), name


def test_load_model_installs_the_cpu_backend_once(tiny_base: Path) -> None:
    m = la.load_model(tiny_base, dtype=torch.float32)
    assert isinstance(m.backend, CpuBackend) and backend_of(m) is m.backend
    kinds = {type(x) for x in m.layers.modules()}
    assert {CpuRMSNorm, CpuZeroInitAttention, PackedLinear} <= kinds
    assert not {RMSNorm, ZeroInitAttention, nn.Linear} & kinds  # every base module swapped
    a = m.add_adapter("a", la.AdapterConfig(prompt_length=3, layers=2))
    a.visual_proj = la.zero_init_attention.VisualProjection(8, m.config.dim)  # adapters keep stock modules
    assert type(a.visual_proj.fc1) is nn.Linear


def test_swapped_modules_compute_what_the_stock_ones_compute(tiny_base: Path) -> None:
    """Same logits with and without the CPU backend (no grad: the decode path; grad: the training kernels)."""
    m = la.load_model(tiny_base, dtype=torch.float32)
    a = m.add_adapter("a", la.AdapterConfig(prompt_length=3, layers=3))
    with torch.no_grad():
        a.gates.normal_(0, 0.5)
    ids = torch.randint(3, m.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    fast_train = m(ids, adapter="a")
    with torch.no_grad():
        fast = m(ids, adapter="a")
    m.backend.uninstall()
    assert {type(x) for x in m.layers.modules()} & {CpuRMSNorm, CpuZeroInitAttention, PackedLinear} == set()
    stock_train = m(ids, adapter="a")
    with torch.no_grad():
        stock = m(ids, adapter="a")
    torch.testing.assert_close(fast, stock, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_train, stock_train, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_projection_runs_once_a_forward(tiny_base: Path, dtype: torch.dtype) -> None:
    """The CPU backend's SwiGLU takes the fused projection's output: where its kernel does not apply (fp32, a CPU
    without AVX512-BF16) the stock SwiGLU does, and no projection is computed twice (it once was: 1.5x a forward's
    MLP products), with or without gradients."""
    m = la.load_model(tiny_base, dtype=dtype)
    calls: dict[str, int] = {}
    for name, mod in m.layers.named_modules():
        if isinstance(mod, nn.Linear):
            mod.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
    ids = torch.randint(3, m.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    m(ids)
    with torch.no_grad():
        m(ids)
    assert calls and set(calls.values()) == {2}, calls


def test_backend_follows_the_model_to_another_device(tiny_base: Path) -> None:
    """A model moved after loading gets the backend of its new device when next used; here: meta, a non-CPU
    device every machine has."""
    m = la.load_model(tiny_base, dtype=torch.float32)
    cpu = m.backend
    m.to("meta")
    b = backend_of(m)
    assert type(b) is TorchBackend and b is not cpu and m.backend is b
    assert CpuRMSNorm not in {type(x) for x in m.modules()}
    m.to_empty(device="cpu")
    assert isinstance(backend_of(m), CpuBackend)
    assert install(m) is m.backend


def test_a_non_cpu_model_never_imports_the_cpu_kernels() -> None:
    """The GPU path (here: the meta device, which every machine has) chooses TorchBackend and neither imports the
    CPU backend nor builds its C++ extension; in a fresh interpreter, so earlier tests' imports do not count."""
    code = """
import sys, torch
import llama_adapter as la
from llama_adapter.backends import backend_of, install
from llama_adapter.backends.reference import TorchBackend
from llama_adapter.inference import decoder, generate  # noqa: F401
from llama_adapter.serving import app  # noqa: F401
from llama_adapter.training import loop  # noqa: F401
with torch.device("meta"):
    m = la.Transformer(la.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64))
m.freeze_base()
assert type(install(m)) is TorchBackend and backend_of(m) is m.backend
m.add_adapter("a", la.AdapterConfig(prompt_length=3, layers=2))
m(torch.zeros(1, 5, dtype=torch.long, device="meta"), adapter="a")
loaded = sorted(k for k in sys.modules if k.startswith("llama_adapter.backends.cpu") or "cpp_extension" in k)
assert not loaded, loaded
"""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


@pytest.mark.cuda
def test_a_cuda_model_gets_the_reference_backend(tiny_base: Path, device: torch.device) -> None:
    """`load_model` on a GPU installs the stock modules (PyTorch's fused kernels), not the CPU subclasses."""
    m = la.load_model(tiny_base, dtype=torch.bfloat16, device=device)
    assert type(m.backend) is TorchBackend and backend_of(m) is m.backend
    kinds = {type(x) for x in m.modules()}
    assert not {CpuRMSNorm, CpuZeroInitAttention, PackedLinear} & kinds


def test_subclasses_of_stock_blocks_get_the_cpu_hooks_unless_they_override_them(tiny_base: Path) -> None:
    """A subclass of a stock block made outside the backend (as `quantize.QuantizedAttention`) runs with the CPU
    subclass's hooks mixed over its own methods, and gets its class back on uninstall; one that overrides a hook the
    CPU subclass replaces (here a norm with its own forward) keeps its class, so its computation stands."""
    from llama_adapter.backends.cpu import CpuAttention
    from llama_adapter.model import Attention

    class PromptsElsewhere(Attention):
        def kv_weights(self):  # type: ignore[no-untyped-def]
            return super().kv_weights()

    class OwnNorm(RMSNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    m = la.load_model(tiny_base, dtype=torch.float32)
    m.backend.uninstall()
    m.layers[0].attention.__class__ = PromptsElsewhere
    m.layers[0].attention_norm.__class__ = OwnNorm
    install(m)
    a = m.layers[0].attention
    assert isinstance(a, PromptsElsewhere) and isinstance(a, CpuAttention) and type(a).heads is CpuAttention.heads
    assert type(m.layers[0].attention_norm) is OwnNorm and type(m.layers[1].attention_norm) is CpuRMSNorm
    m.backend.uninstall()
    assert type(m.layers[0].attention) is PromptsElsewhere and type(m.layers[0].attention_norm) is OwnNorm
