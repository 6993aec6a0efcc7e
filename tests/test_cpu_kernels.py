"""The CPU kernels compute what the stock PyTorch ops compute, values and gradients."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import llama_adapter as la
from llama_adapter.backends import backend_of
from llama_adapter.backends.cpu import CpuBackend
from llama_adapter.backends.cpu import kernels as kernels
from llama_adapter.backends.reference import TorchBackend
from llama_adapter.zero_init_attention import PromptKV

pytestmark = pytest.mark.cpu_only  # the CPU backend's own kernels: nothing to test on another device


def _grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, inputs, g)


def _leaf(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_values_and_gradients(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x, w = _leaf(3, 7, 48, dtype=dtype), (torch.rand(48, dtype=dtype) + 0.5).requires_grad_()
    xd, wd = (t.detach().double().requires_grad_() for t in (x, w))
    ref = wd * (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5))
    out = kernels.rms_norm(x, w, 1e-5)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert out.dtype == dtype and (out.double() - ref).abs().max() <= tol
    for ours, theirs in zip(_grads(out, (x, w)), _grads(ref, (xd, wd)), strict=True):
        assert (ours.double() - theirs).abs().max() <= tol * max(1.0, theirs.abs().max().item())
    assert x.grad is None  # nothing modified in place


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (6, 2)])
def test_causal_attention_matches_sdpa(n_heads: int, n_kv: int) -> None:
    torch.manual_seed(0)
    q, k, v = _leaf(2, n_heads, 9, 16), _leaf(2, n_kv, 9, 16), _leaf(2, n_kv, 9, 16)
    rep = n_heads // n_kv
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
    out = kernels.causal_attention(q, k, v)
    assert (out - ref).abs().max() <= 1e-5
    for ours, theirs in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v)), strict=True):
        assert (ours - theirs).abs().max() <= 1e-5


def test_prompt_attention_matches_sdpa_with_padding_mask() -> None:
    torch.manual_seed(0)
    q, k, v = _leaf(2, 2, 12, 8), _leaf(2, 2, 5, 8), _leaf(2, 2, 5, 8)
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False  # row 1's adapter has only 3 prompts
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = kernels.few_keys_attention(q, k, v, mask)
    assert (out - ref).abs().max() <= 1e-5
    for ours, theirs in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v)), strict=True):
        assert (ours - theirs).abs().max() <= 1e-5


def test_decode_attention_matches_sdpa_with_per_row_lengths() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 6, 1, 16), torch.randn(3, 2, 11, 16), torch.randn(3, 2, 11, 16)
    mask = torch.arange(11) <= torch.tensor([10, 4, 0])[:, None]  # rows at different positions
    mask = mask[:, None, None, :]
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask)
    assert (kernels.decode_attention(q, k, v, mask) - ref).abs().max() <= 1e-5


def test_decode_attention_adds_the_gated_prompt_attention() -> None:
    """Equation 8 for one new token: token attention + gate * prompt attention, computed in the cache's dtype."""
    torch.manual_seed(0)
    q = torch.randn(3, 6, 1, 16, dtype=torch.bfloat16)
    k, v = torch.randn(3, 2, 11, 16), torch.randn(3, 2, 11, 16)  # an fp32 cache, as the CPU decoder keeps
    mask = (torch.arange(11) <= torch.tensor([10, 4, 0])[:, None])[:, None, None, :]
    pk, pv = torch.randn(3, 2, 4, 16), torch.randn(3, 2, 4, 16)
    pmask = torch.ones(3, 1, 1, 4, dtype=torch.bool)
    pmask[2, ..., 2:] = False  # row 2's adapter has 2 prompts
    gate = torch.tensor([[0.5] * 6, [0.0] * 6, [-1.0, 1.0, 0.1, 0.2, 0.3, 2.0]])  # row 1: no adapter
    prompts = PromptKV(pk, pv, gate, mask=pmask)
    qf = q.float()
    tokens = F.scaled_dot_product_attention(qf, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask)
    ref = (
        tokens
        + F.scaled_dot_product_attention(qf, pk.repeat_interleave(3, 1), pv.repeat_interleave(3, 1), attn_mask=pmask)
        * gate[:, :, None, None]
    )
    out = kernels.decode_attention(q, k, v, mask, prompts)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert torch.equal(out[1], kernels.decode_attention(q, k, v, mask)[1])  # gate 0 adds exactly nothing


@pytest.mark.parametrize("kind", ["onednn", "blocked"])
def test_packed_linear_computes_f_linear_and_is_never_stale(kind: str) -> None:
    """oneDNN's pack is bit-identical to F.linear; the C++ blocked kernel sums in another order (bf16 rounding)."""
    torch.manual_seed(0)
    w = torch.randn(96, 64, dtype=torch.bfloat16)
    packed = kernels.pack_linear(w, kind)
    if packed is None:
        pytest.skip(f"no {kind} bf16 matmul on this CPU ({kernels.native_unavailable() or 'oneDNN'})")
    assert packed.kind == kind
    x, b = torch.randn(3, 5, 64, dtype=torch.bfloat16), torch.randn(96, dtype=torch.bfloat16)

    def same(out: torch.Tensor, ref: torch.Tensor) -> bool:
        if kind == "onednn":
            return torch.equal(out, ref)
        exact = F.linear(x.double(), w.double(), b.double()) if ref.shape == (3, 5, 96) else None
        return out.shape == ref.shape and (
            exact is None or bool(((out.double() - exact).abs() <= 2.0**-8 * exact.abs() + 1e-6).all())
        )

    with torch.no_grad():
        assert same(kernels.linear(x, w, b, packed), F.linear(x, w, b))
        assert same(kernels.linear(x[:1, :1], w, None, packed), F.linear(x[:1, :1], w))
        w.add_(1.0)  # the weight changed after packing: the pack must not be used
        assert torch.equal(kernels.linear(x, w, b, packed), F.linear(x, w, b))
    assert kernels.pack_linear(w.float()) is None  # fp32 stays on the stock path


def test_kernels_are_used_only_for_cpu_training() -> None:
    x = torch.zeros(2)
    assert kernels.use_cpu_training_kernels(x)
    with torch.no_grad():
        assert not kernels.use_cpu_training_kernels(x)
    assert not kernels.use_cpu_training_kernels(torch.zeros(2, device="meta"))


def test_adapter_training_step_equals_stock_ops(tiny_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole training step (loss and every adapter gradient) is the same with and without the kernels."""

    def step(use: bool) -> tuple[torch.Tensor, ...]:
        monkeypatch.setattr(
            kernels, "use_cpu_training_kernels", lambda x: use and x.device.type == "cpu" and torch.is_grad_enabled()
        )
        torch.manual_seed(0)
        model = la.load_model(tiny_base, dtype=torch.float32)
        a = model.add_adapter("a", la.AdapterConfig(prompt_length=3, layers=3))
        with torch.no_grad():
            a.gates.normal_(0, 0.5)  # non-zero gates so the prompts get gradients too
        ids = torch.randint(3, model.config.vocab_size, (2, 17))
        loss = F.cross_entropy(model(ids[:, :-1], adapter="a").flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        assert a.prompts.grad is not None and a.gates.grad is not None
        return loss.detach(), a.prompts.grad, a.gates.grad

    calls = []
    for name in ("rms_norm", "causal_attention", "few_keys_attention"):
        fn = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
    stock = step(False)
    assert not calls
    fast = step(True)
    assert set(calls) == {"rms_norm", "causal_attention", "few_keys_attention"}
    assert fast[1].abs().sum() > 0
    for s, f in zip(stock, fast, strict=True):
        assert torch.allclose(s, f, atol=1e-6, rtol=1e-5)


def test_weights_are_packed_only_when_the_copy_fits_in_memory(tiny_base, monkeypatch, capsys) -> None:
    from llama_adapter.backends.cpu import PackedLinear as Linear
    from llama_adapter.inference.generate import generate_tokens

    m = la.load_model(tiny_base, dtype=torch.bfloat16)
    ids = [m.tokenizer.encode("hello there", bos=True)]
    plain = generate_tokens(m, ids, max_new_tokens=5, temperature=0.0)  # (packs the weights)
    for mod in m.modules():
        if isinstance(mod, Linear):
            mod.packed = None
    monkeypatch.setattr(kernels, "available_memory", lambda: 4096)  # no room for a second copy of the weights
    backend_of(m).prepare_decoding()
    assert all(mod.packed is None for mod in m.modules() if isinstance(mod, Linear))
    assert "not packing weights" in capsys.readouterr().err
    assert len(generate_tokens(m, ids, max_new_tokens=5, temperature=0.0)[0]) == len(plain[0])  # still decodes
    monkeypatch.setattr(kernels, "available_memory", lambda: None)  # unknown: pack
    backend_of(m).prepare_decoding()
    if kernels.pack_linear(m.layers[0].attention.wo.weight) is not None:
        assert all(mod.packed is not None for mod in m.modules() if isinstance(mod, Linear))


def test_a_stale_build_lock_is_removed_a_fresh_one_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A build killed half-way leaves torch's lock file; the next run must not wait on it forever."""
    import os
    import time

    lock = tmp_path / "lock"
    lock.touch()
    assert not kernels.clear_stale_build_lock(tmp_path) and lock.exists()  # a build may be running right now
    old = time.time() - 2 * kernels.STALE_LOCK_S
    os.utime(lock, (old, old))
    assert kernels.clear_stale_build_lock(tmp_path) and not lock.exists()
    assert "stale build lock" in capsys.readouterr().err
    assert not kernels.clear_stale_build_lock(tmp_path)  # nothing to remove


def _cpu_model(cfg: la.ModelConfig, dtype: torch.dtype, adapted: int) -> la.Transformer:
    """A tiny frozen base (seed 0) in `dtype` on the CPU backend, with adapter "a" (K = 3) on its top `adapted`
    layers (zero gates, as fresh)."""
    from llama_adapter.backends import install

    torch.manual_seed(0)
    model = la.Transformer(cfg).to(dtype)
    model.freeze_base()
    install(model)
    model.add_adapter("a", la.AdapterConfig(prompt_length=3, layers=adapted))
    return model


def _adapted_training_step(
    dtype: torch.dtype, n_layers: int, adapted: int, hidden_dim: int, seq: int, dim: int = 32
) -> tuple[la.Transformer, Callable[[], tuple[torch.Tensor, ...]]]:
    """A tiny base on the CPU backend with an adapter (non-zero gates) on its top `adapted` layers, and a function
    running one training step on a fixed batch: (loss, prompt gradient, gate gradient)."""
    cfg = la.ModelConfig(
        vocab_size=64, dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, hidden_dim=hidden_dim, max_seq_len=32
    )
    model = _cpu_model(cfg, dtype, adapted)
    a = model.adapters["a"]
    with torch.no_grad():
        a.gates.normal_(0, 0.5)
    ids = torch.randint(0, cfg.vocab_size, (2, seq))

    def step() -> tuple[torch.Tensor, ...]:
        a.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(ids[:, :-1], adapter="a").flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        assert a.prompts.grad is not None and a.gates.grad is not None
        return loss.detach(), a.prompts.grad.clone(), a.gates.grad.clone()

    return model, step


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Wraps `kernels.<name>`: the returned list gets an entry at each call (the kernel still runs)."""
    calls: list[int] = []
    fn = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a: calls.append(1) or fn(*a))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_blocks_train_as_eager_ones_with_one_graph_for_every_layer(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.compile'd blocks (`finetune --compile`, `train_throughput.py --compile`) give eager's loss and adapter
    gradients, and the adapted layers share their graphs (the prompt projection runs outside them, so the layer
    index is no guard): with dynamo's recompile limit below the number of adapted layers, per-layer graphs fail.
    In bf16 eager runs through the frozen weights' oneDNN training packs, the compiled blocks leave them out."""
    monkeypatch.setattr(kernels, "TRAINING_PACK_MIN_ROWS", 1)  # (this batch is small)
    model, step = _adapted_training_step(dtype, n_layers=8, adapted=6, hidden_dim=64, seq=12)
    eager = step()
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
            for layer in model.layers:
                layer.compile(dynamic=False)  # (dynamic=True, as finetune's, makes the index a symbol instead)
            compiled = step()
    finally:
        torch._dynamo.reset()
    assert compiled[1].abs().sum() > 0
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # (bf16: the two paths round in different places)
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(e, c, atol=tol, rtol=tol * 10)


@pytest.mark.skipif(
    kernels.native() is None or not kernels.native().has_exact_silu(), reason="needs the C++ kernels on AVX512-BF16"
)
def test_fused_cross_entropy_is_atens_fp32_softmax_rounded_to_bf16() -> None:
    """The loss's one-pass softmax: each row's CE and, over the logits, softmax - onehot, as the fp32 ATen ops give
    them (the loss to fp32 rounding, the gradient to 1 bf16 unit in the last place: the sum runs in another
    order); a vocabulary that is not a multiple of the vector width takes the scalar tail."""
    torch.manual_seed(0)
    for n, V in ((7, 1000), (3, 49152), (5, 37)):
        logits = (torch.randn(n, V) * 4).bfloat16()
        y = torch.randint(0, V, (n,))
        p = logits.float()
        mx = p.amax(-1, keepdim=True)
        z = (p - mx).exp().sum(-1, keepdim=True)
        want_loss = (mx + z.log()).squeeze(1) - p.gather(1, y[:, None]).squeeze(1)
        want = (p - mx).exp() / z
        want[torch.arange(n), y] -= 1
        got = logits.clone()
        loss = kernels.cross_entropy_grad_(got, y)
        assert loss is not None
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
        ulp = want.bfloat16().float().abs().clamp_min(2.0**-126) * 2.0**-7  # one bf16 step at each value
        assert ((got.float() - want.bfloat16().float()).abs() <= ulp).all()
    assert kernels.cross_entropy_grad_(torch.randn(2, 8), torch.zeros(2, dtype=torch.long)) is None  # fp32: ATen
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.cross_entropy_grad_(torch.zeros(2, 8, dtype=torch.bfloat16), torch.tensor([0, 8]))


def test_bf16_training_loss_takes_the_fused_softmax_and_agrees_with_aten(monkeypatch: pytest.MonkeyPatch) -> None:
    """The training loss (`batch_loss`) of a bf16 base on the CPU backend takes the backend's one-pass softmax for
    every chunk of logits, and gives the loss and the hidden-state gradient of the ATen softmax it replaces (to bf16
    rounding)."""
    from llama_adapter.training.loss import batch_loss, linear_cross_entropy

    cfg = la.ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
    model = _cpu_model(cfg, torch.bfloat16, adapted=2)
    ids = torch.randint(0, cfg.vocab_size, (2, 21))
    taken: list[bool] = []  # per chunk of logits: whether the kernel applied
    fused = kernels.cross_entropy_grad_

    def spy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
        out = fused(x, t)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(kernels, "cross_entropy_grad_", spy)
    batch_loss(model, "a", {"input_ids": ids, "labels": ids}, chunk=16)
    ext = kernels.native()
    assert taken == [ext is not None and bool(ext.has_exact_silu())] * 3  # 40 supervised rows in chunks of 16

    h = torch.randn(40, 32).bfloat16().requires_grad_()
    w = (torch.randn(300, 32) * 0.3).bfloat16()
    y = torch.randint(0, 300, (40,))
    got, want = [], []
    for out, f in ((got, spy), (want, None)):
        loss = linear_cross_entropy(h, w, y, chunk=16, fused=f)
        out += [loss.detach(), torch.autograd.grad(loss, h)[0].float()]
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_training_loss_keeps_one_logits_buffer_whose_contents_never_matter(dtype: torch.dtype) -> None:
    """On the CPU backend the training loss writes every step's logits into the same memory (a fresh buffer of
    48 MiB per step sometimes found no free block and was page-faulted in while the head's product wrote it): the
    buffer grows where a step needs more rows and is otherwise the same tensor, and whatever it held before (NaN
    here) leaves the loss and the gradients exactly as a new buffer per call gives them."""
    cfg = la.ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
    model = _cpu_model(cfg, dtype, adapted=2)
    with torch.no_grad():
        model.adapters["a"].gates.fill_(0.5)
    backend = model.backend
    assert isinstance(backend, CpuBackend)
    fresh = TorchBackend.loss_logits_buffer.__get__(backend)  # the reference's: a new tensor per call

    def step(rows: int, buffer: Any) -> list[torch.Tensor]:
        from llama_adapter.training import loss as loss_module

        ids = torch.randint(0, cfg.vocab_size, (1, rows + 1), generator=torch.Generator().manual_seed(rows))
        model.zero_grad(set_to_none=True)
        kept = backend.loss_logits_buffer
        backend.loss_logits_buffer = buffer  # type: ignore[method-assign]
        try:
            loss, _ = loss_module.batch_loss(model, "a", {"input_ids": ids, "labels": ids}, chunk=16)
        finally:
            backend.loss_logits_buffer = kept  # type: ignore[method-assign]
        loss.backward()
        return [loss.detach(), *(p.grad.clone() for p in model.trainable_parameters("a"))]

    seen = []
    for rows in (9, 40, 12, 40):  # chunks of 9 rows, then 16 (grown), then the same memory
        got = step(rows, backend.loss_logits_buffer)
        buf = backend._loss_logits
        assert buf is not None and buf.dtype == dtype
        seen.append((buf.data_ptr(), buf.numel()))
        buf.fill_(float("nan"))  # what the last step left there must not reach the next one
        want = step(rows, fresh)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
    assert seen[0][1] == 9 * cfg.vocab_size and seen[1][1] == 16 * cfg.vocab_size
    assert seen[1] == seen[2] == seen[3]


@pytest.mark.skipif(not kernels._onednn_bf16(), reason="needs oneDNN's bf16 linear")
def test_frozen_bf16_weights_train_through_onednn_packs_with_the_same_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen bf16 projection in training (>= TRAINING_PACK_MIN_ROWS rows) goes through oneDNN packs of W and W^T
    where they were timed faster: here always (the gain threshold raised), so both directions are exercised. The
    output and the input's gradient equal F.linear's to bf16 rounding; no gradient reaches the frozen weight; a
    changed weight gets new packs; without gradients or for short inputs the plain path runs."""
    from llama_adapter.backends.cpu import PackedLinear

    monkeypatch.setattr(kernels, "_PACK_GAIN", 1e9)  # keep every pack
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=True).bfloat16().requires_grad_(False)
    lin.__class__ = PackedLinear
    x = torch.randn(4, 80, 64).bfloat16().requires_grad_()
    y = lin(x)
    pack = lin.training_pack
    assert pack is not None and pack.fwd is not None and pack.bwd is not None
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    x_ref = x.detach().float().requires_grad_()
    y_ref = F.linear(x_ref, lin.weight.float(), lin.bias.float())
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, g.float())
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx.float(), dx_ref, rtol=2e-2, atol=2e-2)
    assert lin.weight.grad is None
    with torch.no_grad():
        lin.weight.mul_(2)
    lin(x)
    assert lin.training_pack is not pack and lin.training_pack.valid_for(lin.weight)
    twin = copy.deepcopy(lin)  # (the packs are opaque tensors: a copy makes its own)
    assert twin.training_pack is None and pickle.loads(pickle.dumps(lin)).training_pack is None
    torch.testing.assert_close(twin(x), lin(x))
    for _ in range(kernels.MAX_TRAINING_PACKS):  # a weight that keeps changing (FSDP's gathered copies): given up
        with torch.no_grad():
            lin.weight.mul_(0.5)
        lin(x)
    assert not lin.training_pack.valid_for(lin.weight) and lin.training_packs_made > kernels.MAX_TRAINING_PACKS
    want = F.linear(x.float(), lin.weight.float(), lin.bias.float())
    torch.testing.assert_close(lin(x).float(), want, atol=2e-2, rtol=2e-2)
    short = PackedLinear(64, 8).bfloat16().requires_grad_(False)
    short(x[:1, :10])
    with torch.no_grad():
        short(x)
    assert short.training_pack is None


@pytest.mark.skipif(not kernels._onednn_bf16(), reason="needs oneDNN's bf16 linear")
def test_the_losss_gradient_product_goes_through_a_pack_of_the_frozen_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """The training loss's gradient product (softmax - onehot) W, on the CPU backend, goes through a oneDNN pack of
    the frozen bf16 head's W^T where it was timed faster (here always: the gain threshold raised), made once at a
    training batch's rows and then used for every piece, with the loss and the hidden rows' gradient of torch.mm's
    (to bf16 rounding). Short batches before it exists keep torch.mm; a head that is a new matrix at every step
    (a quantized head's dequantized copy) is given up after MAX_TRAINING_PACKS."""
    from llama_adapter.training import loss as loss_module

    monkeypatch.setattr(kernels, "_PACK_GAIN", 1e9)  # keep the pack however it timed
    cfg = la.ModelConfig(vocab_size=384, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=300)
    model = _cpu_model(cfg, torch.bfloat16, adapted=2)
    backend = model.backend
    assert backend is not None and backend.head_gradient_pack is None

    def loss_and_grad(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(rows)
        h = torch.randn(rows, cfg.dim).bfloat16().requires_grad_()
        y = torch.randint(0, cfg.vocab_size, (rows,))
        w = loss_module.output_weight(model)
        loss = loss_module.linear_cross_entropy(h, w, y, 512, backend.cross_entropy_grad_, backend.logits_grad_product)
        return loss.detach(), torch.autograd.grad(loss, h)[0].float()

    short = loss_and_grad(40)  # fewer rows than a training batch: no pack yet
    assert backend.head_gradient_pack is None
    products = _spy(monkeypatch, "packed_gradient_product")
    packed = loss_and_grad(300)  # pieces of 256 and 44 rows, both through the pack
    pack = backend.head_gradient_pack
    assert pack is not None and pack.bwd is not None and len(products) == 2
    monkeypatch.setattr(backend, "logits_grad_product", lambda *a: False)
    plain = loss_and_grad(300)
    torch.testing.assert_close(packed[0], plain[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(packed[1], plain[1], rtol=2e-2, atol=2e-3)
    monkeypatch.undo()
    assert short[1].abs().sum() > 0

    monkeypatch.setattr(kernels, "_PACK_GAIN", 1e9)
    weight = loss_module.output_weight(model)
    g, out = torch.randn(256, cfg.vocab_size).bfloat16(), torch.empty(256, cfg.dim).bfloat16()
    assert backend.logits_grad_product(g, weight, out) and backend.head_gradient_pack is pack  # kept while unchanged
    made = backend.head_gradient_packs_made
    taken = [backend.logits_grad_product(g, weight.detach().clone(), out) for _ in range(kernels.MAX_TRAINING_PACKS)]
    assert taken == [True] * (kernels.MAX_TRAINING_PACKS - made) + [False] * made  # new matrices: given up


@pytest.mark.skipif(
    kernels.native() is None or not kernels.native().has_exact_silu(), reason="needs the C++ kernels on AVX512-BF16"
)
def test_bf16_training_swiglu_is_autograds_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SwiGLU of bf16 training on the CPU backend (`CpuFeedForward`, one C++ pass forward and one backward) gives
    autograd's silu(gate) * up bit for bit: the loss and every adapter gradient of a training step are equal with and
    without it, and the kernel itself matches on odd widths (the scalar tail) too."""
    _, step = _adapted_training_step(torch.bfloat16, n_layers=3, adapted=2, hidden_dim=200, seq=17)
    fused = kernels.swiglu
    calls = _spy(monkeypatch, "swiglu")
    fast = step()
    assert len(calls) == 3  # every layer: the one below the adapters too (no gradient there, the same kernels)
    monkeypatch.setattr(kernels, "swiglu", lambda h: None)
    stock = step()
    assert fast[1].abs().sum() > 0
    for s, f in zip(stock, fast, strict=True):
        assert torch.equal(s, f)
    for rows, width in ((5, 100), (3, 71)):
        h = (torch.randn(rows, 2 * width) * 3).bfloat16().requires_grad_()
        g = torch.randn(rows, width).bfloat16()
        gate, up = h.split(width, -1)
        want = F.silu(gate) * up
        (dh_want,) = torch.autograd.grad(want, h, g)
        hh = h.detach().requires_grad_()
        got = fused(hh)
        assert got is not None
        (dh,) = torch.autograd.grad(got, hh, g)
        assert torch.equal(got, want) and torch.equal(dh, dh_want)


@pytest.mark.skipif(
    kernels.native() is None or not kernels.native().has_bf16_dot(), reason="needs the C++ kernels on AVX512-BF16"
)
def test_bf16_rms_norm_with_a_frozen_weight_takes_one_pass_each_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 training's RMSNorm of a frozen weight (forward and input gradient in C++) agrees with the fp64 formula to
    bf16 rounding and with the PyTorch version it replaces to one bf16 step (the sums run in another order)."""
    torch.manual_seed(0)
    x = (torch.randn(3, 7, 64) * 2).bfloat16().requires_grad_()
    w = (torch.rand(64) + 0.5).bfloat16()  # frozen
    g = torch.randn(3, 7, 64).bfloat16()

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        y = kernels.rms_norm(x, w, 1e-5)
        (dx,) = torch.autograd.grad(y, x, g)
        return y.float(), dx.float()

    fast = run()
    xd = x.detach().double().requires_grad_()
    ref = w.double() * (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5))
    (dref,) = torch.autograd.grad(ref, xd, g.double())
    assert (fast[0].double() - ref).abs().max() <= 3e-2 and (fast[1].double() - dref).abs().max() <= 3e-2
    monkeypatch.setattr(kernels, "_rms_ext", lambda x, w: None)
    slow = run()
    for f, s in zip(fast, slow, strict=True):
        step = s.abs().clamp_min(2.0**-100) * 2.0**-7  # one bf16 step at each value
        assert ((f - s).abs() <= step + 1e-6).all()


needs_bf16_kernels = pytest.mark.skipif(
    kernels.native_with("exact_silu") is None, reason="needs the C++ kernels on AVX512-BF16"
)
# the row kernels a forward without gradients takes: AVX512-BF16's, or AVX2's (SLEEF's 8-wide expf for the SwiGLU)
needs_vector_rows = pytest.mark.skipif(
    kernels.native_with("exact_silu") is None and kernels.native_with("silu_rows") is None,
    reason="needs the C++ kernels on AVX512-BF16 or AVX2",
)


@needs_bf16_kernels
@pytest.mark.parametrize("T", [5, 37])
def test_bf16_causal_attention_softmax_one_pass_each_way(T: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 training's causal attention (two products around the C++ softmax, `causal_softmax_` and its backward)
    agrees with the fp64 formula as closely as the ATen version it replaces: values and the three gradients, over
    a row length below one vector (T=5) and one with a tail (T=37), grouped-query heads stacked."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, T, 64).bfloat16().requires_grad_() for h in (6, 2, 2))
    g = torch.randn(2, 6, T, 64).bfloat16()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qd, kd.repeat_interleave(3, 1), vd.repeat_interleave(3, 1), is_causal=True)
    want = (ref, *torch.autograd.grad(ref, (qd, kd, vd), g.double()))

    def errors() -> list[float]:
        out = kernels.causal_attention(q, k, v)
        got = (out, *torch.autograd.grad(out, (q, k, v), g))
        return [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want, strict=True)]

    calls: list[int] = []
    fused = kernels._CausalAttention.apply
    monkeypatch.setattr(kernels._CausalAttention, "apply", lambda *a: calls.append(1) or fused(*a))
    fast = errors()
    assert calls == [1]
    monkeypatch.setitem(kernels._native, "exact_silu", False)  # the ATen path: baddbmm, softmax, bmm
    stock = errors()
    assert calls == [1]
    for f, s in zip(fast, stock, strict=True):
        assert f <= max(2 * s, 1e-2), (fast, stock)


@needs_bf16_kernels
def test_bf16_training_residual_sum_and_norm_in_one_pass_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block's residual sum and the RMSNorm that reads it (`RMSNorm.add_norm`), one C++ pass each way in bf16
    training (`kernels.add_rms_norm`), give what `x + a`, the RMSNorm kernel and autograd's accumulation give, bit for
    bit: the sum, the norm, and the gradients of both summands (the norm's backward plus the sum's gradient from
    the next residual). A training step of the CPU backend takes it in every layer (the frozen ones below the
    adapters too)."""
    torch.manual_seed(0)
    x, a = (torch.randn(3, 7, 64).bfloat16().requires_grad_() for _ in range(2))
    w = (1 + 0.1 * torch.randn(64)).bfloat16()
    dh, dy = torch.randn(3, 7, 64).bfloat16(), torch.randn(3, 7, 64).bfloat16()
    fused = kernels.add_rms_norm(x, a, w, 1e-5)
    assert fused is not None
    h = x + a
    stock = (h, kernels.rms_norm(h, w, 1e-5))
    for f, s in zip(fused, stock, strict=True):
        assert torch.equal(f, s)
    grads = [torch.autograd.grad(out, (x, a), (dh, dy)) for out in (fused, stock)]
    assert all(torch.equal(f, s) for f, s in zip(*grads, strict=True))
    assert not torch.equal(grads[0][0], dh)  # (the norm's part is in it)
    _, step = _adapted_training_step(torch.bfloat16, n_layers=3, adapted=2, hidden_dim=64, seq=19, dim=128)
    calls = _spy(monkeypatch, "add_rms_norm")
    assert step()[2].abs().sum() > 0 and len(calls) == 3


@needs_vector_rows
def test_bf16_training_rotary_embedding_is_apply_ropes_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rotation and head split of bf16 training (`CpuAttention.heads`, one C++ pass each way) round as
    `model.apply_rope` does: a training step's loss and adapter gradients are equal with and without it."""
    _, step = _adapted_training_step(torch.bfloat16, n_layers=3, adapted=2, hidden_dim=64, seq=19, dim=128)
    calls = _spy(monkeypatch, "rope_qkv")
    fast = step()
    assert len(calls) == 3  # every layer: the one below the adapters too (no gradient there, the same kernels)
    monkeypatch.setattr(kernels, "rope_qkv", lambda *a: None)
    stock = step()
    assert fast[1].abs().sum() > 0
    for s, f in zip(stock, fast, strict=True):
        assert torch.equal(s, f)


@needs_vector_rows
def test_a_prefill_without_gradients_takes_the_bit_exact_swiglu_and_rotation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside training too (a prompt's prefill, scoring), a bf16 forward takes the SwiGLU and RoPE kernels whose
    values are ATen's bit for bit (a 512-token prefill of SmolLM2-135M: 0.74x the time): the logits of a no-grad
    forward with a fresh adapter are equal with and without them."""
    cfg = la.ModelConfig(vocab_size=64, dim=128, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=32)
    model = _cpu_model(cfg, torch.bfloat16, adapted=2)
    with torch.no_grad():
        model.adapters["a"].gates.normal_(0, 0.5)
    ids = torch.randint(0, cfg.vocab_size, (2, 21), generator=torch.Generator().manual_seed(3))
    swiglu, rope = _spy(monkeypatch, "swiglu"), _spy(monkeypatch, "rope_qkv")
    with torch.no_grad():
        fast = model(ids, adapter="a")
        assert len(swiglu) == 3 and len(rope) == 3
        monkeypatch.setattr(kernels, "swiglu", lambda h: None)
        monkeypatch.setattr(kernels, "rope_qkv", lambda *a: None)
        stock = model(ids, adapter="a")
    assert torch.equal(fast, stock)


_FAULTS = """
import resource, sys, torch
from llama_adapter.backends.cpu import allocator

def faults():  # page faults of allocating, touching and freeing a 48 MB buffer 10 times (above glibc's 32 MB cap)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(48 << 20, dtype=torch.uint8).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

before = faults()
print(before, allocator.keep_freed_memory(), faults(), allocator.why_not_tuned())
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_training_keeps_freed_buffers_instead_of_page_faulting_them_in_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """`CpuBackend.prepare_training` (allocator.keep_freed_memory) raises glibc's mmap and trim thresholds, so a
    buffer freed and allocated again every step is reused rather than mapped afresh and faulted in page by page;
    LLAMA_ADAPTER_MALLOC_TUNING=0, the user's own MALLOC_* settings or a preloaded allocator leave it alone."""
    import os
    import subprocess
    import sys

    from llama_adapter.backends.cpu import allocator

    env = {
        k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")
    }
    # counted in 4 KiB pages: without the transparent huge pages `import llama_adapter` asks PyTorch for (with them
    # a fresh buffer faults in 2 MiB at a time, and the count no longer tells a reused buffer from a new one)
    env["THP_MEM_ALLOC_ENABLE"] = "0"
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    before, tuned, after, _ = out.stdout.split(maxsplit=3)
    pages = 10 * (48 << 20) // 4096
    assert int(before) > pages // 2  # each allocation mapped afresh
    assert tuned == "True" and int(after) < pages // 5  # the first one grows the heap; the other nine reuse it
    for name, value in (("LLAMA_ADAPTER_MALLOC_TUNING", "0"), ("MALLOC_ARENA_MAX", "2"), ("LD_PRELOAD", "x.so")):
        monkeypatch.setattr(os, "environ", {**env, name: value})
        assert name in (allocator.why_not_tuned() or "")


@needs_bf16_kernels
@pytest.mark.parametrize(("K", "d"), [(10, 64), (2, 16), (33, 48), (64, 128)])
def test_bf16_training_gated_prompt_attention_one_pass_each_way(K: int, d: int) -> None:
    """bf16 training's prompt half of eq. 8 added to the token half (`add_prompt_attention`, one C++ pass each way,
    in fp32) agrees with the fp64 formula at least as closely as the ATen ops it replaces, in the output and in
    every gradient (queries, token output, prompt keys and values, gates), for one to four vectors of 16 prompt
    keys and heads of one to eight vectors of 16 channels; with zero gates the output is the token attention's bit
    for bit (zero-init holds on this path); a training step of the CPU backend takes it."""
    torch.manual_seed(0)
    B, H, n_kv, T = 2, 6, 2, 19
    q, y = (torch.randn(B, H, T, d).bfloat16().requires_grad_() for _ in range(2))
    pk, pv = (torch.randn(1, n_kv, K, d).bfloat16().requires_grad_() for _ in range(2))
    gates = torch.randn(1, H).requires_grad_()
    g = torch.randn(B, H, T, d).bfloat16()
    leaves = (q, y, pk, pv, gates)

    def run(fn: Callable[[PromptKV], torch.Tensor], gate: torch.Tensor) -> list[torch.Tensor]:
        prompts = PromptKV(pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1), gate.expand(B, H))
        out = fn(prompts)
        return [out, *torch.autograd.grad(out, leaves, g)]

    fused = lambda p: kernels.add_prompt_attention(y, q, p)  # noqa: E731
    stock = lambda p: y + la.zero_init_attention.ZeroInitAttention().gated_prompt_attention(q, p)  # noqa: E731
    fast, slow = run(fused, torch.tanh(gates)), run(stock, torch.tanh(gates))
    qd, yd, kd, vd, gd = (t.detach().double().requires_grad_() for t in leaves)
    scores = torch.einsum("bgrtd,bgkd->bgrtk", qd.view(B, n_kv, H // n_kv, T, d), kd.expand(B, -1, -1, -1))
    o = torch.einsum("bgrtk,bgkd->bgrtd", (scores / d**0.5).softmax(-1), vd.expand(B, -1, -1, -1))
    ref = yd + torch.tanh(gd).expand(B, H)[:, :, None, None] * o.reshape(B, H, T, d)
    want = [ref, *torch.autograd.grad(ref, (qd, yd, kd, vd, gd), g.double())]
    for f, s, w in zip(fast, slow, want, strict=True):
        err = lambda t: ((t.double() - w).abs().max() / w.abs().max()).item()  # noqa: E731, B023
        assert err(f) <= max(1.5 * err(s), 2e-3), (err(f), err(s))
    assert torch.equal(run(fused, gates * 0)[0], y)


@needs_bf16_kernels
def test_bf16_training_eq8_whole_is_causal_then_prompt_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eq. 8 of a bf16 training step as one function (`gated_causal_attention`: the causal token attention, then the
    prompt kernel adding the gated prompt half) computes what `causal_attention` followed by `add_prompt_attention`
    computes: the output and the gradients of keys, values, prompts and gates bit for bit; the queries' two
    gradients are summed inside their product (one rounding instead of two), no further from fp64 than the pair's
    sum. A training step of the CPU backend takes it in every adapted layer."""
    torch.manual_seed(0)
    B, H, n_kv, T, d, K = 2, 6, 2, 19, 64, 10
    q = torch.randn(B, H, T, d).bfloat16().requires_grad_()
    k, v = (torch.randn(B, n_kv, T, d).bfloat16().requires_grad_() for _ in range(2))
    pk, pv = (torch.randn(1, n_kv, K, d).bfloat16().requires_grad_() for _ in range(2))
    gates = torch.randn(1, H).requires_grad_()
    g = torch.randn(B, H, T, d).bfloat16()
    leaves = (q, k, v, pk, pv, gates)

    Eq8 = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PromptKV], torch.Tensor | None]

    def run(fn: Eq8, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
        cast = [t.detach().to(dtype).requires_grad_() for t in leaves]
        qq, kk, vv, ppk, ppv, gg = cast
        prompts = PromptKV(ppk.expand(B, -1, -1, -1), ppv.expand(B, -1, -1, -1), torch.tanh(gg).expand(B, H))
        out = fn(qq, kk, vv, prompts)
        assert out is not None
        return [out, *torch.autograd.grad(out, cast, g.to(dtype))]

    def exact(qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, p: PromptKV) -> torch.Tensor:
        y = F.scaled_dot_product_attention(qq, kk.repeat_interleave(3, 1), vv.repeat_interleave(3, 1), is_causal=True)
        return y + la.zero_init_attention.ZeroInitAttention().gated_prompt_attention(qq, p)

    whole = run(kernels.gated_causal_attention)
    pair = run(lambda qq, kk, vv, p: kernels.add_prompt_attention(kernels.causal_attention(qq, kk, vv), qq, p))
    for i, (w, p) in enumerate(zip(whole, pair, strict=True)):
        assert i == 1 or torch.equal(w, p), i
    ref = run(exact, torch.float64)[1]
    err = lambda t: ((t.double() - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
    assert 0 < err(whole[1]) <= err(pair[1]) * 1.1, (err(whole[1]), err(pair[1]))
    _, step = _adapted_training_step(torch.bfloat16, n_layers=3, adapted=2, hidden_dim=64, seq=19, dim=128)
    calls = _spy(monkeypatch, "gated_causal_attention")
    assert step()[2].abs().sum() > 0 and len(calls) == 2


@needs_bf16_kernels
def test_bf16_training_step_with_every_cpu_kernel_agrees_with_the_stock_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole bf16 training step on the CPU backend (RoPE, eq. 8's causal and prompt attention, SwiGLU, RMSNorm
    alone and with the residual sum, the frozen weights' oneDNN packs: each used) gives the loss and adapter
    gradients of the stock PyTorch ops to bf16 precision: the kernels change roundings, not results."""
    monkeypatch.setattr(kernels, "TRAINING_PACK_MIN_ROWS", 1)  # (this batch is small)
    monkeypatch.setattr(kernels, "_PACK_GAIN", 1e9)  # keep the packs however they timed
    _, step = _adapted_training_step(torch.bfloat16, n_layers=4, adapted=3, hidden_dim=256, seq=30, dim=256)
    calls: set[str] = set()
    kinds = ("rope_qkv", "gated_causal_attention", "swiglu", "rms_norm", "add_rms_norm", "frozen_linear")
    for name in kinds:
        fn = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _fn=fn, _n=name: calls.add(_n) or _fn(*a))
    fast = step()
    assert calls == set(kinds)
    monkeypatch.setattr(kernels, "use_cpu_training_kernels", lambda x: False)
    stock = step()
    assert abs(fast[0] - stock[0]) <= 1e-3 * abs(stock[0])
    for f, s in zip(fast[1:], stock[1:], strict=True):
        assert s.abs().sum() > 0 and (f - s).norm() <= 3e-2 * s.norm()


def _engines() -> list[str]:
    """The engines of training's fused causal attention this CPU runs: AVX512-BF16 wherever there is one, and AMX."""
    kind = kernels._native.get("fused_attention", "") if kernels.native_with("fused_attention") is not None else ""
    return ["avx512", "amx"] if kind == "amx" else ["avx512"] if kind else []


ENGINES = [
    pytest.param(e, marks=pytest.mark.skipif(e not in _engines(), reason=f"needs {e.upper()}-BF16"))
    for e in ("avx512", "amx")
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("rep", "T", "d"),
    [(3, 256, 64), (1, 32, 64), (4, 96, 128), (2, 64, 64), (3, 37, 64), (2, 5, 128), (3, 17, 64), (1, 1, 64)],
)
def test_bf16_training_causal_attention_fused_per_group_is_the_batched_products(
    engine: str, rep: int, T: int, d: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 training's fused causal attention (`fused_causal_attention`: one pass per key/value group, only the
    blocks on or below the diagonal multiplied, the probabilities made again in backward from the softmax's row
    stats; lengths padded to a multiple of 32) computes what the batched products around the C++ softmax compute:
    the output and the gradients of q, k and v, alone and as eq. 8's function (q's gradient summed with the prompt
    half's in its product). On AMX tiles bit for bit at lengths the tiles divide (at padded lengths a key's gradient
    sums its rows in other pieces: within a bf16 rounding); with AVX512-BF16 dot products, whose fp32 sums run in
    another order than oneDNN's, within a bf16 rounding everywhere. Its backward keeps the softmax's row stats, not
    the [T, T] probabilities."""
    torch.manual_seed(0)
    B, n_kv, K = 2, 2, 10
    H = rep * n_kv
    leaves = [torch.randn(B, h, T, d).bfloat16().requires_grad_() for h in (H, n_kv, n_kv)]
    pk, pv = (torch.randn(1, n_kv, K, d).bfloat16().requires_grad_() for _ in range(2))
    gates = torch.randn(1, H).requires_grad_()
    g = torch.randn(B, H, T, d).bfloat16()

    def both() -> list[torch.Tensor]:
        q, k, v = leaves
        plain = kernels.causal_attention(q, k, v)
        prompts = PromptKV(pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1), torch.tanh(gates).expand(B, H))
        eq8 = kernels.gated_causal_attention(q, k, v, prompts)
        assert eq8 is not None
        return [
            plain,
            *torch.autograd.grad(plain, leaves, g),
            eq8,
            *torch.autograd.grad(eq8, [*leaves, pk, pv, gates], g),
        ]

    def run() -> tuple[list[torch.Tensor], list[tuple[int, ...]]]:
        shapes: list[tuple[int, ...]] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            return both(), shapes

    monkeypatch.setitem(kernels._native, "fused_attention", engine)
    assert kernels._fused_attention(T, d) == engine
    fused, fused_saved = run()
    monkeypatch.setitem(kernels._native, "fused_attention", "")
    products, products_saved = run()
    for i, (a, p) in enumerate(zip(fused, products, strict=True)):
        if engine == "amx" and T % 32 == 0:
            assert torch.equal(a, p), i
        else:  # another order of the fp32 sums (or, padded, zero rows between the heads): last bits
            assert ((a.float() - p.float()).abs().max() <= 2**-8 * p.float().abs().max()).item(), i
    probabilities, stats = (B * n_kv, rep * T, T), (B * n_kv, rep * T, 2)
    assert stats in fused_saved and probabilities in products_saved
    assert probabilities not in fused_saved or T == d  # (where T == d, q has that shape too)


@pytest.mark.parametrize("engine", ENGINES)
def test_fused_causal_attention_is_the_naive_equation_within_bf16_rounding(engine: str) -> None:
    """Eq. 8's token half, naively in fp64 from the same bf16 inputs (softmax over the causal scores q k^T / sqrt(d)
    with k and v repeated per query head): the fused pass's output and gradients are as close to it as the batched
    products' are (bf16 results of fp32 sums; a missing or doubled block would be off by whole units)."""
    torch.manual_seed(1)
    B, H, n_kv, T, d = 2, 6, 2, 80, 64
    q, k, v = (torch.randn(B, h, T, d).bfloat16() for h in (H, n_kv, n_kv))
    g = torch.randn(B, H, T, d).bfloat16()
    ext = kernels.native()
    assert ext is not None
    qg, kg, vg, gg = (x.reshape(B * n_kv, -1, d).contiguous() for x in (q, k, v, g))
    y, stats = ext.fused_causal_attention(qg, kg, vg, d**-0.5, engine)
    dq, dk, dv = ext.fused_causal_attention_backward(gg, qg, kg, vg, stats, d**-0.5, None, True, True, True, engine)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    kr, vr = (x.repeat_interleave(H // n_kv, dim=1) for x in (k64, v64))
    scores = (q64 @ kr.transpose(-1, -2) * d**-0.5).masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    ref = scores.softmax(-1) @ vr
    ref.backward(g.double())
    for got, want in zip((y, dq, dk, dv), (ref, q64.grad, k64.grad, v64.grad), strict=True):
        err = (got.double().reshape(want.shape) - want).abs().max().item()
        assert err <= 2**-7 * want.abs().max().item(), err


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("seq", [33, 30])
def test_bf16_training_step_takes_the_fused_attention_with_the_same_values(
    engine: str, seq: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused kernels take heads of 64 or 128 channels and any length (padded to a multiple of 32); a bf16
    training step takes them in every layer, with the loss and adapter gradients of the batched products:
    on AMX tiles bit for bit at a length of 32, within bf16 roundings at 29 (padded) and with AVX512-BF16."""
    monkeypatch.setitem(kernels._native, "fused_attention", engine)
    assert kernels._fused_attention(40, 128) == kernels._fused_attention(32, 64) == engine
    assert not kernels._fused_attention(64, 48)
    _, step = _adapted_training_step(torch.bfloat16, n_layers=3, adapted=2, hidden_dim=64, seq=seq, dim=256)
    taken: list[str] = []
    check = kernels._fused_attention
    monkeypatch.setattr(kernels, "_fused_attention", lambda T, d: taken.append(check(T, d)) or taken[-1])
    fused = step()
    assert taken == [engine] * 3  # the adapted layers, and the frozen one below them (its forward only)
    monkeypatch.setitem(kernels._native, "fused_attention", "")
    products = step()
    assert taken[3:] == [""] * 3
    for a, p in zip(fused, products, strict=True):
        if engine == "amx" and seq == 33:
            assert torch.equal(a, p)
        else:
            assert ((a - p).abs().max() <= 1e-2 * p.abs().max()).item()


class _ProductDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """The multiply-adds of every matrix product dispatched while active, by the dtype of its operands."""

    PRODUCTS = {"aten.mm": 0, "aten.bmm": 0, "aten.addmm": 1, "aten.baddbmm": 1}  # (any overload: out= too)

    def __init__(self) -> None:
        super().__init__()
        self.flops: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        first = self.PRODUCTS.get(str(func.overloadpacket))
        if first is not None:
            a, b = args[first], args[first + 1]
            self.flops[a.dtype] = self.flops.get(a.dtype, 0) + a.numel() * b.shape[-1]
        return func(*args, **(kwargs or {}))


def test_where_bf16_products_are_slow_training_multiplies_widened_operands(tiny_base: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """On CPUs where oneDNN has no bf16 matmul (AVX2 alone: AMD Zen 2/3, Intel client chips) ATen's bf16 products
    are plain loops (a SmolLM2-135M training step 208 s there, against 6 s for fp32). There the products of a bf16
    training step (projections both ways, the attention's, the loss's head both ways) run in fp32 on the widened
    operands, rounded to bf16 where the bf16 products round: what stays bf16 is the adapter's own prompt K/V
    projections (K rows a layer), and the loss and the adapter's gradients are those of the bf16 products within
    their rounding."""
    m = la.load_model(tiny_base, dtype=torch.bfloat16)
    a = m.add_adapter("a", la.AdapterConfig(prompt_length=3, layers=2))
    with torch.no_grad():
        a.gates.normal_(0, 0.5)
    m.train()
    from llama_adapter.training.loss import batch_loss

    ids = torch.randint(3, m.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}

    def run() -> tuple[torch.Tensor, list[torch.Tensor], dict[torch.dtype, int]]:
        m.zero_grad(set_to_none=True)
        with _ProductDtypes() as seen:
            loss, _ = batch_loss(m, "a", batch)
            loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.trainable_parameters("a")], seen.flops

    loss_ref, grads_ref, _ = run()
    monkeypatch.setattr(kernels, "_onednn_bf16", lambda: False)
    for feature in ("bf16_dot", "exact_silu"):  # (an AVX512-BF16 CPU always has oneDNN's bf16: as on AVX2 alone)
        monkeypatch.setitem(kernels._native, feature, False)
    monkeypatch.setitem(kernels._native, "fused_attention", "")
    loss, grads, flops = run()
    assert flops.get(torch.bfloat16, 0) < 0.01 * flops[torch.float32], flops
    torch.testing.assert_close(loss, loss_ref, rtol=2e-2, atol=0)
    for g, r in zip(grads, grads_ref, strict=True):
        assert (g.float() - r.float()).abs().max() <= 0.1 * r.float().abs().max() + 1e-6
