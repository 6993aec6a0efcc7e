import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import instruct_checkpoint, make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA (GQA, untied) checkpoint with a BPE tokenizer.json, shared by the whole session."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="session")
def tiny_instruct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny instruct LLaMA (ChatML chat template, `<|im_end|>` ends its turn) trained to answer "Paris" to "What is
    the capital of France?"; built once and cached beside the session's temporary directory (a few seconds)."""
    return instruct_checkpoint(tmp_path_factory.getbasetemp().parent / "llama-adapter-test-cache")


@pytest.fixture(scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny models: threading overhead dominates, and the machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
