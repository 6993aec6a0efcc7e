"""Loading real checkpoint layouts, and the errors a user sees when a checkpoint or adapter does not fit."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_checkpoint

import llama_adapter as la
from llama_adapter.cli import main


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_loads_into_requested_dtype_frozen(tiny_base: Path, dtype: torch.dtype) -> None:
    m = la.load_model(tiny_base, dtype=dtype)
    assert all(p.dtype == dtype and not p.requires_grad for p in m.parameters())
    assert not any(p.is_meta for p in m.parameters())
    assert m.tokenizer is not None and m.tokenizer.bos_id == 1 and m.tokenizer.eos_id == 2


def test_dtype_by_name_as_the_cli_spells_it(tiny_base: Path) -> None:
    assert la.load_model(tiny_base, dtype="fp32").tok_embeddings.weight.dtype == torch.float32
    assert la.load_model(tiny_base, dtype="bfloat16").tok_embeddings.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"unknown dtype 'int8': use one of bf16, fp16, fp32"):
        la.load_model(tiny_base, dtype="int8")


def test_import_and_load_leave_torch_compile_unloaded(tiny_base: Path) -> None:
    """torch._dynamo costs about a second to import: `import llama_adapter` (every command) and `load_model` (every
    generate / chat / serve) must not pull it in; only a caller that compiles does (a fresh interpreter each)."""
    code = (
        "import sys, llama_adapter as la; assert 'torch._dynamo' not in sys.modules, 'import';"
        f"m = la.load_model({str(tiny_base)!r}); assert 'torch._dynamo' not in sys.modules, 'load_model'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(("preset", "torch_first", "want"), [(None, False, "1"), ("0", False, "0"), (None, True, None)])
def test_import_asks_torch_for_huge_pages_unless_the_user_chose(
    preset: str | None, torch_first: bool, want: str | None
) -> None:
    """`import llama_adapter` sets THP_MEM_ALLOC_ENABLE=1 (PyTorch's CPU allocator then madvises its blocks of 2 MB
    and more as transparent huge pages) before it imports torch, so the allocator sees it: a block allocated after
    the import is backed by huge pages where the kernel's mode allows them. A value the user set is kept, and where
    torch was imported first nothing is set (the allocator has already read the variable)."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    code = (
        ("import torch;" if torch_first else "")
        + "import os, llama_adapter, torch; print(os.environ.get('THP_MEM_ALLOC_ENABLE'));"
        + "t = torch.ones(16 << 20, dtype=torch.uint8);"
        + "print(open('/proc/self/smaps_rollup').read().split('AnonHugePages:')[1].split()[0])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr.strip().splitlines()[-1]
    value, huge_kib = r.stdout.split()
    assert value == str(want)
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return
    if "[madvise]" in mode:  # (under "always" every process gets them; under "never" none does)
        assert (int(huge_kib) > 0) == (want == "1")


def test_embedding_is_initialised_off_the_meta_device() -> None:
    torch.manual_seed(0)
    cfg = la.ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128)
    w = la.Transformer(cfg).tok_embeddings.weight
    assert 0.9 < float(w.std()) < 1.1  # nn.Embedding's N(0, 1), as before the meta-device shortcut


def test_sharded_safetensors(tiny_base: Path, tmp_path: Path) -> None:
    dst = tmp_path / "sharded"
    dst.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_base / f, dst / f)
    sd = load_file(str(tiny_base / "model.safetensors"))
    keys = sorted(sd)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(dst / name))
        weight_map.update({k: name for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a, b = la.load_model(tiny_base, dtype=torch.float32), la.load_model(dst, dtype=torch.float32)
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def test_unsupported_model_type_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    rc, _, err = _cli("info", str(tmp_path))
    assert rc == 2 and "gpt2" in err and "config.json" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_missing_weights_and_shape_mismatch_name_the_file(tiny_base: Path, tmp_path: Path) -> None:
    dst = tmp_path / "bad"
    shutil.copytree(tiny_base, dst)
    (dst / "model.safetensors").unlink()
    with pytest.raises(la.CheckpointError, match="no model.safetensors"):
        la.load_model(dst)
    shutil.copy(tiny_base / "model.safetensors", dst / "model.safetensors")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(la.CheckpointError, match=r"model\.safetensors: .*mlp|model\.safetensors: layers\.0"):
        la.load_model(dst)
    with pytest.raises(la.CheckpointError, match="checkpoint directory not found"):
        la.load_model(tmp_path / "nope")


def test_adapter_file_header_and_round_trip(tiny_base: Path, tmp_path: Path) -> None:
    m = la.load_model(tiny_base, dtype=torch.float32)
    a = m.add_adapter("alpaca", la.AdapterConfig(prompt_length=4, layers=2, gate="linear"))
    with torch.no_grad():
        a.gates.normal_()
    a.meta["template"] = "alpaca"
    path = la.save_adapter(m, "alpaca", tmp_path / "alpaca.safetensors")
    meta, tensors = la.read_adapter(path)
    assert json.loads(meta["adapter"]) == {"prompt_length": 4, "layers": 2, "gate": "linear", "init": "zero"}
    assert json.loads(meta["base"]) == {
        "n_layers": 4,
        "dim": 64,
        "n_heads": 4,
        "n_kv_heads": 2,
        "head_dim": 16,
        "vocab_size": 300,
    }
    assert meta["dtype"] == "float32" and meta["template"] == "alpaca" and meta["format_version"] == "1"
    b = m.load_adapter(path, name="copy")
    assert torch.equal(b.prompts, a.prompts) and torch.equal(b.gates, a.gates) and b.meta["template"] == "alpaca"
    rc, out, _ = _cli("info", str(path))
    assert rc == 0 and "K=4 prompts x L=2 layers" in out and f"{4 * 2 * 64 + 2 * 4:,} parameters" in out


def test_adapter_for_another_base_names_both_shapes(tiny_base: Path, tmp_path: Path) -> None:
    m = la.load_model(tiny_base, dtype=torch.float32)
    m.add_adapter("a", la.AdapterConfig(prompt_length=2, layers=2))
    path = la.save_adapter(m, "a", tmp_path / "a.safetensors")
    other = la.load_model(make_checkpoint(tmp_path / "other", tokenizer=False, hidden_size=32), dtype=torch.float32)
    with pytest.raises(la.AdapterError, match=r"made for base .*'dim': 64.*this base is .*'dim': 32"):
        other.load_adapter(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(la.AdapterError, match="junk.safetensors"):
        other.load_adapter(tmp_path / "junk.safetensors")


def test_info_shows_a_sliding_window(tmp_path: Path) -> None:
    """`info` names a Mistral's sliding window (v0.1: 4096 of its 32768 positions), which every forward applies."""
    rc, out, _ = _cli("info", str(make_checkpoint(tmp_path, "mistral", tokenizer=False, sliding_window=8)))
    assert rc == 0 and "context=256 sliding_window=8" in out
    rc, out, _ = _cli("info", str(make_checkpoint(tmp_path / "full", "mistral", tokenizer=False, sliding_window=None)))
    assert rc == 0 and "sliding_window" not in out
