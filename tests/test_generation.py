"""Decoding: greedy/sampling, per-row adapters in one batch, EOS per row, stop strings, streaming, CLI."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import llama_adapter as la
from llama_adapter.backends import backend_of
from llama_adapter.cli import main
from llama_adapter.inference.decoder import BatchDecoder, DecodeRequest, merge_prompt_kv
from llama_adapter.inference.generate import generate, generate_tokens, stream_generate
from llama_adapter.inference.sampling import SamplingParams
from llama_adapter.inference.text_stream import TextStream
from llama_adapter.zero_init_attention import PromptKV

PROMPTS = ["Tell me about alpacas.", "the quick brown fox", "### Instruction:\n1 + 2 =", "The answer is"]


@pytest.fixture(scope="module")
def model(tiny_base, device):
    m = la.load_model(tiny_base, dtype=torch.float32, device=device)
    torch.manual_seed(0)
    for name, k, layers in (("a", 4, 3), ("b", 6, 2), ("c", 4, 4)):
        a = m.add_adapter(name, la.AdapterConfig(prompt_length=k, layers=layers))
        with torch.no_grad():
            a.gates.normal_(0, 2.0)
            a.prompts.mul_(0.5)
    return m


def _reference(model, ids, adapter, n):
    """Plain greedy decoding without a cache: full forward over the growing sequence, one row."""
    dev = model.tok_embeddings.weight.device
    x = torch.tensor([ids], device=dev)
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(x, adapter=adapter)[0, -1].argmax())
            if t in model.config.eos_token_ids:
                break
            out.append(t)
            x = torch.cat([x, torch.tensor([[t]], device=dev)], dim=1)
    return out


def test_greedy_matches_uncached_reference(model):
    ids = model.tokenizer.encode(PROMPTS[0], bos=True)
    got = generate_tokens(model, [ids], adapter="a", max_new_tokens=12, temperature=0.0)[0]
    assert got == _reference(model, ids, "a", 12)


def test_mixed_batch_equals_each_row_alone(model):
    adapters = ["a", None, "b", "c"]
    batch = generate_tokens(
        model,
        [model.tokenizer.encode(p, bos=True) for p in PROMPTS],
        adapter=adapters,
        max_new_tokens=10,
        temperature=0.0,
    )
    for p, ad, row in zip(PROMPTS, adapters, batch, strict=True):
        alone = generate_tokens(
            model, [model.tokenizer.encode(p, bos=True)], adapter=ad, max_new_tokens=10, temperature=0.0
        )[0]
        assert row == alone
    texts = generate(model, PROMPTS, adapter=adapters, max_new_tokens=10, temperature=0.0)
    assert texts == [model.tokenizer.decode(r).rstrip("\ufffd") for r in batch]
    assert len(set(map(tuple, batch))) > 1


def test_continuous_batching_small_slots_equal(model):
    """More prompts than slots: rows join as others finish; results match the full batch."""
    adapters = ["a", None, "b", "c"] * 2
    prompts = PROMPTS * 2
    full = generate(model, prompts, adapter=adapters, max_new_tokens=8, temperature=0.0)
    small = generate(model, prompts, adapter=adapters, max_new_tokens=8, temperature=0.0, max_batch_size=3)
    assert full == small


def test_eos_per_row_stops_early(model):
    """A row that hits EOS leaves the batch; the others go on, and nothing runs to the limit needlessly."""
    ids = model.tokenizer.encode(PROMPTS[1], bos=True)
    first = generate_tokens(model, [ids], max_new_tokens=3, temperature=0.0)[0]
    eos_saved = list(model.config.eos_token_ids)
    dec_steps = []
    try:
        model.config.eos_token_ids = [first[1]]  # make the 2nd token of row 0 an EOS
        from llama_adapter.inference.generate import iter_events

        ends = {}
        for ev in iter_events(
            model,
            [ids, model.tokenizer.encode(PROMPTS[0], bos=True)],
            max_new_tokens=6,
            temperature=0.0,
            on_step=lambda: dec_steps.append(1),
        ):
            if ev.finished:
                ends[ev.seq.tag] = (ev.seq.finish_reason, len(ev.seq.out_ids))
    finally:
        model.config.eos_token_ids = eos_saved
    assert ends[0] == ("stop", 1)
    assert ends[1][0] in ("length", "stop")


def _draws(logits: torch.Tensor, n: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """n tokens drawn for one row of logits [V], as n rows of a batch, each with its own seeded generator."""
    from llama_adapter.inference.sampling import sample

    rows = logits[None].expand(n, -1)
    knobs = (torch.full((n,), temperature), torch.full((n,), top_p), torch.full((n,), top_k))
    return sample(rows, *knobs, [torch.Generator().manual_seed(i) for i in range(n)])


def test_sampler_draws_from_the_nucleus_in_proportion(monkeypatch: pytest.MonkeyPatch) -> None:
    """Top-p keeps the tokens with at most top_p of the probability ranked before them (ties ranked by token id)
    and draws among them in proportion: 4,000 seeded draws land on the nucleus only, at its renormalised
    frequencies (within 4 standard deviations); top-k cuts it further; top-p 1 draws from every token; a nucleus
    wider than the CANDIDATES ranked by topk is ranked whole; rows draw alike alone and in a batch of every kind."""
    from llama_adapter.inference import sampling

    g = torch.Generator().manual_seed(0)
    ids = torch.randperm(300, generator=g)[:4]  # the likely tokens, somewhere in a vocabulary of 300
    logits = torch.full((300,), -30.0)
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits[ids] = probs.log()
    n = 4000

    def assert_frequencies(got: torch.Tensor, tokens: torch.Tensor, p: torch.Tensor) -> None:
        counts = torch.stack([(got == t).sum() for t in tokens]).double()
        assert int(counts.sum()) == n  # nothing drawn outside
        want = p.double() / p.sum() * n
        assert ((counts - want).abs() <= 4 * (want * (1 - want / n)).sqrt()).all(), (counts, want)

    assert_frequencies(_draws(logits, n, top_p=0.75), ids[:3], probs[:3])  # 0.9 before the 4th: cut
    assert_frequencies(_draws(logits, n, top_p=0.75, top_k=2), ids[:2], probs[:2])
    assert_frequencies(_draws(logits, n, top_p=0.95), ids, probs)
    # temperature 0.5 squares them: 0.53, 0.3, 0.13, 0.03 of their sum, 0.83 before the 3rd, 0.97 before the 4th
    assert_frequencies(_draws(logits, n, temperature=0.5, top_p=0.9), ids[:3], probs[:3] ** 2)
    everything = _draws(torch.zeros(8), n)  # top-p 1: the whole (here flat) distribution
    assert_frequencies(everything, torch.arange(8), torch.ones(8))

    flat = torch.zeros(1000)  # a nucleus of 501 equal tokens, past the 64 candidates: ranked whole, ties by id
    wide = _draws(flat, n, top_p=0.5)
    assert int(wide.max()) == 500 and len(wide.unique()) > 450
    tied = torch.full((300,), -5.0)
    tied[[7, 3, 5]] = 2.0  # three tokens tied first: a tiny top-p keeps the one of lowest id, however it is found
    assert set(_draws(tied, 50, top_p=0.01).tolist()) == {3}
    monkeypatch.setattr(sampling, "CANDIDATES", 1)
    assert set(_draws(tied, 50, top_p=0.01).tolist()) == {3} and set(_draws(tied, 50, top_p=0.5).tolist()) == {3, 5}
    monkeypatch.undo()
    for _ in range(5):  # 100 tokens tied first: topk's 64 are any of them, the nucleus is the lowest id
        many = torch.full((1000,), -5.0)
        many[torch.randperm(1000, generator=g)[:100]] = 2.0
        assert set(_draws(many, 20, top_p=0.001).tolist()) == {int((many == 2.0).nonzero()[0])}

    # one batch of a candidate row, a whole-distribution row, a wide row and a greedy row = each row alone
    rows = torch.stack([logits, torch.zeros(300), flat[:300], logits])
    knobs = (torch.tensor([0.7, 1.0, 1.0, 0.0]), torch.tensor([0.75, 1.0, 0.5, 0.75]), torch.zeros(4, dtype=torch.long))

    def gens() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in (11, 12, 13, 14)]

    for _ in range(3):
        together = sampling.sample(rows, *knobs, gens())
        alone = [sampling.sample(rows[i : i + 1], *(k[i : i + 1] for k in knobs), gens()[i : i + 1]) for i in range(4)]
        assert together.tolist() == torch.cat(alone).tolist()
        assert int(together[3]) == int(logits.argmax())


def test_sampling_seed_reproducible_and_batch_independent(model):
    p = PROMPTS[0]
    a = generate(model, [p], adapter="a", temperature=1.0, top_p=0.9, seed=123, max_new_tokens=12)
    b = generate(model, [PROMPTS[1], p], adapter=[None, "a"], temperature=1.0, top_p=0.9, seed=123, max_new_tokens=12)
    assert a[0] == b[1]
    outs = {generate(model, [p], temperature=1.5, top_p=1.0, seed=s, max_new_tokens=12)[0] for s in range(4)}
    assert len(outs) > 1
    # top_k=1 is greedy
    assert generate(model, [p], temperature=1.0, top_k=1, seed=1, max_new_tokens=8) == generate(
        model, [p], temperature=0.0, max_new_tokens=8
    )


def test_stop_strings_and_streaming(model):
    full = generate(model, [PROMPTS[0]], adapter="a", temperature=0.0, max_new_tokens=16)[0]
    assert len(full) > 6
    stop = full[3:5]
    cut = generate(model, [PROMPTS[0]], adapter="a", temperature=0.0, max_new_tokens=16, stop=[stop])[0]
    assert cut == full[: full.find(stop)]
    pieces: dict[int, str] = {0: "", 1: ""}
    for i, d in stream_generate(
        model, [PROMPTS[0], PROMPTS[2]], adapter=["a", "b"], temperature=0.0, max_new_tokens=16, stop=[stop]
    ):
        assert d and stop not in d
        pieces[i] += d
    ref = generate(model, [PROMPTS[0], PROMPTS[2]], adapter=["a", "b"], temperature=0.0, max_new_tokens=16, stop=[stop])
    assert [pieces[0], pieces[1]] == ref


def test_text_stream_utf8_safe():
    class ByteTok:  # each id is one UTF-8 byte
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    s = TextStream(ByteTok(), stop=["é!"])
    out = [s.push(b) for b in "añb€é".encode()] + [s.push(ord("!"))] + [s.finish()]
    assert all("\ufffd" not in d for d in out)
    assert "".join(out) == "añb€"
    s = TextStream(ByteTok())
    out = [s.push(b) for b in "x€".encode()[:-1]] + [s.finish()]
    assert "".join(out) == "x"


def test_sampling_params_validation():
    for bad in (
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(temperature=-1),
        dict(max_new_tokens=-1),
        dict(top_k=-2),
        dict(max_new_tokens=True),
        dict(stop=[""]),
        dict(seed="x"),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_merge_prompt_kv_and_images(model):
    """Union of layers, padded prompt lengths, base rows; and per-row image features through visual_proj."""
    with torch.no_grad():
        pa, pb = model.prompt_kv("a", 1), model.prompt_kv("b", 1)
    merged = merge_prompt_kv([pa, None, pb])
    assert sorted(merged) == sorted(set(pa) | set(pb))
    li = max(merged)
    assert merged[li].k.shape[:3] == (3, 2, 6) and merged[li].mask is not None
    assert float(merged[li].gate[1].abs().sum()) == 0.0
    # multi-modal plumbing: a visual projection attached by hand
    torch.manual_seed(1)
    dev = model.tok_embeddings.weight.device
    model.adapters["c"].visual_proj = nn.Linear(8, model.config.dim).to(dev)
    try:
        feats = torch.randn(2, 8).to(dev)
        with_img = generate(
            model, [PROMPTS[0]] * 2, adapter="c", image_features=feats, temperature=0.0, max_new_tokens=8
        )
        without = generate(model, [PROMPTS[0]], adapter="c", temperature=0.0, max_new_tokens=8)[0]
        zero = generate(
            model,
            [PROMPTS[0]],
            adapter="c",
            image_features=torch.zeros(1, 8, device=dev),
            temperature=0.0,
            max_new_tokens=8,
        )[0]
        assert zero == without
        assert with_img[0] != without or with_img[1] != without
        alone = generate(model, [PROMPTS[0]], adapter="c", image_features=feats[1:], temperature=0.0, max_new_tokens=8)[
            0
        ]
        assert alone == with_img[1]
    finally:
        model.adapters["c"].visual_proj = None


def test_random_init_adapter_runs_alone(model):
    model.add_adapter("r", la.AdapterConfig(prompt_length=3, layers=2, init="random"))
    try:
        dec = BatchDecoder(model, 4, 64)
        s1 = DecodeRequest(model.tokenizer.encode("hi", bos=True), "a")
        s2 = DecodeRequest(model.tokenizer.encode("hi", bos=True), "r")
        dec.add([s1])
        assert not dec.can_join(s2)
        out = generate(model, PROMPTS[:2], adapter=["r", "a"], temperature=0.0, max_new_tokens=4)
        assert len(out) == 2
    finally:
        model.remove_adapter("r")


def test_cli_generate(tiny_base, tmp_path, capsys):
    m = la.load_model(tiny_base, dtype=torch.float32)
    a = m.add_adapter("x", la.AdapterConfig(prompt_length=4, layers=2))
    a.meta["template"] = "alpaca"
    path = la.save_adapter(m, "x", tmp_path / "x.safetensors")
    rc = main(
        [
            "generate",
            "--base",
            str(tiny_base),
            "--adapter",
            str(path),
            "--dtype",
            "float32",
            "--temperature",
            "0",
            "--max-new-tokens",
            "6",
            "Tell me about alpacas.",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    # a zero-init adapter leaves the base unchanged: same text as the base on the templated prompt, less the space
    # that separates "### Response:" from the answer (a completion keeps it)
    from llama_adapter.templates import format_prompt

    prompt = format_prompt("alpaca", "Tell me about alpacas.")
    completion = generate(m, [prompt], temperature=0.0, max_new_tokens=6)[0]
    ref = generate(m, [prompt], temperature=0.0, max_new_tokens=6, strip_separator=True)[0]
    assert ref == (completion[1:] if completion.startswith(" ") else completion)
    assert out.rstrip("\n") == ref
    rc = main(
        [
            "generate",
            "--base",
            str(tiny_base),
            "--adapter",
            str(path),
            "--dtype",
            "float32",
            "--raw",
            "--temperature",
            "0",
            "--max-new-tokens",
            "6",
            "Tell me about alpacas.",
        ]
    )
    raw = capsys.readouterr().out
    assert raw.rstrip("\n") == generate(m, ["Tell me about alpacas."], temperature=0.0, max_new_tokens=6)[0]
    assert main(["generate", "--base", str(tiny_base), "--adapter", str(tmp_path / "missing.safetensors"), "hi"]) == 2


def test_cli_chat(tiny_base, monkeypatch, capsys):
    lines = iter(["hello", "/reset", "/adapter nope", "again", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    rc = main(["chat", "--base", str(tiny_base), "--dtype", "float32", "--max-new-tokens", "4", "--temperature", "0"])
    out = capsys.readouterr()
    assert rc == 0
    assert "no adapter named 'nope'" in out.out + out.err


@pytest.mark.cpu_only
def test_bf16_cpu_decode_path_computes_the_models_logits(tiny_base):
    """Decoding on a CPU (packed bf16 weights, fp32 cache and prompt K/V, token and gated prompt attention in
    one pass) gives the logits of a plain forward over the whole sequence; a fresh adapter changes nothing."""
    m = la.load_model(tiny_base, dtype=torch.bfloat16)
    torch.manual_seed(0)
    a = m.add_adapter("a", la.AdapterConfig(prompt_length=4, layers=3))
    m.add_adapter("fresh", la.AdapterConfig(prompt_length=5, layers=4))
    with torch.no_grad():
        a.gates.normal_(0, 2.0)
    backend_of(m).prepare_decoding()
    ids = torch.randint(3, m.config.vocab_size, (2, 9))

    def decode(adapter):
        cache = m.new_cache(2, 16, dtype=torch.float32)
        pkv = m.prompt_kv(adapter, 2)
        pkv = pkv and {li: PromptKV(p.k.float(), p.v.float(), p.gate, mask=p.mask) for li, p in pkv.items()}
        pos = torch.arange(9)[None].expand(2, 9)
        with torch.no_grad():
            out = [m(ids[:, :5], input_pos=pos[:, :5], cache=cache, prompt_kv=pkv)[:, -1]]
            out += [
                m(ids[:, t : t + 1], input_pos=pos[:, t : t + 1], cache=cache, prompt_kv=pkv)[:, -1]
                for t in range(5, 9)
            ]
        return torch.stack(out, 1).float()  # logits predicting tokens 5..9

    with torch.no_grad():
        full = m(ids, adapter="a")[:, 4:].float()
        base = m(ids)[:, 4:].float()
    got = decode("a")
    assert (got - full).abs().max() <= 0.03 * full.abs().max()
    assert (got - base).abs().max() > 0.1 * full.abs().max()  # the adapter's prompts really took part
    assert torch.equal(decode("fresh"), decode(None))
    ids_list = ids.tolist()
    assert generate_tokens(m, ids_list, adapter="fresh", max_new_tokens=6, temperature=0.0) == generate_tokens(
        m, ids_list, adapter=None, max_new_tokens=6, temperature=0.0
    )


def test_prompt_kv_projected_once_per_adapter_and_again_when_it_changes(tiny_base, monkeypatch):
    """Prompt K/V are cached per adapter across requests; training the adapter (in place) or changing the frozen
    projections they go through invalidates them."""
    m = la.load_model(tiny_base, dtype=torch.float32)
    torch.manual_seed(0)
    a = m.add_adapter("a", la.AdapterConfig(prompt_length=4, layers=3))
    with torch.no_grad():
        a.gates.normal_(0, 2.0)
    calls = []
    real = m.prompt_kv
    monkeypatch.setattr(m, "prompt_kv", lambda *args, **kw: calls.append(args) or real(*args, **kw))
    ids = m.tokenizer.encode(PROMPTS[0], bos=True)
    first = generate_tokens(m, [ids], adapter="a", max_new_tokens=6, temperature=0.0)
    assert generate_tokens(m, [ids, ids], adapter="a", max_new_tokens=6, temperature=0.0) == first * 2
    assert len(calls) == 1
    with torch.no_grad():
        a.gates.mul_(-1.0)  # an optimizer step, say
    assert generate_tokens(m, [ids], adapter="a", max_new_tokens=6, temperature=0.0)[0] == _reference(m, ids, "a", 6)
    assert len(calls) == 2
    with torch.no_grad():
        m.layers[-1].attention.wqkv.weight.mul_(1.5)
    assert generate_tokens(m, [ids], adapter="a", max_new_tokens=6, temperature=0.0)[0] == _reference(m, ids, "a", 6)
    assert len(calls) == 3


@pytest.mark.cuda
def test_bf16_cuda_decode_computes_the_models_logits(tiny_base, device):
    """On a GPU (the stock modules, a bf16 KV cache): decoding step by step through the cache gives the logits of
    one forward over the whole sequence, and a fresh adapter generates exactly what the base does."""
    m = la.load_model(tiny_base, dtype=torch.bfloat16, device=device)
    torch.manual_seed(0)
    a = m.add_adapter("a", la.AdapterConfig(prompt_length=4, layers=3))
    m.add_adapter("fresh", la.AdapterConfig(prompt_length=5, layers=4))
    with torch.no_grad():
        a.gates.normal_(0, 2.0)
    ids = torch.randint(3, m.config.vocab_size, (2, 9)).to(device)
    pos = torch.arange(9, device=device)[None].expand(2, 9)
    with torch.no_grad():
        cache = m.new_cache(2, 16)
        pkv = m.prompt_kv("a", 2)
        steps = [m(ids[:, :5], input_pos=pos[:, :5], cache=cache, prompt_kv=pkv)[:, -1]]
        steps += [
            m(ids[:, t : t + 1], input_pos=pos[:, t : t + 1], cache=cache, prompt_kv=pkv)[:, -1] for t in range(5, 9)
        ]
        got = torch.stack(steps, 1).float()
        full = m(ids, adapter="a")[:, 4:].float()
        base = m(ids)[:, 4:].float()
    assert (got - full).abs().max() <= 0.03 * full.abs().max()
    assert (got - base).abs().max() > 0.1 * full.abs().max()
    ids_list = ids.tolist()
    assert generate_tokens(m, ids_list, adapter="fresh", max_new_tokens=6, temperature=0.0) == generate_tokens(
        m, ids_list, adapter=None, max_new_tokens=6, temperature=0.0
    )


def test_rand_init_requests_with_their_own_projections_share_a_batch() -> None:
    """Requests of one rand-init adapter each carry their own prompt K/V (an image changes it): they may fill a
    batch together, but not beside a base row or another adapter."""
    from llama_adapter.adapter_batch import batch_prompt_kv

    def pkv(fill: float, random_init: bool = True) -> PromptKV:
        return PromptKV(
            torch.full((1, 2, 3, 4), fill), torch.full((1, 2, 3, 4), -fill), torch.zeros(1, 4), random_init=random_init
        )

    rows = [torch.tensor([0]), torch.tensor([1, 2])]
    out = batch_prompt_kv([(pkv(1.0), rows[0]), (pkv(2.0), rows[1])], 3)
    assert out.random_init and out.k[:, 0, 0, 0].tolist() == [1.0, 2.0, 2.0] and out.v[2, 0, 0, 0] == -2.0
    with pytest.raises(ValueError, match="rand-init"):
        batch_prompt_kv([(pkv(1.0), rows[0]), (pkv(2.0), rows[1])], 4)  # a base row
    with pytest.raises(ValueError, match="rand-init"):
        batch_prompt_kv([(pkv(1.0), rows[0]), (pkv(2.0, random_init=False), rows[1])], 3)
