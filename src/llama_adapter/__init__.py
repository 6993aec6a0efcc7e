"""LLaMA-Adapter: zero-init attention adapters for frozen LLaMA-family models."""

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
