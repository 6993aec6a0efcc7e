import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA (GQA, untied) checkpoint with a BPE tokenizer.json, shared by the whole session."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny_base"))
