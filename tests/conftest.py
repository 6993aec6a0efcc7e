import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import instruct_checkpoint, make_checkpoint  # noqa: E402

DEVICE_ENV = "LLAMA_ADAPTER_TEST_DEVICE"


def pytest_addoption(parser: pytest.Parser) -> None:
    """One suite for every machine: the device-sensitive tests run where `--device` says (the CPU by default), so a
    GPU run is `pytest --device cuda` rather than a second copy of the tests."""
    parser.addoption(
        "--device",
        default=os.environ.get(DEVICE_ENV, "cpu"),
        help=f"device the device-sensitive tests run on (cpu, cuda, cuda:N); default ${DEVICE_ENV} or cpu",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped unless --device is a CUDA device)")
    config.addinivalue_line("markers", "cpu_only: tests the CPU backend's own kernels (skipped unless --device cpu)")


def _test_device(config: pytest.Config) -> torch.device:
    return torch.device(config.getoption("--device"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip what cannot run here: CUDA-only tests without a CUDA device, CPU-kernel tests on any other device."""
    device = _test_device(config)
    on_cuda = device.type == "cuda" and torch.cuda.is_available()
    no_cuda = pytest.mark.skip(reason="needs a CUDA device (run with --device cuda on a machine with one)")
    not_cpu = pytest.mark.skip(reason=f"tests the CPU backend; the suite runs on {device}")
    for item in items:
        if item.get_closest_marker("cuda") and not on_cuda:
            item.add_marker(no_cuda)
        if item.get_closest_marker("cpu_only") and device.type != "cpu":
            item.add_marker(not_cpu)


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    """The device the device-sensitive tests load their models on (`--device`, else $LLAMA_ADAPTER_TEST_DEVICE,
    else the CPU); a CUDA device asked for on a machine without one fails loudly rather than testing the CPU."""
    dev = _test_device(pytestconfig)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"--device {dev} but torch sees no CUDA device", pytrace=False)
    return dev


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
