"""The base model and the method, as a specification: parity with transformers, zero-init exactness,
equations 2-8 against a naive implementation, KV-cache decoding, mixed batches and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from naive import adapter_tensors, naive_logits
from tiny import make_checkpoint

import llama_adapter as la
from llama_adapter.errors import CheckpointError

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
FAMILIES = {
    "llama2": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama31": (
        "llama",
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_scaling=LLAMA3_ROPE,
            rope_theta=500000.0,
            eos_token_id=[2, 3],
        ),
    ),
    "mistral": ("mistral", dict(num_key_value_heads=2, head_dim=24)),
    # Mistral-7B-v0.1's sliding window (4096 positions there), shorter than the test's 40 tokens
    "mistral_window": ("mistral", dict(num_key_value_heads=2, sliding_window=8)),
    "qwen2": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # Qwen2.5's long-context setting: YaRN over an original context shorter than the test's 40 tokens
    "qwen2_yarn": (
        "qwen2",
        dict(
            tie_word_embeddings=True,
            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        ),
    ),
}

# the fields of a config.json the readers need, for tests of how they read the rest
_TINY_CONFIG = dict(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    mtype, kw = FAMILIES[request.param]
    return request.param, make_checkpoint(tmp_path_factory.mktemp(request.param), mtype, tokenizer=False, **kw)


def test_logits_match_transformers(family: tuple[str, Path], device: torch.device) -> None:
    import transformers

    name, path = family
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    ours = la.load_model(path, dtype=torch.float32, device=device)
    ids = torch.randint(0, ours.config.vocab_size, (2, 40)).to(device)
    with torch.no_grad():
        diff = (ref(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-4, f"{name}: max abs diff {diff}"
    if name == "qwen2":
        assert ours.config.qkv_bias and ours.layers[0].attention.wqkv.bias is not None
    if name == "llama31":
        assert ours.config.rope_scaling["rope_type"] == "llama3" and ours.config.eos_token_ids == [2, 3]
    if name == "mistral":
        assert ours.config.head_dim == 24
    if name == "mistral_window":
        assert ours.config.sliding_window == 8


def test_bf16_logits_as_close_to_fp32_as_transformers_bf16(family: tuple[str, Path], device: torch.device) -> None:
    """bf16 parity: two bf16 implementations round differently, so neither equals the other; ours must be no
    further from the fp32 logits than transformers' own bf16 forward is (within 2x plus one bf16 step of the largest
    logit), on the device under test."""
    import transformers

    name, path = family
    ref32 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    ref16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    ours = la.load_model(path, dtype=torch.bfloat16, device=device)
    ids = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        truth = ref32(ids).logits.float()
        got = ours(ids)
        assert got.dtype == torch.bfloat16
        ours_err = (got.float() - truth).abs().max().item()
        ref_err = (ref16(ids).logits.float() - truth).abs().max().item()
    step = 2.0**-7 * truth.abs().max().item()
    assert ours_err <= 2 * ref_err + step, f"{name}: ours {ours_err}, transformers bf16 {ref_err}"


def test_config_reads_top_level_rope_fields(tmp_path: Path) -> None:
    """Real Llama-3.1 checkpoints carry rope_theta/rope_scaling at the top level (transformers 4 style)."""
    import json

    c = {
        **_TINY_CONFIG,
        "model_type": "llama",
        "rope_theta": 500000.0,
        "rope_scaling": {**LLAMA3_ROPE, "rope_type": None, "type": "llama3"},
        "eos_token_id": [128001, 128008, 128009],
    }
    (tmp_path / "config.json").write_text(json.dumps(c))
    cfg = la.ModelConfig.from_hf(tmp_path / "config.json")
    assert cfg.rope_theta == 500000.0 and cfg.eos_token_ids == [128001, 128008, 128009]
    c["rope_scaling"] = LLAMA3_ROPE
    (tmp_path / "config.json").write_text(json.dumps(c))
    assert la.ModelConfig.from_hf(tmp_path / "config.json").rope_scaling["factor"] == 8.0


def test_config_reads_mistrals_sliding_window(tmp_path: Path) -> None:
    """Mistral's `sliding_window` is kept where it is shorter than the context (v0.1's 4096 of 32768), dropped where
    it is null (v0.2, v0.3) or no shorter; Qwen2's per-layer window (`use_sliding_window`) is refused in one line
    rather than applied to the wrong layers; the window is written back for a Mistral config."""
    import json

    c = {
        **_TINY_CONFIG,
        "model_type": "mistral",
        "max_position_embeddings": 32768,
        "sliding_window": 4096,
    }
    f = tmp_path / "config.json"
    for window, want in ((4096, 4096), (None, None), (32768, None)):
        f.write_text(json.dumps({**c, "sliding_window": window}))
        cfg = la.ModelConfig.from_hf(f)
        assert cfg.sliding_window == want
        assert cfg.to_hf_dict()["sliding_window"] == want
    f.write_text(json.dumps({**c, "model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 1}))
    with pytest.raises(CheckpointError, match="per-layer sliding window"):
        la.ModelConfig.from_hf(f)
    f.write_text(json.dumps({**c, "model_type": "qwen2", "use_sliding_window": False}))
    assert la.ModelConfig.from_hf(f).sliding_window is None  # (Qwen2's configs carry a window they do not use)


@pytest.mark.parametrize(
    "yarn",
    [
        {"factor": 4.0, "original_max_position_embeddings": 32},
        {"factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 16, "beta_slow": 2, "truncate": False},
        {"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 0.707},
        {"factor": 2.0, "original_max_position_embeddings": 128, "attention_factor": 1.25},
    ],
)
def test_yarn_frequencies_and_scale_are_transformers(yarn: dict[str, object]) -> None:
    """YaRN: each frequency interpolated, kept or blended on the ramp between beta_fast and beta_slow turns over
    the original context, and cos / sin scaled by the attention factor: as transformers computes them (its
    `ROPE_INIT_FUNCTIONS["yarn"]`), for the paper's defaults, other betas without truncation, DeepSeek's mscale
    pair and an explicit factor."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llama_adapter.model import rope_attention_factor, rope_frequencies

    hf = transformers.Qwen2Config(
        hidden_size=64, num_attention_heads=2, max_position_embeddings=8192, rope_theta=10000.0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, **yarn},
    )  # fmt: skip
    ref_inv, ref_scale = ROPE_INIT_FUNCTIONS["yarn"](hf, torch.device("cpu"))
    cfg = la.ModelConfig(
        vocab_size=10, dim=64, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=8, rope_theta=10000.0,
        rope_scaling={"rope_type": "yarn", **yarn}, max_seq_len=64,
    )  # fmt: skip
    torch.testing.assert_close(rope_frequencies(cfg), ref_inv, rtol=1e-6, atol=0)
    assert rope_attention_factor(cfg) == pytest.approx(ref_scale, rel=1e-12)
    model = la.Transformer(cfg)
    cos, sin = model.rope_table()
    f = torch.outer(torch.arange(64, dtype=torch.float32), ref_inv)
    torch.testing.assert_close(cos, torch.cat([f, f], -1).cos() * ref_scale)
    torch.testing.assert_close(sin[:, f.shape[1] :], f.sin() * ref_scale)


def test_config_fills_yarn_defaults_as_transformers(tmp_path: Path) -> None:
    """A top-level `rope_scaling` of type yarn without `original_max_position_embeddings` (or `factor`) takes them
    from `max_position_embeddings`, as transformers does, and the context becomes the original one times the
    factor; unsupported kinds fail with the file named."""
    import json

    c = {
        **_TINY_CONFIG,
        "model_type": "qwen2",
        "max_position_embeddings": 32768,
        "rope_scaling": {"type": "yarn", "factor": 4.0},
    }
    (tmp_path / "config.json").write_text(json.dumps(c))
    cfg = la.ModelConfig.from_hf(tmp_path / "config.json")
    s = cfg.rope_scaling
    assert s == {"type": "yarn", "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert cfg.max_seq_len == 131072  # what YaRN is added for: 4 x the original context (as vLLM reads it)
    c["rope_scaling"] = {"type": "yarn", "original_max_position_embeddings": 8192}
    (tmp_path / "config.json").write_text(json.dumps(c))
    assert la.ModelConfig.from_hf(tmp_path / "config.json").rope_scaling["factor"] == 4.0
    c["rope_scaling"] = {"type": "longrope", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(c))
    with pytest.raises(la.CheckpointError, match="rope scaling 'longrope' is not supported"):
        la.ModelConfig.from_hf(tmp_path / "config.json")


def _meta_state(model: la.Transformer) -> dict[str, torch.Tensor]:
    """Our weights in Meta's layout: interleaved-pair RoPE rows, separate wq/wk/wv and w1/w3."""
    c = model.config
    H, KV, d = c.n_heads, c.n_kv_heads, c.head_dim

    def unpermute(w: torch.Tensor, n: int) -> torch.Tensor:
        return w.view(n, 2, d // 2, -1).transpose(1, 2).reshape(n * d, -1)

    sd = {"tok_embeddings.weight": model.tok_embeddings.weight, "norm.weight": model.norm.weight}
    if model.output is not None:
        sd["output.weight"] = model.output.weight
    for i, layer in enumerate(model.layers):
        w = layer.attention.wqkv.weight
        sd[f"layers.{i}.attention.wq.weight"] = unpermute(w[: H * d], H)
        sd[f"layers.{i}.attention.wk.weight"] = unpermute(w[H * d : (H + KV) * d], KV)
        sd[f"layers.{i}.attention.wv.weight"] = w[(H + KV) * d :]
        sd[f"layers.{i}.attention.wo.weight"] = layer.attention.wo.weight
        w1, w3 = layer.feed_forward.w13.weight.chunk(2)
        sd[f"layers.{i}.feed_forward.w1.weight"] = w1
        sd[f"layers.{i}.feed_forward.w3.weight"] = w3
        sd[f"layers.{i}.feed_forward.w2.weight"] = layer.feed_forward.w2.weight
        sd[f"layers.{i}.attention_norm.weight"] = layer.attention_norm.weight
        sd[f"layers.{i}.ffn_norm.weight"] = layer.ffn_norm.weight
    return {k: v.detach().clone() for k, v in sd.items()}


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_layout_round_trip(tiny_base: Path, tmp_path: Path, shards: int) -> None:
    import json

    hf = la.load_model(tiny_base, dtype=torch.float32)
    c = hf.config
    sd = _meta_state(hf)
    (tmp_path / "params.json").write_text(
        json.dumps(
            {
                "dim": c.dim,
                "n_layers": c.n_layers,
                "n_heads": c.n_heads,
                "n_kv_heads": c.n_kv_heads,
                "vocab_size": -1,
                "hidden_dim": c.hidden_dim,
                "norm_eps": c.norm_eps,
                "rope_theta": c.rope_theta,
            }
        )
    )
    # model-parallel shards as Meta writes them: column-parallel on dim 0, row-parallel/embedding on dim 1
    dim1 = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")
    for s in range(shards):
        part = {}
        for k, v in sd.items():
            if v.dim() == 1:
                part[k] = v
            else:
                part[k] = v.chunk(shards, dim=1 if k.endswith(dim1) else 0)[s].clone()
        torch.save(part, tmp_path / f"consolidated.{s:02d}.pth")
    meta = la.load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, c.vocab_size, (1, 20))
    with torch.no_grad():
        assert torch.allclose(meta(ids), hf(ids), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fresh_adapter_is_exactly_the_base(tiny_base: Path, dtype: torch.dtype, device: torch.device) -> None:
    model = la.load_model(tiny_base, dtype=dtype, device=device)
    model.add_adapter("a", la.AdapterConfig(prompt_length=6, layers=3))
    model.add_adapter("lin", la.AdapterConfig(prompt_length=4, layers=4, gate="linear"))
    ids = torch.randint(0, model.config.vocab_size, (3, 17)).to(device)
    with torch.no_grad():
        base = model(ids)
        assert base.dtype == dtype
        assert torch.equal(model(ids, adapter="a"), base)
        assert torch.equal(model(ids, adapter="lin"), base)
        assert torch.equal(model(ids, adapter=["a", None, "lin"]), base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fresh_adapter_with_gradients_on(
    tiny_base: Path, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch, device: torch.device
) -> None:
    """Exactly what the README claims for a fresh adapter: bit for bit in inference mode; with gradients on, a
    CPU's training kernels sum in another order (within 16 x the dtype's epsilon x the largest logit), while the
    stock ops stay bit for bit in that mode too."""
    from llama_adapter.backends.cpu import kernels

    model = la.load_model(tiny_base, dtype=dtype, device=device)
    model.add_adapter("a", la.AdapterConfig(prompt_length=6, layers=3))
    ids = torch.randint(0, model.config.vocab_size, (3, 33)).to(device)
    with torch.no_grad():
        base = model(ids)
    with torch.inference_mode():
        assert torch.equal(model(ids, adapter="a"), base)
    with torch.enable_grad():
        assert torch.equal(model(ids), base)  # the base alone builds no graph: the same ops in both modes
        trained = model(ids, adapter="a")
    assert trained.requires_grad
    tol = 16 * torch.finfo(dtype).eps * base.float().abs().max()
    assert (trained.float() - base.float()).abs().max() <= tol
    monkeypatch.setattr(kernels, "use_cpu_training_kernels", lambda x: False)  # the stock ops (as on a GPU)
    with torch.enable_grad():
        assert torch.equal(model(ids, adapter="a"), base)


def _random_adapter(model: la.Transformer, name: str, cfg: la.AdapterConfig) -> None:
    a = model.add_adapter(name, cfg)
    with torch.no_grad():
        a.gates.uniform_(-1.5, 1.5)  # non-zero gates: a zero gate would hide a wrong scale or a RoPE on prompts
        a.prompts.normal_()


@pytest.mark.parametrize("gate", ["tanh", "linear"])
@pytest.mark.parametrize("n_kv", [4, 2], ids=["mha", "gqa"])
def test_matches_naive_equations(tmp_path: Path, gate: str, n_kv: int) -> None:
    path = make_checkpoint(tmp_path, tokenizer=False, num_key_value_heads=n_kv, seed=n_kv)
    model = la.load_model(path, dtype=torch.float32)
    _random_adapter(model, "a", la.AdapterConfig(prompt_length=5, layers=3, gate=gate))
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    prompts, gates = adapter_tensors(model, "a")
    if gate == "tanh":
        assert torch.allclose(gates[1], torch.tanh(model.adapters["a"].gates[0].detach()))
    with torch.no_grad():
        ours = model(ids, adapter="a")
    for b in range(2):
        ref = naive_logits(model, ids[b], prompts, gates)
        assert (ours[b] - ref).abs().max().item() <= 1e-5
    base_ref = naive_logits(model, ids[0])
    assert (ours[0] - base_ref).abs().max().item() > 1e-3, "non-zero gates must change the output"


def test_random_init_is_single_softmax(tiny_base: Path) -> None:
    model = la.load_model(tiny_base, dtype=torch.float32)
    _random_adapter(model, "r", la.AdapterConfig(prompt_length=4, layers=2, init="random"))
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    prompts, _ = adapter_tensors(model, "r")
    with torch.no_grad():
        ours = model(ids, adapter="r")
    for b in range(2):
        assert (ours[b] - naive_logits(model, ids[b], prompts, random_init=True)).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="rand-init"):
        model(ids, adapter=["r", None])


def test_incremental_decoding_matches_full_forward(tiny_base: Path, device: torch.device) -> None:
    model = la.load_model(tiny_base, dtype=torch.float32, device=device)
    _random_adapter(model, "a", la.AdapterConfig(prompt_length=5, layers=3))
    _random_adapter(model, "b", la.AdapterConfig(prompt_length=3, layers=2, gate="linear"))
    V = model.config.vocab_size
    lengths = [9, 6, 12]  # rows at different positions: right-padded prefill, then per-row decode
    seqs = [torch.randint(0, V, (n + 4,)).to(device) for n in lengths]
    rows = ["a", "b", None]
    with torch.no_grad():
        cache = model.new_cache(3, 64)
        pkv = model.prompt_kv(rows, 3)
        T = max(lengths)
        prefill = torch.zeros(3, T, dtype=torch.long, device=device)
        for i, n in enumerate(lengths):
            prefill[i, :n] = seqs[i][:n]
        out = model(prefill, input_pos=torch.arange(T, device=device)[None].expand(3, T), cache=cache, prompt_kv=pkv)
        got = {i: [out[i, n - 1]] for i, n in enumerate(lengths)}
        for step in range(4):
            tok = torch.stack([seqs[i][n + step] for i, n in enumerate(lengths)])[:, None]
            pos = torch.tensor(lengths, device=device)[:, None] + step
            o = model(tok, input_pos=pos, cache=cache, prompt_kv=pkv)
            for i in range(3):
                got[i].append(o[i, 0])
        for i, n in enumerate(lengths):
            full = model(seqs[i][None], adapter=rows[i])[0, n - 1 :]
            assert (torch.stack(got[i]) - full).abs().max().item() <= 1e-5


def test_mixed_batch_equals_rows_alone(tiny_base: Path, device: torch.device) -> None:
    model = la.load_model(tiny_base, dtype=torch.float32, device=device)
    _random_adapter(model, "a", la.AdapterConfig(prompt_length=5, layers=3))
    _random_adapter(model, "b", la.AdapterConfig(prompt_length=2, layers=4, gate="linear"))
    _random_adapter(model, "c", la.AdapterConfig(prompt_length=5, layers=1))
    ids = torch.randint(0, model.config.vocab_size, (5, 10)).to(device)
    rows = ["a", None, "b", "c", "a"]
    with torch.no_grad():
        mixed = model(ids, adapter=rows)
        for i, r in enumerate(rows):
            assert (mixed[i] - model(ids[i : i + 1], adapter=r)[0]).abs().max().item() <= 1e-5
    with pytest.raises(KeyError, match="no adapter named 'zz'"):
        model(ids[:1], adapter="zz")


def test_only_adapter_parameters_get_gradients(tiny_base: Path) -> None:
    model = la.load_model(tiny_base, dtype=torch.float32)
    model.add_adapter("a", la.AdapterConfig(prompt_length=4, layers=2))
    params = model.trainable_parameters("a")
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    for step in range(3):
        with torch.no_grad():  # an evaluation pass must not poison later training steps
            model(ids, adapter="a")
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1], adapter="a").flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        a = model.adapters["a"]
        assert a.gates.grad is not None and a.gates.grad.abs().sum() > 0
        assert a.prompts.grad is not None
        if step > 0:  # at step 0 the gate is zero, so the prompts' gradient is exactly zero
            assert a.prompts.grad.abs().sum() > 0
        for n, p in model.named_parameters():
            if not n.startswith("adapters."):
                assert p.grad is None and not p.requires_grad, n
        opt.step()
    assert {id(p) for p in params} == {id(a.prompts), id(a.gates)}


def test_layers_below_the_adapters_build_no_autograd_graph(tiny_base: Path) -> None:
    """In a training forward, the frozen layers below the lowest adapted one run in grad mode (a backend takes its
    training kernels there too) on an input cut off from autograd, so their outputs need no gradient and keep no
    graph; the adapted layers' outputs do. Without an adapter every layer runs as in inference."""
    model = la.load_model(tiny_base, dtype=torch.float32)
    n = model.config.n_layers
    model.add_adapter("a", la.AdapterConfig(prompt_length=4, layers=2))
    seen: list[tuple[bool, bool]] = []
    for layer in model.layers:
        layer.register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), o.requires_grad)))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    model(ids, adapter="a").sum().backward()
    assert seen == [(True, False)] * (n - 2) + [(True, True)] * 2
    assert model.adapters["a"].gates.grad is not None
    seen.clear()
    model(ids)  # the base alone with gradients on: its inference forward (no graph, no grad mode)
    assert seen == [(False, False)] * n


def test_7b_adapter_size(tmp_path: Path) -> None:
    cfg = la.ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008)
    with torch.device("meta"):
        model = la.Transformer(cfg)
    model.add_adapter("alpaca", la.AdapterConfig(prompt_length=10, layers=30))
    n = sum(p.numel() for p in model.trainable_parameters("alpaca"))
    assert n == 10 * 30 * 4096 + 30 * 32 == 1_229_760
    model.adapters["alpaca"] = la.Adapter(la.AdapterConfig(), 32, 4096, 32, device="cpu")
    path = la.save_adapter(model, "alpaca", tmp_path / "alpaca.safetensors")
    size_mib = path.stat().st_size / 2**20
    assert 4.6 < size_mib < 4.8, size_mib


def test_prompt_kv_projected_once_per_forward_and_reused_by_decode(tiny_base: Path, monkeypatch) -> None:
    import llama_adapter.adapter_batch as lm  # where the batch plan projects the prompts

    model = la.load_model(tiny_base, dtype=torch.float32)
    model.add_adapter("a", la.AdapterConfig(prompt_length=3, layers=3))
    calls = []
    real = lm.prompt_kv
    monkeypatch.setattr(lm, "prompt_kv", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    with torch.no_grad():
        model(ids, adapter="a")
        assert len(calls) == 3  # once per adapted layer, not per head or token
        cache, pkv = model.new_cache(2, 16), model.prompt_kv("a", 2)
        for t in range(8):
            model(ids[:, t : t + 1], input_pos=torch.full((2, 1), t), cache=cache, prompt_kv=pkv)
    assert len(calls) == 6  # the decode steps reused the request's prompt K/V


def test_grouped_query_sdpa_is_detected_without_docstrings() -> None:
    """`enable_gqa` support is found by calling SDPA, so `python -OO` (no docstrings) takes the same path."""
    import subprocess
    import sys

    code = "from llama_adapter.zero_init_attention import SDPA_GQA; print(SDPA_GQA)"
    out = subprocess.run([sys.executable, "-OO", "-c", code], capture_output=True, text=True, check=True).stdout
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    assert out.strip() == str((major, minor) >= (2, 5))


def test_one_vocabulary_for_the_two_attentions() -> None:
    """Table 5's attentions under either spelling: the paper's (zero-init, rand-init) and the file's (zero, random)."""
    from llama_adapter.training.config import TrainConfig

    assert la.AdapterConfig(init="rand-init").init == "random" and la.AdapterConfig(init="zero-init").init == "zero"
    assert TrainConfig(attention="random").attention == "rand-init" and TrainConfig().attention == "zero-init"
    with pytest.raises(ValueError):
        la.AdapterConfig(init="ones")  # type: ignore[arg-type]


def test_the_clis_dtype_names_are_the_configs() -> None:
    """The CLI spells the dtype names out (so that `--help` does not import torch): the same names as config."""
    from llama_adapter.cli.common import DTYPE_NAMES
    from llama_adapter.config import DTYPES

    assert list(DTYPE_NAMES) == list(DTYPES)
