"""The fused CPU decode step (C++ kernels) computes what the model's eager forward computes, in bf16 on a CPU.

Summation orders differ from oneDNN/MKL, so values agree to bf16 rounding; what the method needs exactly still
holds exactly: a fresh (zero-gated) adapter leaves the base's logits unchanged, and rows do not affect each other.
"""

from __future__ import annotations

import gc
import mmap
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import llama_adapter as la
from llama_adapter.backends import backend_of
from llama_adapter.backends.cpu import CpuBackend
from llama_adapter.backends.cpu import fused_decode as cpu_decode
from llama_adapter.backends.cpu import kernels as kernels
from llama_adapter.inference.decoder import BatchDecoder, DecodeRequest, merge_prompt_kv
from llama_adapter.inference.generate import generate_tokens
from llama_adapter.inference.sampling import SamplingParams
from llama_adapter.model import Attention, RMSNorm, apply_rope
from llama_adapter.zero_init_attention import PromptKV

pytestmark = [
    pytest.mark.cpu_only,
    pytest.mark.skipif(
        shutil.which(os.environ.get("CXX", "c++")) is None or os.environ.get("LLAMA_ADAPTER_CPU_KERNELS") == "0",
        reason="no C++ compiler (or kernels disabled): decoding falls back to plain PyTorch",
    ),
]
BF16_ULP = 2.0**-7  # relative spacing of bf16 numbers (8 significant bits)


@pytest.fixture(scope="module")
def ext():  # type: ignore[no-untyped-def]
    ext = kernels.native()
    assert ext is not None, kernels.native_unavailable()
    return ext


def _close(out: torch.Tensor, ref: torch.Tensor, ulps: float = 1.0) -> None:
    """Equal up to `ulps` bf16 roundings of the reference."""
    out, ref = out.double(), ref.double()
    assert ((out - ref).abs() <= ulps * BF16_ULP * ref.abs() + 1e-6).all(), (out - ref).abs().max()


def _skip_without_decode_products(ext, quantize: str | None = None) -> None:  # type: ignore[no-untyped-def]
    if not ext.has_blocked_linear():
        pytest.skip("this CPU has neither AVX512-BF16 nor AVX2: no blocked product, no decode plan")
    if quantize == "int8" and not ext.has_int8_linear():
        pytest.skip("this CPU has neither AVX-512 nor AVX2: no int8 product, no decode plan")


@pytest.mark.parametrize("rows,K", [(9, 96), (70, 512)])
def test_blocked_linear_is_an_fp32_sum_of_bf16_products_and_rows_are_independent(ext, rows: int, K: int) -> None:  # type: ignore[no-untyped-def]
    """AVX512-BF16 dot products or, on AVX2, FMAs of the weights widened in pairs (70 rows of 512 inputs: a prefill's
    rows in chunks that stay in L2); either way exact products summed in fp32 in one order per row."""
    _skip_without_decode_products(ext)
    torch.manual_seed(0)
    x, w, b = torch.randn(rows, K).bfloat16(), torch.randn(37, K).bfloat16(), torch.randn(37).bfloat16()
    wp = ext.pack(w)  # 37 rows: the last 4-row block is padded
    out = ext.linear(x, wp, 37, b)
    _close(out, F.linear(x.double(), w.double(), b.double()))
    for i in range(rows):  # any number of rows; a row's result does not depend on the others
        assert torch.equal(out[i : i + 1], ext.linear(x[i : i + 1].contiguous(), wp, 37, b))
    _close(ext.linear(x[:1].contiguous(), wp, 37, None), x[:1].double() @ w.double().T)


def test_norm_residual_and_swiglu_kernels_match_the_model_ops(ext) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    norm = RMSNorm(80, 1e-5).bfloat16()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        x, y = torch.randn(3, 80).bfloat16(), torch.randn(3, 80).bfloat16()
        _close(ext.rms_norm(x, norm.weight, norm.eps), norm(x))
        h = x.clone()
        normed = ext.add_rms_norm(h, y, norm.weight, norm.eps)
        assert torch.equal(h, x + y)  # the residual stream is updated in place, rounded once like `x + y`
        _close(normed, norm(x + y))
        # SwiGLU bit for bit (ATen's exp in runs of 64, std::exp on a row's rest): rows, widths with and without a rest
        for rows, width, scale in ((3, 48, 3), (1, 1536, 1), (2, 100, 10), (4, 130, 30), (1, 5632, 3)):
            g = torch.randn(rows, 2 * width).bfloat16() * scale
            gate, up = g.split(width, dim=-1)
            assert torch.equal(ext.silu_mul(g), F.silu(gate) * up), (rows, width)


@pytest.mark.parametrize("n_heads,n_kv,d", [(4, 4, 16), (6, 2, 16), (6, 2, 64), (4, 2, 8)])
def test_attention_kernel_rotates_writes_the_cache_and_adds_gated_prompts(ext, n_heads, n_kv, d) -> None:  # type: ignore[no-untyped-def]
    """Rows at different positions; row 0 uses a 5-prompt adapter, row 1 a 3-prompt one (masked), row 2 none. The
    rotation is apply_rope's bit for bit, whole vectors at a time where the halves of a head are (d = 64)."""
    torch.manual_seed(0)
    B, L, Kp = 3, 12, 5
    qkv = torch.randn(B, (n_heads + 2 * n_kv) * d).bfloat16()
    ang = torch.rand(B, d // 2) * 6
    cos = torch.cat([ang.cos(), ang.cos()], -1).bfloat16()
    sin = torch.cat([-ang.sin(), ang.sin()], -1).bfloat16()
    pos = torch.tensor([3, 7, 0])
    kc, vc = torch.randn(B, n_kv, L, d), torch.randn(B, n_kv, L, d)
    pk, pv = torch.randn(B, n_kv, Kp, d), torch.randn(B, n_kv, Kp, d)
    gate = torch.rand(B, n_heads) * 2 - 1
    gate[2] = 0.0
    pmask = torch.ones(B, Kp, dtype=torch.bool)
    pmask[1, 3:] = False

    kc2, vc2 = kc.clone(), vc.clone()
    y = ext.attention(qkv, cos, sin, kc2, vc2, pos, n_heads, pk, pv, gate, pmask, 0)
    # a bf16 cache (a bf16 model's) holding the same values: the same writes and the same result, bit for bit
    kb, vb = kc.bfloat16(), vc.bfloat16()
    kf, vf = kb.float(), vb.float()
    yb = ext.attention(qkv, cos, sin, kb, vb, pos, n_heads, pk, pv, gate, pmask, 0)
    yf = ext.attention(qkv, cos, sin, kf, vf, pos, n_heads, pk, pv, gate, pmask, 0)
    assert torch.equal(yb, yf) and torch.equal(kb.float(), kf) and torch.equal(vb.float(), vf)

    q, k, v = qkv.split([n_heads * d, n_kv * d, n_kv * d], -1)
    q = apply_rope(q.view(B, n_heads, 1, d), cos[:, None, None], sin[:, None, None])
    k = apply_rope(k.view(B, n_kv, 1, d), cos[:, None, None], sin[:, None, None])
    rows = torch.arange(B)
    kc[rows, :, pos], vc[rows, :, pos] = k[:, :, 0].float(), v.view(B, n_kv, d).float()
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc)  # same bf16 rotation, written at each row's position
    mask = (torch.arange(L) <= pos[:, None])[:, None, None]
    ref = kernels.decode_attention(q, kc, vc, mask, PromptKV(pk, pv, gate, mask=pmask[:, None, None]))
    _close(y.view(B, n_heads, 1, d), ref)
    # a sliding window of 3 positions (the row's own included): the same writes, attention over the last 3 only
    kw, vw = kc2.clone(), vc2.clone()
    yw = ext.attention(qkv, cos, sin, kw, vw, pos, n_heads, pk, pv, gate, pmask, 3)
    assert torch.equal(kw, kc2) and torch.equal(vw, vc2)
    band = mask & (torch.arange(L) > pos[:, None] - 3)[:, None, None]
    ref = kernels.decode_attention(q, kc, vc, band, PromptKV(pk, pv, gate, mask=pmask[:, None, None]))
    _close(yw.view(B, n_heads, 1, d), ref)
    assert not torch.equal(yw[:2], y[:2]) and torch.equal(yw[2], y[2])  # rows at positions 3 and 7 lost keys; 0 not


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds `address` (Linux's /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return []


def test_decode_packs_share_one_arena_in_huge_pages(ext) -> None:  # type: ignore[no-untyped-def]
    """`pack_linears` gives each weight `pack_linear`'s layout, values and results, the blocked packs laid end to end
    from a 2 MiB boundary in one mapping advised for transparent huge pages (Linux), which lives as long as a pack."""
    _skip_without_decode_products(ext)
    torch.manual_seed(0)
    weights = [torch.randn(n, k).bfloat16() for n, k in ((1030, 1024), (8, 40), (512, 1024), (64, 96))]
    packs = kernels.pack_linears(weights)
    blocked = [p for p in packs if p is not None and p.kind == "blocked"]
    assert len(blocked) == 3 and sum(p.packed.numel() * 2 for p in blocked) >= kernels.HUGE_PAGE
    assert blocked[0].packed.data_ptr() % kernels.HUGE_PAGE == 0
    for a, b in zip(blocked, blocked[1:], strict=False):
        assert b.packed.data_ptr() == a.packed.data_ptr() + a.packed.numel() * 2
    if os.path.exists("/proc/self/smaps") and hasattr(mmap, "MADV_HUGEPAGE"):
        assert "hg" in _vm_flags(blocked[0].packed.data_ptr())
    x = {k: torch.randn(3, k).bfloat16() for k in (96, 1024)}
    for w, p in zip(weights, packs, strict=True):
        q = kernels.pack_linear(w)  # (the [8, 40] weight has no blocked layout: oneDNN's, outside the arena, where
        # oneDNN multiplies bf16 on this CPU; else none)
        assert (p is None) == (q is None) and (p is not None or w.shape[1] % 32)
        if p is not None and q is not None:
            assert p.kind == q.kind and p.valid_for(w)
            assert p.kind != "blocked" or torch.equal(p.packed, q.packed)
    gc.collect()
    for w, p in zip(weights, packs, strict=True):
        if p is not None and p.kind == "blocked":
            got = kernels.linear(x[w.shape[1]], w, None, p)
            assert torch.equal(got, ext.linear(x[w.shape[1]], ext.pack(w), w.shape[0], None))


def _bf16_model(path, adapters=(("a", 4, 3), ("b", 2, 4), ("fresh", 5, 4)), quantize=None) -> la.Transformer:  # type: ignore[no-untyped-def]
    m = la.load_model(path, dtype=torch.bfloat16, quantize=quantize)
    torch.manual_seed(0)
    for name, k, layers in adapters:
        a = m.add_adapter(name, la.AdapterConfig(prompt_length=k, layers=layers))
        if name != "fresh":
            with torch.no_grad():
                a.gates.normal_(0, 2.0)
    backend_of(m).prepare_decoding()
    return m


def _fp32_prompts(m: la.Transformer, rows: list[str | None]) -> dict[int, PromptKV] | None:
    """The rows' prompt K/V merged for one batch, in fp32 as the CPU decoder keeps them."""
    pkv = merge_prompt_kv([m.prompt_kv(r, 1) if r else None for r in rows])
    return pkv and {li: PromptKV(p.k.float(), p.v.float(), p.gate, mask=p.mask) for li, p in pkv.items()}


def _step_both_ways(m: la.Transformer, rows: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill rows of different lengths, then one decode step: (eager forward logits, fused step logits)."""
    B, T = len(rows), 9
    ids = torch.randint(3, m.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    pkv = _fp32_prompts(m, rows)
    pos = torch.tensor([[8], [5], [2]])[:B]
    caches = [m.new_cache(B, 16, dtype=torch.float32) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            m(ids, input_pos=torch.arange(T)[None].expand(B, T), cache=c, prompt_kv=pkv)
        tok = ids.gather(1, pos)
        eager = m(tok, input_pos=pos, cache=caches[0], prompt_kv=pkv)[:, -1].float()
        fused, _ = cpu_decode.decode_step(m, tok[:, 0], pos[:, 0].contiguous(), caches[1], cpu_decode.FusedPrompts(pkv))
    for k0, k1 in zip(caches[0].k, caches[1].k, strict=True):
        _close(k1, k0, ulps=2)  # the step's keys; earlier positions are the prefill's, identical
    return eager, fused.float()


@pytest.mark.parametrize("family", ["llama", "qwen2-tied"])
def test_decode_step_computes_the_forwards_logits(ext, tiny_base, tmp_path, family) -> None:  # type: ignore[no-untyped-def]
    from tiny import make_checkpoint

    path = tiny_base if family == "llama" else make_checkpoint(tmp_path, "qwen2", tie_word_embeddings=True)
    m = _bf16_model(path)
    assert cpu_decode.supported(m)
    eager, fused = _step_both_ways(m, ["a", "b", None])
    assert (fused - eager).abs().max() <= 0.03 * eager.abs().max()
    base_eager, base_fused = _step_both_ways(m, [None, None, None])
    assert (eager - base_eager).abs().max() > 0.1 * eager.abs().max()  # the adapters' prompts took part
    _, fresh = _step_both_ways(m, ["fresh", "fresh", "fresh"])
    assert torch.equal(fresh, base_fused)  # zero-init: a fresh adapter computes exactly what the base computes


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_bf16_models_cache_is_bf16_and_decodes_as_fp32s_bit_for_bit(ext, tiny_base, quantize, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A bf16 model's keys and values are bf16 values (the projections' outputs, RoPE's rounded results), so the CPU
    decoder keeps them in a bf16 cache, half the memory of fp32 and half a long context's reading at every step, and
    the kernels widen them exactly: a long prefill (training's fused kernel), a continuation over the cache
    (masked), the C++ plan's steps and the Python loop's, an eager one-token forward and a short prefill (the
    decode kernel) give the logits of an fp32 cache bit for bit, and fill the cache with the same values."""
    _skip_without_decode_products(ext, quantize)
    m = _bf16_model(tiny_base, quantize=quantize)
    backend = backend_of(m)
    assert backend.kv_cache_dtype == torch.bfloat16 and backend.prompt_kv_dtype == torch.float32
    assert BatchDecoder(m, 2, 32).cache.k[0].dtype == torch.bfloat16
    B, T = 3, 70
    ids = torch.randint(3, m.config.vocab_size, (B, T + 5), generator=torch.Generator().manual_seed(2))
    pkv = _fp32_prompts(m, ["a", "b", None])

    def run(dtype: torch.dtype, plan: bool) -> tuple[torch.Tensor, la.model.KVCache]:
        cache, logits = m.new_cache(B, 96, dtype=dtype), []
        at = lambda t0, t1: torch.arange(t0, t1)[None].expand(B, t1 - t0)  # noqa: E731
        prompts = cpu_decode.FusedPrompts(pkv)
        with torch.no_grad():
            logits.append(m(ids[:, :66], input_pos=at(0, 66), cache=cache, prompt_kv=pkv)[:, -1])
            logits.append(m(ids[:, 66:T], input_pos=at(66, T), cache=cache, prompt_kv=pkv)[:, -1])
            for t in range(T, T + 4):
                pos = torch.full((B,), t)
                head = backend.head_projection
                step = cpu_decode.decode_step(m, ids[:, t], pos, cache, prompts, head_projection=head)
                assert (prompts.plan is not None and prompts.plan[1] is not None) == plan
                logits.append(step[0])
            logits.append(m(ids[:, T + 4 :], input_pos=at(T + 4, T + 5), cache=cache, prompt_kv=pkv)[:, -1])
            short = m.new_cache(B, 16, dtype=dtype)
            logits.append(m(ids[:, :9], input_pos=at(0, 9), cache=short, prompt_kv=pkv)[:, -1])
        return torch.stack([x.float() for x in logits]), cache

    took: list[bool] = []  # the prefills over the cache took the C++ kernels (the two from position 0, per layer)
    real = kernels.prefill_attention
    monkeypatch.setattr(kernels, "prefill_attention", lambda *a: took.append(real(*a) is not None) or real(*a))
    for plan in (True, False):
        if not plan:
            monkeypatch.setattr(cpu_decode, "_plan", lambda *a, **k: None)  # the Python loop over the same kernels
        want, fp32 = run(torch.float32, plan)
        got, bf16 = run(torch.bfloat16, plan)
        assert torch.equal(got, want), plan
        assert took == [True] * 4 * m.config.n_layers
        took.clear()
        for a, b in zip(bf16.k + bf16.v, fp32.k + fp32.v, strict=True):
            assert a.dtype == torch.bfloat16 and torch.equal(a.float(), b)


def test_a_sliding_window_holds_in_decoding_and_training(ext, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A Mistral whose queries see their last 8 positions only (v0.1's window is 4096): past the window, the decode
    steps (the C++ plan's, the Python loop's, the model's forward over the cache) give the logits of the forward
    without a cache, whose mask is banded (tests/test_model.py: transformers' logits), and differ from attention over
    every position; a training forward (gradients on) takes the same mask."""
    _skip_without_decode_products(ext)
    from tiny import make_checkpoint

    m = _bf16_model(make_checkpoint(tmp_path, "mistral", tokenizer=False, sliding_window=8))
    assert m.config.sliding_window == 8 and cpu_decode.supported(m)
    B, T, P = 2, 20, 5
    ids = torch.randint(3, m.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(3))
    rows = ["a", "b"]
    pkv = _fp32_prompts(m, rows)
    with torch.no_grad():
        want = m(ids, adapter=rows)[:, P:].float()  # logits predicting tokens P+1..T
    with torch.enable_grad():
        trained = m(ids, adapter=rows)[:, P:].float()
    assert trained.requires_grad and (trained - want).abs().max() <= 0.03 * want.abs().max()
    m.config.sliding_window = None
    with torch.no_grad():
        unwindowed = m(ids, adapter=rows)[:, P:].float()
    m.config.sliding_window = 8
    assert (unwindowed[:, -1] - want[:, -1]).abs().max() > 0.1 * want.abs().max()  # the window took effect

    def decode(step: str) -> torch.Tensor:
        cache = m.new_cache(B, 32, dtype=backend_of(m).kv_cache_dtype)
        at = lambda t0, t1: torch.arange(t0, t1)[None].expand(B, t1 - t0)  # noqa: E731
        prompts = cpu_decode.FusedPrompts(pkv)
        with torch.no_grad():
            out = [m(ids[:, : P + 1], input_pos=at(0, P + 1), cache=cache, prompt_kv=pkv)[:, -1]]
            for t in range(P + 1, T):
                if step == "forward":
                    out.append(m(ids[:, t : t + 1], input_pos=at(t, t + 1), cache=cache, prompt_kv=pkv)[:, -1])
                else:
                    head = backend_of(m).head_projection
                    out.append(cpu_decode.decode_step(m, ids[:, t], torch.full((B,), t), cache, prompts, None, head)[0])
            assert (prompts.plan is not None and prompts.plan[1] is not None) == (step == "plan")
        return torch.stack(out, 1).float()

    for step in ("plan", "forward", "loop"):
        if step == "loop":
            monkeypatch.setattr(cpu_decode, "_plan", lambda *a, **k: None)
        got = decode(step)
        assert (got - want).abs().max() <= 0.03 * want.abs().max(), step


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_cpu_sampler_draws_what_the_sampler_draws(ext, tiny_base, dtype, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The CPU backend samples in one C++ pass a row: the same nucleus as `sampling.sample_at` (ranked by value, ties
    by token id; top-p, top-k; every token at top-p 1; the whole row where the tokens near the best hold less than
    top-p) and the same token at the same uniform number, but where the number falls within a rounding of a boundary
    between two tokens (the sums run in another order): over 6,000 draws they agree in >= 99.8 %. Greedy rows keep
    the argmax given; the decoder takes the backend's sampler."""
    from llama_adapter.inference import sampling

    g = torch.Generator().manual_seed(0)
    V, n = 500, 1000
    flat = torch.zeros(V)
    tied = torch.full((V,), -4.0)
    tied[torch.randperm(V, generator=g)[:80]] = 3.0  # more tied tokens than near ones: ranked by id
    settings = [  # (row maker, temperature, top_p, top_k)
        (lambda: torch.randn(V, generator=g) * 4, 0.1, 0.75, 0),
        (lambda: torch.randn(V, generator=g) * 2, 1.0, 0.9, 0),
        (lambda: torch.randn(V, generator=g) * 2, 0.7, 1.0, 0),
        (lambda: torch.randn(V, generator=g) * 2, 1.0, 0.95, 5),
        (lambda: flat + torch.randn(V, generator=g) * 0.01, 1.0, 0.999, 0),
        (lambda: tied, 1.0, 0.3, 0),
    ]
    agree = 0
    for make, t, p, k in settings:
        logits = torch.stack([make() for _ in range(n)]).to(dtype)
        temp, top_p, top_k = torch.full((n,), t), torch.full((n,), p), torch.full((n,), k)
        temp[::7] = 0.0  # some greedy rows
        u = torch.rand(n, generator=g)
        greedy = logits.argmax(-1)
        got = kernels.sample_rows(logits, temp, top_p, top_k, u, greedy)
        want = sampling.sample_at(logits, temp, top_p, top_k, u, greedy)
        assert got is not None and torch.equal(got[::7], greedy[::7])
        agree += int((got == want).sum())
    assert agree >= 0.998 * n * len(settings), agree

    m = _bf16_model(tiny_base)
    calls = []
    real = kernels.sample_rows
    monkeypatch.setattr(kernels, "sample_rows", lambda *a: calls.append(1) or real(*a))
    generate_tokens(m, [[5, 6, 7]], max_new_tokens=3, temperature=0.5, seed=0)
    assert len(calls) == 3


def test_decoder_takes_the_fused_path_and_rows_stay_independent(ext, tiny_base, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    m = _bf16_model(tiny_base)
    prompts = [m.tokenizer.encode(p, bos=True) for p in ("Tell me about alpacas.", "1 + 2 =")]
    calls = []
    real = cpu_decode.decode_step
    monkeypatch.setattr(cpu_decode, "decode_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    pair = generate_tokens(m, prompts, adapter=["a", "b"], max_new_tokens=8, temperature=0.0)
    assert calls  # the decoder used the kernels
    alone = [
        generate_tokens(m, [p], adapter=a, max_new_tokens=8, temperature=0.0)[0]
        for p, a in zip(prompts, ["a", "b"], strict=True)
    ]
    assert pair == alone


def test_without_kernels_decoding_falls_back_to_pytorch(tiny_base, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(kernels, "_native", {})
    monkeypatch.setenv("LLAMA_ADAPTER_CPU_KERNELS", "0")
    m = _bf16_model(tiny_base)
    assert not cpu_decode.supported(m) and "LLAMA_ADAPTER_CPU_KERNELS=0" in (kernels.native_unavailable() or "")
    assert all(mod.packed is None or mod.packed.kind == "onednn" for mod in m.modules() if hasattr(mod, "packed"))
    dec = BatchDecoder(m, 2, 64)
    dec.add(
        [DecodeRequest(m.tokenizer.encode("hello", bos=True), "a", SamplingParams(max_new_tokens=3, temperature=0))]
    )
    dec.step()
    assert dec._fused is None and len(dec.seqs[0].out_ids) == 2


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_decode_plan_runs_the_python_loops_kernels_bit_for_bit(ext, tiny_base, tmp_path, quantize, tied) -> None:  # type: ignore[no-untyped-def]
    """The C++ step (DecodePlan) is an interpreter-free copy of the Python one: the same embedding rows, RoPE values,
    kernels in the same order and output head (the backend's: a tied quantized base's is its int8 copy), so logits
    and the cache it writes are identical, with mixed adapters in the batch and on a quantized base."""
    _skip_without_decode_products(ext, quantize)
    if quantize is not None:
        pytest.importorskip("torchao")
    from tiny import make_checkpoint

    path = make_checkpoint(tmp_path, "qwen2", tie_word_embeddings=True) if tied else tiny_base
    m = _bf16_model(path, quantize=quantize)
    pkv = _fp32_prompts(m, ["a", "b", None])
    assert pkv is not None
    ids = torch.randint(3, m.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    caches = [m.new_cache(3, 16, dtype=torch.float32) for _ in range(2)]
    pos = torch.tensor([8, 5, 2])
    out = []
    for c, use_plan in zip(caches, (True, False), strict=True):
        fused = cpu_decode.FusedPrompts(pkv)
        with torch.no_grad():
            m(ids, input_pos=torch.arange(9)[None].expand(3, 9), cache=c, prompt_kv=pkv)
            if not use_plan:
                fused.plan = (c, None, False)  # what _plan records where a projection has no C++ kernel
            logits = [backend_of(m).decode_step(ids.gather(1, pos[:, None])[:, 0], pos + t, c, fused) for t in (0, 1)]
        assert (fused.plan is not None and fused.plan[1] is not None) == use_plan
        assert fused.plan[2] == use_plan  # the plan computes the logits too, and greedy decoding's choice
        backend = backend_of(m)
        assert isinstance(backend, CpuBackend) and (backend._greedy is not None) == use_plan
        assert torch.equal(backend.greedy(logits[-1]), logits[-1].argmax(-1))
        out.append(torch.stack(logits))
    assert torch.equal(out[0], out[1])
    for k0, k1 in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v, strict=True):
        assert torch.equal(k0, k1)


def test_an_advancing_step_writes_the_next_inputs_in_place(ext, tiny_base) -> None:  # type: ignore[no-untyped-def]
    """A greedy batch's step may leave its next inputs where they were read from: with `advance`, the plan writes
    each row's argmax into `tokens` and adds 1 to `pos`, in place, and computes what the step without it computes;
    the Python loop (no plan) leaves both untouched and says so. Greedy decoding gives the same tokens either way."""
    _skip_without_decode_products(ext)
    m = _bf16_model(tiny_base)
    backend = backend_of(m)
    ids = torch.randint(3, m.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(2))
    runs = []
    for advance in (False, True):
        cache = m.new_cache(3, 12, dtype=torch.float32)
        fused = cpu_decode.FusedPrompts(None)
        with torch.no_grad():
            m(ids, input_pos=torch.arange(6)[None].expand(3, 6), cache=cache)
            tokens, pos = ids[:, -1].clone(), torch.tensor([5, 5, 5])
            before = (tokens.clone(), pos.clone())
            logits = backend.decode_step(tokens, pos, cache, fused, advance=advance)
        assert backend.advanced(logits) == advance
        if advance:
            assert torch.equal(tokens, logits.argmax(-1)) and torch.equal(pos, before[1] + 1)
        else:
            assert torch.equal(tokens, before[0]) and torch.equal(pos, before[1])
        runs.append(logits)
    assert torch.equal(runs[0], runs[1])
    strided = torch.tensor([[5, 6], [7, 8]])[:, 0]  # a view with stride 2: nowhere to write in place
    with torch.no_grad(), pytest.raises(RuntimeError, match="contiguous"):
        cache = m.new_cache(2, 8, dtype=torch.float32)
        backend.decode_step(strided, torch.tensor([0, 0]), cache, cpu_decode.FusedPrompts(None), advance=True)
    m.layers[1].feed_forward.w2.packed = None  # no plan: the Python loop, which does not advance
    tokens, pos = torch.tensor([5]), torch.tensor([0])
    with torch.no_grad():
        cache = m.new_cache(1, 8, dtype=torch.float32)
        logits = backend.decode_step(tokens, pos, cache, cpu_decode.FusedPrompts(None), advance=True)
    assert not backend.advanced(logits) and tokens.item() == 5 and pos.item() == 0


def test_decode_plan_is_not_made_where_a_projection_has_no_kernel(ext, tiny_base) -> None:  # type: ignore[no-untyped-def]
    """An unpacked projection (packing skipped for memory, or a changed weight) sends the step to the Python loop,
    which takes F.linear for it; the logits are still the forward's."""
    m = _bf16_model(tiny_base)
    m.layers[1].feed_forward.w2.packed = None
    cache = m.new_cache(1, 8, dtype=torch.float32)
    fused = cpu_decode.FusedPrompts(None)
    with torch.no_grad():
        cpu_decode.decode_step(m, torch.tensor([5]), torch.tensor([0]), cache, fused)
    assert fused.plan is not None and fused.plan[1] is None


@pytest.mark.parametrize(("B", "H", "n_kv", "T"), [(1, 9, 3, 37), (2, 4, 4, 5), (1, 2, 1, 1), (2, 8, 2, 70)])
def test_prefill_attention_is_causal_attention_in_fp32(ext, B, H, n_kv, T) -> None:  # type: ignore[no-untyped-def]
    """The decoder's prefill attends in fp32, query t to keys 0..t (the decode step's kernel, or on AVX2 from 16
    tokens on query rows 3 at a time against blocks of 32 keys): equal to fp32 causal SDPA to fp32 rounding before
    the one rounding to bf16 (so within one bf16 ulp)."""
    d = 64
    if T >= kernels.FUSED_PREFILL_MIN_TOKENS and kernels._fused_attention(T, d):
        pytest.skip("this CPU takes training's fused kernel from here: test_longer_prefills_attend_with_trainings_...")
    torch.manual_seed(0)
    q = torch.randn(B, H, T, d).bfloat16()
    cache_k, cache_v = torch.randn(B, n_kv, T + 7, d), torch.randn(B, n_kv, T + 7, d)  # a cache longer than T
    k, v = cache_k[:, :, :T], cache_v[:, :, :T]
    with torch.no_grad():
        out = kernels.prefill_attention(q, k, v)
        ref = F.scaled_dot_product_attention(q.float(), k, v, is_causal=True, enable_gqa=True)
    assert out is not None and out.dtype == torch.bfloat16
    _close(out, ref.bfloat16(), ulps=1)
    assert (out.double() - ref.double()).abs().max() < (ref.double() - ref.bfloat16().double()).abs().max() + 0.02
    with torch.enable_grad():
        assert kernels.prefill_attention(q, k, v) is None  # training keeps its differentiable path
    with torch.no_grad():  # a bf16 cache (a bf16 model's): the same values widened, the same result bit for bit
        kb, vb = k.bfloat16(), v.bfloat16()
        from_bf16 = kernels.prefill_attention(q, kb, vb)
        from_fp32 = kernels.prefill_attention(q, kb.float(), vb.float())
        assert from_bf16 is not None and from_fp32 is not None and torch.equal(from_bf16, from_fp32)
        assert kernels.prefill_attention(q, kb, vb.float()) is None  # keys and values of one dtype


@pytest.mark.parametrize(("B", "H", "n_kv", "T"), [(1, 9, 3, 64), (2, 4, 4, 100)])
def test_longer_prefills_attend_with_trainings_fused_kernel(ext, B, H, n_kv, T) -> None:  # type: ignore[no-untyped-def]
    """From FUSED_PREFILL_MIN_TOKENS on, the prefill takes training's fused causal kernel on the cache's keys and
    values as bf16 (what they were before the cache widened them): its output exactly, and within a bf16 rounding
    of the probabilities (<= 2^-8 max|v|) and of the output of fp32 causal attention."""
    if not kernels._fused_attention(T, 64):
        pytest.skip("this CPU has no AVX512-BF16: the one-query kernel at every length")
    assert T >= kernels.FUSED_PREFILL_MIN_TOKENS
    torch.manual_seed(0)
    d = 64
    q = torch.randn(B, H, T, d).bfloat16()
    cache_k, cache_v = (torch.randn(B, n_kv, T + 7, d).bfloat16().float() for _ in range(2))  # a decoder's cache
    k, v = cache_k[:, :, :T], cache_v[:, :, :T]
    with torch.no_grad():
        out = kernels.prefill_attention(q, k, v)
        ref = F.scaled_dot_product_attention(q.float(), k, v, is_causal=True, enable_gqa=True)
    assert out is not None and out.dtype == torch.bfloat16
    groups = (t.bfloat16().reshape(B * n_kv, -1, d).contiguous() for t in (q, k, v))
    fused, _ = ext.fused_causal_attention(*groups, 1 / d**0.5, kernels._fused_attention(T, d))
    assert torch.equal(out, fused.view(B, H, T, d))
    bound = 2.0**-8 * (v.abs().amax(dim=(2, 3), keepdim=True).repeat_interleave(H // n_kv, 1) + ref.abs()) + 1e-6
    assert ((out.double() - ref.double()).abs() <= bound.double()).all()


def test_a_long_prefill_matches_the_forward_without_a_cache(ext, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A decoder's prefill of 80 tokens (heads of 64) gives the logits of a cacheless forward (SDPA) to bf16
    rounding, whichever C++ attention takes it: the fused one on AVX512-BF16, query rows 3 at a time on AVX2 alone,
    the one-query kernel elsewhere."""
    torch.manual_seed(0)
    cfg = la.ModelConfig(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=64, hidden_dim=128, max_seq_len=96)
    m = la.Transformer(cfg).bfloat16()
    backend_of(m)
    ids = torch.randint(0, 64, (2, 80))
    with torch.no_grad():
        ref = m(ids).float()
        cache = m.new_cache(2, 96, dtype=torch.float32)
        engines, took = [], []
        monkeypatch.setattr(
            kernels,
            "_fused_attention",
            lambda T, d, _f=kernels._fused_attention: engines.append(_f(T, d)) or engines[-1],
        )
        real = kernels.prefill_attention
        monkeypatch.setattr(kernels, "prefill_attention", lambda *a: took.append(real(*a)) or took[-1])
        pre = m(ids, input_pos=torch.arange(80)[None].expand(2, 80), cache=cache).float()
    assert len(took) == 2 and all(y is not None for y in took)  # each layer's prefill took a C++ attention
    if ext.has_bf16_dot():
        assert len(engines) == 2 and all(engines)  # the fused kernel
    assert (pre - ref).abs().max() <= 0.03 * ref.abs().max()


@pytest.mark.parametrize("rows", [3, 9])
def test_products_give_the_same_result_on_any_number_of_threads(ext, rows: int) -> None:  # type: ignore[no-untyped-def]
    """Threads take blocks of output rows as they come free; each row's sum is computed whole by one thread, so the
    result does not depend on the split (nor, for int8 past 4 input rows, on which thread widened a block). A
    prefill's RMSNorm rows spread over the threads the same way."""
    torch.manual_seed(0)
    x, w = torch.randn(rows, 256).bfloat16(), torch.randn(4099, 256).bfloat16()
    q, s = torch.randint(-127, 128, (4099, 256), dtype=torch.int8), torch.rand(4099)
    long, nw = torch.randn(100 * rows, 256).bfloat16(), torch.rand(256).bfloat16()
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            bf = ext.linear(x, ext.pack(w), 4099, None) if ext.has_blocked_linear() else None
            i8 = ext.linear_int8(x, q, s, None) if ext.has_int8_linear() else None
            outs.append((bf, i8, ext.rms_norm(long, nw, 1e-5)))
    finally:
        torch.set_num_threads(threads)
    for bf, i8, normed in outs[1:]:
        assert bf is None or torch.equal(bf, outs[0][0])
        assert i8 is None or torch.equal(i8, outs[0][1])
        assert torch.equal(normed, outs[0][2])
    by_row = torch.cat([ext.rms_norm(long[i : i + 1], nw, 1e-5) for i in range(0, len(long), 97)])
    assert torch.equal(by_row, outs[0][2][::97])


def test_greedy_choice_is_torch_argmax_ties_nans_and_tails_included(ext) -> None:  # type: ignore[no-untyped-def]
    """Greedy decoding's choice (the CPU backend's `greedy`) is `torch.argmax`'s: the first index of a row's
    maximum, also when it repeats or sits in the part past the last whole vector of 16, and a row's first NaN."""
    torch.manual_seed(0)
    for V in (1, 7, 16, 49, 4099, 49152):
        x = torch.randn(4, V).bfloat16()
        x[1] = x[1].round()  # many ties of the maximum
        x[2] = float("-inf")
        x[3, V // 2 :] = x[3].max() + 1  # the maximum first reached halfway, then repeated
        assert torch.equal(ext.argmax_rows(x), x.argmax(-1)), V
        if V > 5:
            x[0, [V - 2, 3]] = float("nan")
            assert ext.argmax_rows(x)[0].item() == x[0].argmax().item() == 3
    wide = torch.randn(2, 49152 + 9).bfloat16()
    wide[0, -3] = wide[0].max() + 1  # in the tail
    chosen = kernels.argmax_rows(wide)  # what the CPU backend's `greedy` takes
    assert chosen is not None and torch.equal(chosen, wide.argmax(-1))
    assert kernels.argmax_rows(wide.float()) is None  # fp32 logits: ATen's argmax


def test_decoders_prefill_matches_the_forward_without_a_cache(ext, tiny_base) -> None:  # type: ignore[no-untyped-def]
    """A prefill from position 0 takes plain causal attention (the C++ kernel against the fp32 cache): its logits
    agree with a cacheless forward (SDPA) to bf16 rounding, and positions past 0 keep their explicit mask."""
    m = _bf16_model(tiny_base)
    ids = torch.randint(3, m.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m(ids).float()
        cache = m.new_cache(2, 16, dtype=torch.float32)
        pre = m(ids, input_pos=torch.arange(12)[None].expand(2, 12), cache=cache).float()
        assert (pre - ref).abs().max() <= 0.03 * ref.abs().max()
        more = m(ids[:, :3], input_pos=torch.arange(12, 15)[None].expand(2, 3), cache=cache).float()  # a continuation
        whole = m(torch.cat([ids, ids[:, :3]], 1)).float()[:, 12:]
        assert (more - whole).abs().max() <= 0.03 * whole.abs().max()


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cache_write_is_atens_index_put_bit_for_bit(ext, dtype, cache_dtype, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`CpuAttention.store` writes a forward's keys/values into the cache (fp32, or a bf16 model's bf16) with one C++
    call: the same cache, and the same prefixes from `Attention.cached`, as the stock `Attention.store` (two casts
    and index_put_: fp32 keys into a bf16 cache rounded as ATen rounds them), rows at different positions, keys
    given as a strided view; a position past the cache is an error, as for index_put_."""
    cfg = la.ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32, hidden_dim=64, max_seq_len=16)
    stock, fast = Attention(cfg), Attention(cfg)
    backend_cls = CpuBackend.SWAPS[Attention]
    fast.__class__ = backend_cls
    B, T, d = 2, 3, cfg.head_dim
    g = torch.Generator().manual_seed(0)
    k = torch.randn(B, T, 2, d, generator=g).to(dtype).transpose(1, 2)  # [B, n_kv, T, d], not contiguous
    v = torch.randn(B, 2, T, d, generator=g).to(dtype)
    rows = torch.tensor([[2], [0]]).expand(B, T)
    pos = torch.tensor([[4, 5, 6], [0, 1, 2]])
    caches = [
        (torch.randn(3, 2, 10, d, generator=g).to(cache_dtype), torch.randn(3, 2, 10, d, generator=g).to(cache_dtype))
        for _ in range(2)
    ]
    caches[1] = (caches[0][0].clone(), caches[0][1].clone())
    took = []
    monkeypatch.setattr(kernels, "cache_write", lambda *a, _fn=kernels.cache_write: took.append(_fn(*a)) or took[-1])
    with torch.no_grad():
        want = stock.cached((*caches[0], (rows, pos), 7), k, v)
        got = fast.cached((*caches[1], (rows, pos), 7), k, v)
    assert took == [True]
    for a, b in zip(caches[0] + want, caches[1] + got, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(caches[1][0][2, :, 4:7], k[0].to(cache_dtype))  # written where each row's positions say
    with pytest.raises(RuntimeError, match="beyond the cache"):
        ext.cache_write(*caches[1], k, v, rows, pos + 5)


def test_prefill_norms_are_the_decode_plans_norms(ext) -> None:  # type: ignore[no-untyped-def]
    """Without gradients a bf16 RMSNorm (and the residual sum before it) takes the C++ pass the decode plan and
    training's forward use (AVX512-BF16; on AVX2 the decode plan's): their values bit for bit, within a bf16 rounding
    of the stock ops."""
    if not ext.has_blocked_linear():
        pytest.skip("this CPU has neither AVX512-BF16 nor AVX2: the stock ops")
    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-5).bfloat16().requires_grad_(False)
    norm.weight.uniform_(0.5, 1.5)
    fast = RMSNorm(96, 1e-5).bfloat16().requires_grad_(False)
    fast.load_state_dict(norm.state_dict())
    fast.__class__ = CpuBackend.SWAPS[RMSNorm]
    x, a = torch.randn(2, 7, 96).bfloat16(), torch.randn(2, 7, 96).bfloat16()
    with torch.no_grad():
        y = fast(x)
        h, y2 = fast.add_norm(x, a)
    assert torch.equal(y, ext.rms_norm(x.reshape(-1, 96), norm.weight, 1e-5).view(x.shape))
    assert torch.equal(h, x + a)
    assert torch.equal(y2, ext.rms_norm((x + a).reshape(-1, 96), norm.weight, 1e-5).view(x.shape))
    if ext.has_bf16_dot():  # the training forward (grad mode on) takes the same pass
        assert torch.equal(y, kernels.rms_norm(x, norm.weight, 1e-5))
        assert torch.equal(y2, kernels.rms_norm(x + a, norm.weight, 1e-5))
    with torch.no_grad():
        _close(y, norm(x)), _close(y2, norm(x + a))


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def test_the_avx2_kernels_hold_on_cpus_that_have_more(ext) -> None:  # type: ignore[no-untyped-def]
    """On AVX-512 CPUs the AVX2 products (blocked bf16 and int8, the decode plan over them) never run by themselves:
    with LLAMA_ADAPTER_CPU_ISA=avx2 the kernels use AVX2 alone, and the product and plan tests pass that way too."""
    flags = _cpu_flags()
    if "avx512f" not in flags or not {"avx2", "fma"} <= flags or os.environ.get("LLAMA_ADAPTER_CPU_ISA"):
        pytest.skip("runs where the CPU has AVX-512 (elsewhere these tests already take the AVX2 kernels)")
    tests = Path(__file__).parent
    selection = "blocked_linear or int8_kernel or decode_plan_runs or products_give or advancing or bf16_models_cache"
    selection += " or prefill_attention_is or long_prefill or prefill_norms or bit_exact_swiglu or rotary_embedding_is"
    env = {**os.environ, "LLAMA_ADAPTER_CPU_ISA": "avx2"}
    probe = "from llama_adapter.backends.cpu import kernels as k; e = k.native(); "
    probe += "print(e.has_bf16_dot(), e.has_blocked_linear(), e.has_int8_linear())"
    seen = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert seen.stdout.split() == ["False", "True", "True"], seen.stdout + seen.stderr  # AVX2's kernels only
    # (addopts reset: the project's -q with this one would leave out the summary line read below)
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", "-k", selection]
    run = subprocess.run(
        [*cmd, *(str(tests / f) for f in ("test_cpu_decode.py", "test_quantize.py", "test_cpu_kernels.py"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout, run.stdout[-2000:]
