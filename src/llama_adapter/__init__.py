"""LLaMA-Adapter: zero-init attention adapters for frozen LLaMA-family models."""

from . import convert  # noqa: F401 (la.convert.convert)
from .adapter_io import AdapterError, read_adapter, save_adapter
from .checkpoint import load_config, load_model
from .config import CheckpointError, ModelConfig
from .model import KVCache, Transformer
from .tokenizer import Tokenizer
from .zero_init_attention import Adapter, AdapterConfig

__version__ = "0.1.0"
__all__ = [
    "Adapter", "AdapterConfig", "AdapterError", "CheckpointError", "KVCache", "ModelConfig", "Tokenizer",
    "Transformer", "load_config", "load_model", "read_adapter", "save_adapter",
]
