"""GGUF bases: files written the way llama.cpp's converter writes them, loaded by us and by `transformers`.

Each file is made from a tiny `transformers` checkpoint (tests/tiny.py) with the `gguf` package's writer: llama.cpp's
metadata keys and tensor names, its q/k row permutation for the `llama` architecture (not for `qwen2`), norms kept
in F32 and the matrices in F32, F16 or Q8_0, a byte-level BPE vocabulary ('gpt2': tokens, types, merges) and a chat
template. Our loader must give the logits `transformers` gives for the same file, and the source checkpoint's
logits where the file is exact (F32).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import make_checkpoint

import llama_adapter as la
from llama_adapter.cli import main
from llama_adapter.gguf_loading import GGUFFile, _rope_scaling
from llama_adapter.loading import checkpoint_files

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TEXTS = ["The answer is (A).", "Tell me about alpacas.", "  two spaces, digits 0123 and ü!", ""]
QTYPES = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16}


def _llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows of a `llama` model: each head's two rotary halves interleaved."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)


def _llama3_rope_factors(c: dict) -> np.ndarray:
    """The per-frequency divisors llama.cpp writes as `rope_freqs.weight` for Llama-3.1-style rope scaling."""
    rope = c.get("rope_parameters") or c["rope_scaling"]
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    inv = 1.0 / (rope.get("rope_theta", 10000.0) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    old, lo, hi = rope["original_max_position_embeddings"], rope["low_freq_factor"], rope["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    smooth = np.clip((old / wavelen - lo) / (hi - lo), 0.0, 1.0)
    return (1.0 / ((1 - smooth) / rope["factor"] + smooth)).astype(np.float32)


def write_gguf(
    hf_dir: Path,
    out: Path,
    qtype: str = "F32",
    name: str = "tiny",
    template: str | None = TEMPLATE,
    split_max_tensors: int = 0,
) -> Path:
    """A GGUF file of the checkpoint in `hf_dir`, laid out as llama.cpp's convert_hf_to_gguf.py lays it out
    (`split_max_tensors`: in parts of at most that many tensors, named as llama-gguf-split names them)."""
    c = json.loads((hf_dir / "config.json").read_text())
    arch = "qwen2" if c["model_type"] == "qwen2" else "llama"  # llama.cpp writes Mistral as "llama"
    n_heads, n_kv = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // n_heads
    rope = c.get("rope_parameters") or {}
    w = gguf.GGUFWriter(str(out), arch, split_max_tensors=split_max_tensors)
    w.add_name(name)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", c.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7}[qtype])
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    n_tokens = len(tok["model"]["vocab"]) + sum(
        a["id"] not in tok["model"]["vocab"].values() for a in tok["added_tokens"]
    )
    tokens = [""] * n_tokens
    types = [int(gguf.TokenType.NORMAL)] * n_tokens
    for t, i in tok["model"]["vocab"].items():
        tokens[i] = t
    for a in tok["added_tokens"]:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = int(gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if template is not None:
        w.add_chat_template(template)
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(c))
    if rope.get("rope_type") == "yarn":  # as convert_hf_to_gguf.py writes Qwen2.5's
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for key, t in load_file(str(hf_dir / "model.safetensors")).items():
        a = t.float().numpy()
        if key in names:
            gname = names[key]
        else:
            _, _, i, rest = key.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{per_layer[module]}.{kind}"
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                a = _llamacpp_permute(a, n_heads if module == "self_attn.q_proj" else n_kv)
        if a.ndim == 1 or qtype == "F32":  # llama.cpp keeps norms and biases in F32
            w.add_tensor(gname, a.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(gname, a.astype(np.float16))
        else:
            w.add_tensor(
                gname,
                gguf.quants.quantize(a, gguf.GGMLQuantizationType[qtype]),
                raw_dtype=gguf.GGMLQuantizationType[qtype],
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _transformers_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return m(ids).logits


def _hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids).logits


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def qwen2_tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def llama_gguf(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tiny_base, tmp_path_factory.mktemp("gguf") / "tiny-llama-F32.gguf")


IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64, 120, 11, 5, 200]])


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_llama_logits_match_transformers_on_the_same_file(
    tiny_base: Path, tmp_path: Path, qtype: str, one_thread: None
) -> None:
    path = write_gguf(tiny_base, tmp_path / f"tiny-{qtype}.gguf", qtype)
    m = la.load_model(path, dtype=torch.float32)
    assert m.config.model_type == "llama" and m.config.n_kv_heads == 2 and m.config.head_dim == 16
    with torch.no_grad():
        ours = m(IDS)
    torch.testing.assert_close(ours, _transformers_logits(path, IDS), atol=1e-4, rtol=1e-4)
    if qtype == "F32":  # exact file: the source checkpoint's logits too (the q/k un-permutation undoes llama.cpp's)
        torch.testing.assert_close(ours, _hf_logits(tiny_base, IDS), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_qwen2_tied_with_bias_matches_transformers(
    qwen2_tied: Path, tmp_path: Path, qtype: str, one_thread: None
) -> None:
    path = write_gguf(qwen2_tied, tmp_path / f"qwen2-{qtype}.gguf", qtype)
    m = la.load_model(path, dtype=torch.float32)
    c = m.config
    assert c.model_type == "qwen2" and c.qkv_bias and c.tie_embeddings and m.output is None
    with torch.no_grad():
        ours = m(IDS)
    torch.testing.assert_close(ours, _transformers_logits(path, IDS), atol=1e-4, rtol=1e-4)
    if qtype == "F32":
        torch.testing.assert_close(ours, _hf_logits(qwen2_tied, IDS), atol=1e-4, rtol=1e-4)


def test_mistral_and_llama31_rope_freqs(tmp_path: Path, one_thread: None) -> None:
    """Mistral is written as `llama` (named so); Llama-3.1 rope scaling arrives as the `rope_freqs` tensor."""
    rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    hf = make_checkpoint(
        tmp_path / "hf", max_position_embeddings=1024, rope_scaling=dict(rope, original_max_position_embeddings=256)
    )
    (tmp_path / "gguf").mkdir()
    path = write_gguf(hf, tmp_path / "gguf" / "tiny-rope.gguf", name="Mistral tiny")
    m = la.load_model(path, dtype=torch.float32)
    c = m.config
    assert c.model_type == "mistral" and c.rope_scaling is not None and c.rope_scaling["rope_type"] == "freq_factors"
    assert len(c.rope_scaling["factors"]) == 8 and 1.0 < c.rope_scaling["factors"][3] < 8.0  # all three bands
    ids = torch.randint(3, 300, (1, 160), generator=torch.Generator().manual_seed(0))  # far enough to tell
    with torch.no_grad():
        torch.testing.assert_close(m(ids), _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_qwen2_yarn_rope_scaling(tmp_path: Path, one_thread: None) -> None:
    """YaRN arrives as llama.cpp's rope.scaling metadata (type, factor, original context) and gives transformers'
    logits past the original context; DeepSeek-style attention-scale keys are refused in one line."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    hf = make_checkpoint(tmp_path / "hf", "qwen2", max_position_embeddings=256, rope_scaling=dict(yarn))
    (tmp_path / "gguf").mkdir()
    path = write_gguf(hf, tmp_path / "gguf" / "tiny-yarn.gguf")
    m = la.load_model(path, dtype=torch.float32)
    assert m.config.rope_scaling == yarn
    ids = torch.randint(3, 300, (1, 100), generator=torch.Generator().manual_seed(0))  # past 32 positions
    with torch.no_grad():
        torch.testing.assert_close(m(ids), _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    w = gguf.GGUFWriter(str(tmp_path / "gguf" / "deepseek-like.gguf"), "qwen2")
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(40.0)
    w.add_rope_scaling_orig_ctx_len(4096)
    w.add_rope_scaling_yarn_log_mul(0.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(tmp_path / "gguf" / "deepseek-like.gguf", gguf.GGUFReader(tmp_path / "gguf" / "deepseek-like.gguf"))
    with pytest.raises(la.CheckpointError, match="YaRN with qwen2.rope.scaling.yarn_log_multiplier = 0.1"):
        _rope_scaling(f, 16)


def test_split_model_reads_from_its_first_part(tmp_path: Path, tiny_base: Path, llama_gguf: Path) -> None:
    """A model in parts (NAME-0000i-of-0000n.gguf) loads from the first: the same weights as the one-file model;
    another part, a missing part, or a first part renamed so its siblings cannot be found, is told in one line."""
    (tmp_path / "split").mkdir()
    write_gguf(tiny_base, tmp_path / "split" / "tiny.gguf", split_max_tensors=12)
    parts = sorted((tmp_path / "split").glob("*.gguf"))
    assert len(parts) >= 3 and parts[0].name == f"tiny-00001-of-{len(parts):05d}.gguf"
    whole, split = la.load_model(llama_gguf, dtype=torch.float32), la.load_model(parts[0], dtype=torch.float32)
    for (name, a), (_, b) in zip(whole.state_dict().items(), split.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert checkpoint_files(parts[0]) == parts
    with pytest.raises(
        la.CheckpointError, match=f"part 2 of a split GGUF model; pass its first part .*{parts[0].name}"
    ):
        la.load_config(parts[1])
    renamed = tmp_path / "split" / "first.gguf"
    parts[0].rename(renamed)
    with pytest.raises(la.CheckpointError, match="not named NAME-00001-of-"):
        la.load_config(renamed)
    (tmp_path / "missing").mkdir()
    for q in parts[:-1]:
        shutil.copy(q if q != parts[0] else renamed, tmp_path / "missing" / q.name)
    with pytest.raises(la.CheckpointError, match=f"{parts[-1].name}: part of the split GGUF model .* not found"):
        la.load_config(tmp_path / "missing" / parts[0].name)


def test_config_tokenizer_and_chat_template(llama_gguf: Path, tiny_base: Path) -> None:
    import transformers

    cfg, layout = la.load_config(llama_gguf)
    ref = la.load_config(tiny_base)[0]
    assert layout == "gguf"
    for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "head_dim", "norm_eps"):
        assert getattr(cfg, k) == getattr(ref, k), k
    assert cfg.rope_theta == ref.rope_theta and cfg.max_seq_len == ref.max_seq_len and cfg.rope_scaling is None
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.tie_embeddings, cfg.qkv_bias) == (1, [2], False, False)
    assert checkpoint_files(llama_gguf) == [llama_gguf]

    m = la.load_model(llama_gguf, dtype=torch.float32)
    tok = m.tokenizer
    assert tok is not None and (tok.bos_id, tok.eos_ids) == (1, [2])
    theirs = transformers.AutoTokenizer.from_pretrained(str(llama_gguf.parent), gguf_file=llama_gguf.name)
    source = la.Tokenizer.from_file(tiny_base / "tokenizer.json", ref)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False) == source.encode(text), text
        assert tok.decode(ids) == text
        assert tok.encode(text, bos=True, eos=True) == [1, *ids, 2]

    t = m.chat_template
    assert t is not None and t.source == TEMPLATE and t.special_tokens["bos_token"] == "<s>"
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = t.render(msgs, add_generation_prompt=True)
    assert text == "<s><|user|>Hi</s><|assistant|>Hello</s><|assistant|>"
    assert text == theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text)  # the special tokens the template writes are encoded as their ids
    assert ids == theirs.encode(text, add_special_tokens=False) and ids[0] == 1 and ids.count(2) == 2


def test_fresh_adapter_leaves_logits_unchanged(llama_gguf: Path, one_thread: None) -> None:
    m = la.load_model(llama_gguf, dtype=torch.float32)
    m.add_adapter("a", la.AdapterConfig(prompt_length=4, layers=2))
    with torch.no_grad():
        torch.testing.assert_close(m(IDS, adapter="a"), m(IDS))


def test_bf16_load_and_no_tokenizer(llama_gguf: Path) -> None:
    m = la.load_model(llama_gguf, dtype=torch.bfloat16, tokenizer=False)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in m.parameters())
    assert m.tokenizer is None and m.chat_template is None and m.source == str(llama_gguf)


def test_info_cli(llama_gguf: Path) -> None:
    rc, out, err = _cli("info", str(llama_gguf))
    assert rc == 0, err
    assert "gguf layout" in out and llama_gguf.name in out
    rc, out, _ = _cli("info", str(llama_gguf), "--json")
    info = json.loads(out)
    assert rc == 0 and info["layout"] == "gguf" and info["architecture"]["n_layers"] == 4


def test_errors_are_one_line_and_name_the_file(
    tmp_path: Path, llama_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    rc, _, err = _cli("info", str(tmp_path / "g.gguf"))
    assert rc == 2 and "gemma2" in err and "g.gguf" in err and len(err.strip().splitlines()) == 1

    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(la.CheckpointError, match=r"junk\.gguf: not a readable GGUF file"):
        la.load_config(tmp_path / "junk.gguf")
    with pytest.raises(la.CheckpointError, match="GGUF file not found"):
        la.load_model(tmp_path / "nope.gguf")

    def cannot(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
        raise NotImplementedError(qtype.name)

    monkeypatch.setattr(gguf.quants, "dequantize", cannot)
    with pytest.raises(la.CheckpointError, match=r"tiny-llama-F32\.gguf: tensor token_embd\.weight is stored as F32"):
        la.load_model(llama_gguf, tokenizer=False)
    monkeypatch.undo()

    other = tmp_path / "other.gguf"  # a file not yet opened (opened files are cached)
    other.write_bytes(llama_gguf.read_bytes())
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(la.CheckpointError, match=r"other\.gguf: .*pip install 'llama-adapter\[gguf\]'"):
        la.load_config(other)
