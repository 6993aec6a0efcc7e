"""LLaMA-Adapter: zero-init attention adapters for frozen LLaMA-family models."""

import os as _os
import sys as _sys

# PyTorch's CPU allocator asks Linux for transparent huge pages (madvise) for its blocks of 2 MB and more only where
# THP_MEM_ALLOC_ENABLE=1 was set before its first allocation (it reads the variable once). Huge pages cut the TLB
# misses of products over large weights and activations: a bf16 training step of benchmarks/train_throughput.py on
# the AMD EPYC VM 1.88-1.91 -> 1.71-1.78 s, for ~5 % more peak memory (2 MB granules). So it is set here, before
# torch is imported, unless the user chose (any value: 0 turns it off) or torch was imported first (too late then).
if "torch" not in _sys.modules:
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from llama_adapter import convert  # noqa: F401 (la.convert.convert)
from llama_adapter.adapter_file import read_adapter, save_adapter
from llama_adapter.config import ModelConfig
from llama_adapter.errors import AdapterError, CheckpointError
from llama_adapter.loading import load_config, load_model
from llama_adapter.model import KVCache, Transformer
from llama_adapter.tokenizer import Tokenizer
from llama_adapter.zero_init_attention import Adapter, AdapterConfig

__version__ = "0.1.0"
__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdapterError",
    "CheckpointError",
    "KVCache",
    "ModelConfig",
    "Tokenizer",
    "Transformer",
    "load_config",
    "load_model",
    "read_adapter",
    "save_adapter",
]
