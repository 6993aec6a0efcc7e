"""An 8-bit or 4-bit frozen base (`--quantize int8|int4`, `llama_adapter.quantize`): the method holds on it exactly
(a fresh adapter changes nothing, bit for bit), adapters train on it and move freely between precisions, and what
cannot run is a one-line error."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import nn

import llama_adapter as la
from llama_adapter.backends.cpu import CpuAttention, CpuBackend, PackedLinear
from llama_adapter.errors import QuantizeError, UserError

pytest.importorskip("torchao")
from torchao.prototype.quantization.int4 import Int4OpaqueTensor  # noqa: E402
from torchao.quantization import Int8Tensor, PerRow  # noqa: E402

pytestmark = pytest.mark.cpu_only  # the quantized bases run on the CPU only

from llama_adapter.quantize import (  # noqa: E402
    Int4Linear,
    Int8Linear,
    QuantizedAttention,
    check_quantize,
    is_quantized,
    quantization_of,
    quantize_model,
)

MODES = ("int8", "int4")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny models on a shared machine."""


def _ids(model: la.Transformer, rows: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", MODES)
def test_quantize_replaces_the_projections_and_keeps_the_rest(tiny_base: Path, mode: str) -> None:
    """Every block projection is the mode's quantized module with a torchao weight; the untied head is int8; the
    embedding and the norms keep the base dtype; the CPU backend neither packs nor re-wraps quantized layers, and the
    attention keeps both its quantized prompts and the CPU backend's RoPE kernel (until the backend goes)."""
    m = la.load_model(tiny_base, dtype=torch.bfloat16, quantize=mode)
    cls = Int8Linear if mode == "int8" else Int4Linear
    for layer in m.layers:
        a, ff = layer.attention, layer.feed_forward
        assert isinstance(a, QuantizedAttention) and isinstance(a, CpuAttention)
        assert type(a).kv_weights is QuantizedAttention.kv_weights and type(a).heads is CpuAttention.heads
        for lin in (a.wqkv, a.wo, ff.w13, ff.w2):
            assert type(lin) is cls and is_quantized(lin.weight) and not lin.weight.requires_grad
            assert getattr(lin, "packed", None) is None
    assert type(m.output) is Int8Linear
    assert not is_quantized(m.tok_embeddings.weight) and m.tok_embeddings.weight.dtype == torch.bfloat16
    assert quantization_of(m) == mode and isinstance(m.backend, CpuBackend)
    m.backend.prepare_decoding()  # packs nothing quantized
    assert not any(isinstance(x, PackedLinear) for x in m.layers.modules())
    m.backend.uninstall()
    assert all(type(layer.attention) is QuantizedAttention for layer in m.layers)


@pytest.mark.parametrize("mode", MODES)
def test_quantized_base_is_close_to_the_full_precision_one(tiny_base: Path, mode: str) -> None:
    """Weight-only quantization moves the logits a little (int4 more than int8), not to something else."""
    ref = la.load_model(tiny_base, dtype=torch.float32)
    q = la.load_model(tiny_base, dtype=torch.float32, quantize=mode)
    ids = _ids(ref)
    with torch.no_grad():
        a, b = ref(ids), q(ids)
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < (0.02 if mode == "int8" else 0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_fresh_adapter_leaves_the_quantized_base_bit_for_bit_unchanged(
    tiny_base: Path, mode: str, dtype: torch.dtype
) -> None:
    """Zero-init on a quantized base: logits with a fresh adapter equal the base's exactly, in a full forward, in
    a cached prefill + decode steps, and in the CPU backend's fused decode step."""
    m = la.load_model(tiny_base, dtype=dtype, quantize=mode)
    m.add_adapter("a", la.AdapterConfig(prompt_length=4, layers=3))
    ids = _ids(m)
    with torch.no_grad():
        assert torch.equal(m(ids), m(ids, adapter="a"))
        outs = []
        for adapter in (None, "a"):
            cache = m.new_cache(2, 16, dtype=m.backend.kv_cache_dtype)
            pkv = m.prompt_kv(adapter, 2)
            pos = torch.arange(9)[None].expand(2, 9)
            steps = [m(ids, input_pos=pos, cache=cache, prompt_kv=pkv)[:, -1]]
            tok = steps[-1].argmax(-1)
            for t in range(9, 12):
                p = torch.full((2,), t)
                steps.append(m(tok[:, None], input_pos=p[:, None], cache=cache, prompt_kv=pkv)[:, -1])
                if dtype == torch.bfloat16 and m.backend.fused_prompts(pkv) is not None:
                    steps.append(m.backend.decode_step(tok, p, cache, m.backend.fused_prompts(pkv)))
                tok = steps[-1].argmax(-1)
            outs.append(torch.stack(steps))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_the_adapter_through_the_quantized_base(tiny_base: Path, mode: str) -> None:
    """The base stays frozen and quantized; prompts and gates get fp32 gradients equal (to quantization
    rounding) to those through the dequantized weights."""
    q = la.load_model(tiny_base, dtype=torch.float32, quantize=mode)
    deq = la.load_model(tiny_base, dtype=torch.float32)
    for mq, md in zip(q.modules(), deq.modules(), strict=True):
        if isinstance(mq, (Int8Linear, Int4Linear)):
            md.weight = nn.Parameter(mq.dequantized().clone(), requires_grad=False)
    grads = []
    for m in (q, deq):
        torch.manual_seed(0)
        a = m.add_adapter("a", la.AdapterConfig(prompt_length=3, layers=3))
        with torch.no_grad():
            a.gates.fill_(0.5)  # past zero-init, so the prompts get gradients too
        m(_ids(m), adapter="a").float().logsumexp(-1).mean().backward()
        assert a.prompts.grad is not None and a.gates.grad is not None
        assert a.prompts.grad.dtype == torch.float32 and a.prompts.grad.abs().sum() > 0
        grads.append(torch.cat([a.prompts.grad.flatten(), a.gates.grad.flatten()]))
    assert not any(p.requires_grad for n, p in q.named_parameters() if not n.startswith("adapters."))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_adapter_trains_on_a_quantized_builtin_base(tmp_path: Path, mode: str) -> None:
    """A short run of the demo's recipe on the quantized built-in base lowers the loss as it does in fp32, and the
    file records what it was trained on. (Held-out accuracy per precision: benchmarks/quantized_quality.py.)"""
    from llama_adapter.builtin import corpus
    from llama_adapter.builtin.demo import demo_train_config
    from llama_adapter.training.loop import train

    recs = corpus.instruction_data("train", seed=0, n_per_task=20)
    losses = {}
    for q in (None, mode):
        cfg = demo_train_config(tmp_path / str(q), len(recs), 4, steps=12, progress=False, batch_size=16)
        cfg.quantize = q
        res = train(cfg, records=recs)
        first, last = res.metrics[0]["loss"], res.final_train_loss
        assert last is not None and last < 0.8 * first, (q, first, last)
        losses[q] = last
        with safe_open(str(res.adapter_path), "pt") as f:
            assert f.metadata()["base_weights"] == (q or "fp32")
    assert abs(losses[mode] - losses[None]) < 0.25 * losses[None]


def test_adapter_files_move_between_precisions(tiny_base: Path, tmp_path: Path) -> None:
    """The fingerprint ignores quantization: an adapter saved on a bf16 base loads on its int8 and int4 versions
    and back, with the same tensors, and its metadata says what it was saved from."""
    from llama_adapter.quantize import base_weights

    bf16 = la.load_model(tiny_base, dtype=torch.bfloat16)
    a = bf16.add_adapter("a", la.AdapterConfig(prompt_length=3, layers=2))
    a.meta["base_weights"] = base_weights(bf16)
    la.save_adapter(bf16, "a", tmp_path / "bf16.safetensors")
    for mode in MODES:
        q = la.load_model(tiny_base, dtype=torch.bfloat16, quantize=mode)
        b = q.load_adapter(tmp_path / "bf16.safetensors", "a")
        assert torch.equal(b.prompts, a.prompts) and b.meta["base_weights"] == "bf16"
        b.meta["base_weights"] = base_weights(q)
        la.save_adapter(q, "a", tmp_path / f"{mode}.safetensors")
        c = bf16.load_adapter(tmp_path / f"{mode}.safetensors", f"from_{mode}")
        assert torch.equal(c.prompts, a.prompts) and c.meta["base_weights"] == mode


def test_unsupported_combinations_are_one_line_user_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(QuantizeError, match="--fsdp"):
        check_quantize("int4", "cpu", fsdp=True)
    with pytest.raises(QuantizeError, match="CPU only"):
        check_quantize("int8", "cuda")
    with pytest.raises(QuantizeError, match="int8 or int4|one of"):
        check_quantize("int3")
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    monkeypatch.setitem(sys.modules, "torchao.prototype.quantization.int4", None)
    for mode in MODES:
        with pytest.raises(QuantizeError, match=r"pip install 'llama-adapter\[quant\]'") as e:
            check_quantize(mode, "cpu")
        assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_quantize_errors_come_before_loading(tmp_path: Path) -> None:
    """`load_model` and `finetune` refuse first (nothing is read): a GPU device, FSDP."""
    from llama_adapter.training.config import TrainConfig
    from llama_adapter.training.loop import train

    with pytest.raises(QuantizeError, match="CPU only"):
        la.load_model(tmp_path / "nothing-here", device="cuda", quantize="int8")
    cfg = TrainConfig(base=str(tmp_path / "nothing-here"), data=[], out=str(tmp_path / "o"), quantize="int4")
    cfg.fsdp = True
    with pytest.raises(QuantizeError, match="--fsdp"):
        train(cfg, records=[{"instruction": "a", "output": "b"}])


def test_importing_torchao_for_quantize_prints_nothing() -> None:
    """What torchao's import logs is not the user's to act on (its CUDA-only extensions failing to load on a CPU
    machine, torch deprecating its Enum registrations): `--quantize` keeps it off the terminal, and leaves the
    loggers' levels as they were. A fresh process, since torchao is imported once."""
    import subprocess

    code = (
        "import logging; from llama_adapter.quantize import _IMPORT_NOISE, _torchao; _torchao('int8'); "
        "_torchao('int4'); print([logging.getLogger(n).level for n in _IMPORT_NOISE])"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.split("\n")[-2] == "[0, 0]", run.stdout + run.stderr
    assert "Failed to load" not in run.stderr and "Enum subclass" not in run.stderr, run.stderr


def test_cli_quantize_flag(tiny_base: Path, capsys: pytest.CaptureFixture) -> None:
    """`--quantize` on generate (shared with chat and serve) and finetune; a bad value is argparse's error."""
    from llama_adapter.cli import main

    rc = main(["generate", "--base", str(tiny_base), "--quantize", "int4", "--max-new-tokens", "3", "hello"])
    assert rc == 0
    with pytest.raises(SystemExit):
        main(["generate", "--base", str(tiny_base), "--quantize", "int2", "hello"])
    assert "invalid choice" in capsys.readouterr().err
    rc = main(["generate", "--base", str(tiny_base), "--quantize", "int8", "--device", "cuda", "hello"])
    assert rc == 2 and "CPU only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--quantize", "fp8"])
    assert e.value.code == 2 and "--quantize: invalid choice" in capsys.readouterr().err


def test_quantize_model_after_loading_matches_quantizing_while_loading(tiny_base: Path) -> None:
    """`quantize_model` on a loaded base gives the same model as `load_model(..., quantize=)` (same torchao calls)."""
    for mode in MODES:
        a = la.load_model(tiny_base, dtype=torch.bfloat16, quantize=mode)
        b = quantize_model(la.load_model(tiny_base, dtype=torch.bfloat16), mode)
        ids = _ids(a)
        with torch.no_grad():
            assert torch.equal(a(ids), b(ids))
        with pytest.raises(QuantizeError, match="already quantized"):
            quantize_model(a, "int8" if mode == "int4" else "int4")


@pytest.mark.parametrize("rows,K", [(1, 96), (3, 80), (5, 96), (9, 80), (9, 96), (32, 576)])
def test_int8_kernel_computes_the_int8_product(rows: int, K: int) -> None:
    """The CPU backend's int8 product (decode-sized bf16 inputs) is x (q * scale)^T + bias, rounded once to bf16,
    on torchao's own int8 data; a row's result does not depend on the others (input rows go 4 at a time over each
    block of weights, widened in registers up to 4 rows and into a scratch past 4 where the weights go to bf16 dot
    products: the same sums either way); where the kernels are unavailable the layer takes torchao's product."""
    from llama_adapter.backends.cpu import kernels
    from llama_adapter.quantize import quantize_weight

    torch.manual_seed(0)
    w, bias = torch.randn(37, K) * 0.05, torch.randn(37)
    q = quantize_weight(w.bfloat16(), "int8")
    x = torch.randn(rows, K, dtype=torch.bfloat16)
    ref = x.double() @ (q.qdata.double() * q.scale.double()).t() + bias.double()
    with torch.no_grad():
        y = kernels.linear_int8(x, q.qdata, q.scale, bias)
        if kernels.native() is None or not kernels._native.get("int8"):
            assert y is None
            pytest.skip(f"no int8 kernel here ({kernels.native_unavailable()})")
        assert y is not None and y.dtype == torch.bfloat16
        torch.testing.assert_close(y.double(), ref.to(torch.bfloat16).double(), rtol=2**-7, atol=1e-6)
        for i in range(rows):
            assert torch.equal(y[i : i + 1], kernels.linear_int8(x[i : i + 1], q.qdata, q.scale, bias))
        assert kernels.linear_int8(x.float(), q.qdata, q.scale, bias) is None  # not bf16: torchao's product
    assert kernels.linear_int8(x.requires_grad_(), q.qdata, q.scale, bias) is None  # gradients: torchao's product


@pytest.mark.parametrize("mode", MODES)
def test_a_tied_head_decodes_from_an_int8_copy(tmp_path: Path, mode: str) -> None:
    """A quantized base with tied embeddings takes decoding's logits from an int8 copy of the embedding matrix (as
    llama.cpp's 8- and 4-bit files do), not its full-precision pack; lookups and the training loss keep the matrix."""
    from tiny import make_checkpoint

    m = la.load_model(make_checkpoint(tmp_path, "qwen2", tie_word_embeddings=True), dtype=torch.bfloat16, quantize=mode)
    backend = m.backend
    assert isinstance(backend, CpuBackend) and m.output is None and m.int8_head is not None
    qdata, scale = m.int8_head
    w = m.tok_embeddings.weight
    assert qdata.dtype == torch.int8 and qdata.shape == w.shape and not is_quantized(w)
    backend.prepare_decoding()
    assert backend.packed_head is None  # no second full-precision copy of the head
    h = torch.randn(3, w.shape[1]).bfloat16()
    with torch.no_grad():
        got = backend.logits(h).float()
        want = (h.float() @ (qdata.float() * scale[:, None]).T).bfloat16().float()
        full = h.float() @ w.float().T
    assert torch.allclose(got, want, atol=1e-2, rtol=1e-2)  # the int8 product (fp32 sums, rounded to bf16)
    assert 0 < ((got - full).norm() / full.norm()).item() < 0.02  # close to the bf16 head's, not equal
    with torch.enable_grad():
        assert torch.equal(backend.logits(h), torch.nn.functional.linear(h, w))  # training: the full matrix


def test_int8_weights_move_into_one_arena_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`int8_into_huge_pages` lays every int8 projection's rows and the tied head's int8 copy end to end in one arena
    (here with the threshold and alignment lowered to 4 KiB: a tiny base has less than a huge page); the logits, those
    of the tied head's int8 copy, and the weights' dequantized values bit for bit what they were."""
    from tiny import make_checkpoint

    from llama_adapter.backends.cpu import kernels
    from llama_adapter.quantize import int8_into_huge_pages

    path = make_checkpoint(tmp_path, "qwen2", tie_word_embeddings=True)
    m = la.load_model(path, dtype=torch.bfloat16, quantize="int8")
    lins = [x for x in m.modules() if isinstance(x, Int8Linear)]
    assert m.int8_head is not None and lins
    ids, h = _ids(m), torch.randn(2, m.config.dim, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        before = [m(ids), m.backend.logits(h)]  # (the tied head's logits: the int8 copy's product)
    dq = [lin.weight.dequantize() for lin in lins]
    monkeypatch.setattr(kernels, "HUGE_PAGE", 4096)
    int8_into_huge_pages(m)
    rows = [lin.weight.qdata for lin in lins] + [m.int8_head[0]]
    for a, b in zip(rows, rows[1:], strict=False):
        assert b.data_ptr() == a.data_ptr() + a.numel()  # end to end, in the order of the modules
    assert rows[0].data_ptr() % 4096 == 0
    with torch.no_grad():
        after = [m(ids), m.backend.logits(h)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(torch.equal(a, lin.weight.dequantize()) for a, lin in zip(dq, lins, strict=True))


def test_int4_quantizes_blocks_of_rows_into_the_pack_of_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """int4 weights are quantized a block of rows at a time (so loading never holds torchao's temporaries for a
    whole fused projection); the result is torchao's pack of the whole weight, bit for bit, including a short
    last block."""
    import llama_adapter.quantize as q

    monkeypatch.setattr(q, "INT4_CHUNK_ROWS", 128)
    w = torch.randn(128 * 3 + 48, 96).bfloat16()
    whole = Int4OpaqueTensor.from_hp(w, [1, q.INT4_GROUP_SIZE])
    blocks: Any = q.quantize_weight(w, "int4")
    assert isinstance(blocks, Int4OpaqueTensor) and blocks.shape == w.shape
    assert torch.equal(blocks.qdata, whole.qdata) and torch.equal(blocks.scale_and_zero, whole.scale_and_zero)
    x = torch.randn(3, 96).bfloat16()
    assert torch.equal(torch.nn.functional.linear(x, blocks), torch.nn.functional.linear(x, whole))


def test_int8_quantizes_blocks_of_rows_into_the_tensors_of_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """int8 weights too are quantized a block of rows at a time (torchao's temporaries for a whole output head were
    ~4x its bf16 size): one scale per row, so the blocks give torchao's tensors of the whole weight, bit for bit,
    including a short last block."""
    import llama_adapter.quantize as q

    monkeypatch.setattr(q, "INT8_CHUNK_ROWS", 64)
    w = (torch.randn(64 * 3 + 17, 96) * torch.rand(64 * 3 + 17, 1) * 4).bfloat16()
    whole = Int8Tensor.from_hp(w, PerRow())
    blocks: Any = q.quantize_weight(w, "int8")
    assert isinstance(blocks, Int8Tensor) and blocks.shape == w.shape and blocks.dtype == w.dtype
    for part in ("qdata", "scale", "zero_point"):
        assert torch.equal(getattr(blocks, part), getattr(whole, part)), part
    assert blocks.block_size == whole.block_size
    x = torch.randn(3, 96).bfloat16()
    assert torch.equal(torch.nn.functional.linear(x, blocks), torch.nn.functional.linear(x, whole))


def test_int4_loading_quantizes_q_k_v_and_gate_up_as_they_arrive(tmp_path: Path) -> None:
    """Where every part of a fused projection is a multiple of 64 rows, loading quantizes each part as it is read
    and joins the packs (the full-precision fused weight is never made): the same weights as quantizing the fused
    one, bit for bit."""
    from tiny import make_checkpoint

    import llama_adapter.quantize as q

    path = make_checkpoint(tmp_path, tokenizer=False, hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    cfg = la.load_model(path, dtype=torch.bfloat16).config
    assert all(r % q.INT4_PACK_ROWS == 0 for n in ("x.wqkv.weight", "x.w13.weight") for r in q._parts_rows(n, cfg))
    a = la.load_model(path, dtype=torch.bfloat16, quantize="int4")
    b = quantize_model(la.load_model(path, dtype=torch.bfloat16), "int4")
    for (name, wa), wb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if isinstance(wa, Int4OpaqueTensor):
            assert torch.equal(wa.qdata, wb.qdata) and torch.equal(wa.scale_and_zero, wb.scale_and_zero), name
        elif is_quantized(wa):  # the int8 output head
            assert torch.equal(wa.qdata, wb.qdata) and torch.equal(wa.scale, wb.scale), name
        else:
            assert torch.equal(wa, wb), name
    assert sum(isinstance(w, Int4OpaqueTensor) for w in a.state_dict().values()) == 4 * cfg.n_layers


@pytest.mark.parametrize("mode", MODES)
def test_loading_reads_what_it_quantizes_a_block_of_rows_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A quantized load reads each matrix it quantizes from the file a block of rows at a time (the full-precision
    matrix is never held: the peak of loading is the quantized base plus one block), cast to the base dtype block
    by block; int8's fused parts, quantized joined, are read whole. The result is the same model, bit for bit, as
    quantizing the full-precision one."""
    from tiny import make_checkpoint

    import llama_adapter.quantize as q
    from llama_adapter.loading import FileRows

    path = make_checkpoint(
        tmp_path,
        tokenizer=False,
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    monkeypatch.setattr(q, "INT8_CHUNK_ROWS", 48)
    monkeypatch.setattr(q, "INT4_CHUNK_ROWS", 64)
    reads: dict[str, list[int]] = {}
    rows = FileRows.rows

    def spy(self: FileRows, start: int, stop: int) -> torch.Tensor:
        reads.setdefault(self.key, []).append(stop - start)
        return rows(self, start, stop)

    monkeypatch.setattr(FileRows, "rows", spy)
    a = la.load_model(path, dtype=torch.bfloat16, quantize=mode)
    cfg = a.config
    fused_parts = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    for key, sizes in reads.items():
        n = cfg.vocab_size if "lm_head" in key else cfg.hidden_dim if "gate" in key or "up_" in key else cfg.dim
        n = cfg.n_kv_heads * cfg.head_dim if "k_proj" in key or "v_proj" in key else n
        assert sum(sizes) == n, (key, sizes)  # every row read once
        if mode == "int8" and any(part in key for part in fused_parts):
            assert sizes == [n], key  # read whole, to be joined and then quantized
        else:  # the output head is int8 in both modes
            assert max(sizes) == min(n, q.INT8_CHUNK_ROWS if mode == "int8" or "lm_head" in key else 64), (key, sizes)
    assert len(reads) == 1 + 7 * cfg.n_layers  # the head and every projection; the embedding and norms as before
    b = quantize_model(la.load_model(path, dtype=torch.bfloat16), mode)
    for (name, wa), wb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if is_quantized(wa):
            names = wa.__tensor_flatten__()[0]
            assert all(torch.equal(getattr(wa, n), getattr(wb, n)) for n in names), name
        else:
            assert torch.equal(wa, wb), name


def test_an_int8_projection_for_the_decode_plan_is_kept_until_its_weight_changes(tiny_base: Path) -> None:
    """A batch's decode plan is made again at every change of membership: an int8 layer hands it the same
    projection while its tensors are the same and unchanged, and a new one after an in-place change or a new tensor
    (the plan must never run on stale scales or without its bias)."""
    from llama_adapter.backends.cpu import kernels

    if kernels.native_with("int8") is None:
        pytest.skip(f"no int8 kernel here ({kernels.native_unavailable()})")
    m = la.load_model(tiny_base, dtype=torch.bfloat16, quantize="int8")
    layer = m.layers[0].attention.wo
    assert isinstance(layer, Int8Linear)
    first = layer.decode_projection()
    assert first is not None and layer.decode_projection() is first
    w: Any = layer.weight
    with torch.no_grad():
        w.scale.mul_(2)
    again = layer.decode_projection()
    assert again is not None and again is not first and torch.equal(again.b, w.scale.reshape(-1).float())
    layer.bias = torch.nn.Parameter(torch.ones(layer.out_features), requires_grad=False)  # a new tensor, version 0
    with_bias = layer.decode_projection()
    assert with_bias is not None and with_bias is not again and with_bias.bias is not None
    layer.bias = torch.nn.Parameter(torch.full((layer.out_features,), 2.0), requires_grad=False)  # version 0 again
    other = layer.decode_projection()
    assert other is not None and other.bias is not None and torch.equal(other.bias, layer.bias.float())
