"""Adapters from other tools, converted, reproduce what those tools compute."""

from __future__ import annotations

import contextlib
import io
import subprocess
from pathlib import Path

import pytest
import torch
from naive import naive_logits

import llama_adapter as la
from llama_adapter.cli import main
from llama_adapter.errors import AdapterError


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The real CLI entry point, in-process (a subprocess would spend seconds importing torch)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(list(args))
    return subprocess.CompletedProcess(args, rc, "", err.getvalue())


@pytest.fixture(scope="module")
def base(tiny_base: Path) -> la.Transformer:
    return la.load_model(tiny_base, dtype=torch.float32)


def _check(base: la.Transformer, dst: Path, prompts: dict, gates: dict) -> None:
    base.load_adapter(dst, name="conv")
    try:
        ids = torch.randint(0, base.config.vocab_size, (12,))
        with torch.no_grad():
            ours = base(ids[None], adapter="conv")[0]
        ref = naive_logits(base, ids, prompts, gates)
        assert (ours - ref).abs().max().item() <= 1e-5
        assert (ours - naive_logits(base, ids)).abs().max().item() > 1e-3
    finally:
        base.remove_adapter("conv")


@pytest.mark.parametrize("gate", ["tanh", "linear"])
@pytest.mark.parametrize("per_head", [False, True])
def test_official_v1(base: la.Transformer, tiny_base: Path, tmp_path: Path, gate: str, per_head: bool) -> None:
    c = base.config
    K, L = 3, 2
    q = torch.randn(K * L, c.dim)
    gshape = (1, c.n_heads, 1, 1) if per_head else (1,)
    raw = {c.n_layers - L + j: torch.randn(gshape) for j in range(L)}
    sd = {"adapter_query.weight": q, **{f"layers.{i}.attention.gate": g for i, g in raw.items()}}
    torch.save(sd, tmp_path / "adapter.pth")
    r = _cli(
        "convert",
        str(tmp_path / "adapter.pth"),
        str(tmp_path / "conv.safetensors"),
        "--base",
        str(tiny_base),
        "--gate",
        gate,
    )
    assert r.returncode == 0, r.stderr
    act = torch.tanh if gate == "tanh" else (lambda x: x)
    prompts = {c.n_layers - L + j: q[j * K : (j + 1) * K] for j in range(L)}
    gates = {i: act(g.flatten()).expand(c.n_heads) for i, g in raw.items()}
    _check(base, tmp_path / "conv.safetensors", prompts, gates)


def test_official_needs_gate_kind(tiny_base: Path, tmp_path: Path) -> None:
    torch.save(
        {"adapter_query.weight": torch.randn(2, 64), "layers.3.attention.gate": torch.zeros(1)}, tmp_path / "a.pth"
    )
    r = _cli("convert", str(tmp_path / "a.pth"), str(tmp_path / "b.safetensors"), "--base", str(tiny_base))
    assert r.returncode == 2 and "--gate" in r.stderr and "Traceback" not in r.stderr


def test_litgpt(base: la.Transformer, tmp_path: Path) -> None:
    c = base.config
    K, start = 4, 1
    sd, prompts, gates = {}, {}, {}
    for i in range(start, c.n_layers):
        prompts[i] = torch.randn(K, c.dim)
        g = torch.randn(1, 1, c.n_heads, 1)
        gates[i] = g.flatten()
        sd[f"transformer.h.{i}.attn.adapter_wte.weight"] = prompts[i]
        sd[f"transformer.h.{i}.attn.gating_factor"] = g
    torch.save({"model": sd}, tmp_path / "lit_model.pth.adapter")
    la.convert.convert(tmp_path / "lit_model.pth.adapter", tmp_path / "conv.safetensors", c)
    _check(base, tmp_path / "conv.safetensors", prompts, gates)


def test_peft_outputs_reproduced(tiny_base: Path, base: la.Transformer, tmp_path: Path) -> None:
    """Real PEFT: train nothing, just randomise its adaption prompts and gates, save, convert, compare."""
    import peft  # in the test extra: this parity test always runs
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model = peft.get_peft_model(hf, peft.AdaptionPromptConfig(adapter_len=5, adapter_layers=3, task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adaption_prompt" in n:
                p.normal_()
            elif "adaption_gate" in n:
                p.uniform_(-1, 1)
    model.eval()
    model.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, base.config.vocab_size, (2, 14))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    la.convert.convert(tmp_path / "peft", tmp_path / "conv.safetensors", base.config)
    base.load_adapter(tmp_path / "conv.safetensors", name="peft")
    try:
        with torch.no_grad():
            ours = base(ids, adapter="peft")
        assert (ours - ref).abs().max().item() <= 1e-4
        with torch.no_grad():
            assert (base(ids) - ref).abs().max().item() > 1e-3
    finally:
        base.remove_adapter("peft")


def test_mismatched_base_is_a_clear_error(tmp_path: Path) -> None:
    small = la.ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128)
    torch.save(
        {
            "transformer.h.3.attn.adapter_wte.weight": torch.randn(2, 64),
            "transformer.h.3.attn.gating_factor": torch.zeros(1, 1, 4, 1),
        },
        tmp_path / "x.adapter",
    )
    with pytest.raises(AdapterError, match="not the top"):
        la.convert.convert(tmp_path / "x.adapter", tmp_path / "y.safetensors", small)
