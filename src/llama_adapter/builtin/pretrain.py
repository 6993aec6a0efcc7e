"""The recipe that rebuilds the built-in base from nothing: tokenizer, pre-training, HF-layout checkpoint.

    llama-adapter pretrain --out DIR [--config recipes/builtin.yaml]

1. generate the corpus (`llama_adapter.builtin.corpus`, deterministic from seeds);
2. train a byte-level BPE tokenizer on it with `tokenizers` (digits split one per token);
3. pre-train a small LLaMA (`model.Transformer`, all parameters) with AdamW on packed sequences;
4. write `config.json` (`ModelConfig.to_hf_dict()`), `model.safetensors` under Hugging Face tensor names
   (our fused wqkv / w13 split back into q/k/v and gate/up), the tokenizer files, `generation_config.json`
   and a record of the recipe (`recipe.json`, `README.md`: configuration, time taken, final loss, probes).

The written directory loads through the ordinary loader: `load_model(DIR)`.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from llama_adapter.backends import install as install_backend
from llama_adapter.builtin import corpus
from llama_adapter.config import ModelConfig
from llama_adapter.model import Transformer

DEFAULT_RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "builtin.yaml"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


@dataclass
class PretrainConfig:
    # model
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 352
    vocab_size: int = 1024
    max_seq_len: int = 256
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    # data
    world_seed: int = corpus.WORLD_SEED
    corpus_seed: int = 0
    tokenizer_docs: int = 20000
    seq_len: int = 128
    gap_fraction: float = 0.1  # share of varied-gap records in the corpus (corpus._gap_record); 0: none
    # optimisation
    steps: int = 2000
    batch_size: int = 32
    lr: float = 5e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1  # 0: torch default
    save_dtype: str = "fp32"
    log_every: int = 50
    save_every: int = 0  # also write the checkpoint every N steps (to inspect a run in progress)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path) -> PretrainConfig:
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        flat: dict[str, Any] = {}
        for v in data.values() if all(isinstance(v, dict) for v in data.values()) else [data]:
            flat.update(v)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ValueError(f"{path}: unknown recipe keys {', '.join(unknown)}")
        return cls(**flat)

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(
            vocab_size=vocab_size,
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            hidden_dim=self.hidden_dim,
            norm_eps=1e-5,
            rope_theta=self.rope_theta,
            max_seq_len=self.max_seq_len,
            tie_embeddings=self.tie_embeddings,
            bos_token_id=1,
            eos_token_ids=[2],
            pad_token_id=None,
        )


# ---- tokenizer ---------------------------------------------------------------------------------------
def train_tokenizer(cfg: PretrainConfig) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        corpus.tokenizer_training_text(cfg.corpus_seed, cfg.tokenizer_docs, cfg.gap_fraction), trainer
    )
    return tok


def save_tokenizer(tok: Any, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "model_max_length": 256,
            },
            indent=2,
        )
        + "\n"
    )


# ---- data --------------------------------------------------------------------------------------------
def packed_batches(
    encode: Callable[[str], list[int]],
    seed: int,
    world_seed: int,
    batch_size: int,
    seq_len: int,
    bos: int,
    eos: int,
    gap_fraction: float = 0.0,
) -> Iterator[Tensor]:
    """[B, seq_len + 1] windows cut from the concatenated documents (<s> doc </s> <s> doc </s> ...)."""
    docs = corpus.pretrain_documents(seed, None, world_seed, gap_fraction)
    buf: list[int] = []
    need = batch_size * (seq_len + 1)
    while True:
        while len(buf) < need:
            buf.extend([bos, *encode(next(docs)), eos])
        yield torch.tensor(buf[:need]).view(batch_size, seq_len + 1)
        buf = buf[need:]


# ---- model -------------------------------------------------------------------------------------------
def init_weights(model: Transformer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = model.config.n_layers
    for name, p in model.named_parameters():
        if name.startswith("adapters."):
            continue
        if p.dim() == 1:
            torch.nn.init.ones_(p)
        else:
            std = 0.02 / math.sqrt(2 * n) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def hf_state_dict(model: Transformer) -> dict[str, Tensor]:
    """Our parameters under Hugging Face LLaMA names (fused q/k/v and gate/up split back)."""
    c = model.config
    sd: dict[str, Tensor] = {
        "model.embed_tokens.weight": model.tok_embeddings.weight,
        "model.norm.weight": model.norm.weight,
    }
    if model.output is not None:
        sd["lm_head.weight"] = model.output.weight
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    for i, layer in enumerate(model.layers):
        pre = f"model.layers.{i}."
        wq, wk, wv = layer.attention.wqkv.weight.split([q, kv, kv])
        gate, up = layer.feed_forward.w13.weight.split(c.hidden_dim)
        sd.update(
            {
                pre + "self_attn.q_proj.weight": wq,
                pre + "self_attn.k_proj.weight": wk,
                pre + "self_attn.v_proj.weight": wv,
                pre + "self_attn.o_proj.weight": layer.attention.wo.weight,
                pre + "mlp.gate_proj.weight": gate,
                pre + "mlp.up_proj.weight": up,
                pre + "mlp.down_proj.weight": layer.feed_forward.w2.weight,
                pre + "input_layernorm.weight": layer.attention_norm.weight,
                pre + "post_attention_layernorm.weight": layer.ffn_norm.weight,
            }
        )
    return sd


def save_checkpoint(model: Transformer, out: Path, dtype: torch.dtype = torch.float32) -> None:
    """config.json + model.safetensors + generation_config.json (tokenizer files are written separately)."""
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    hf = c.to_hf_dict()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_ids[0], "do_sample": False}, indent=2)
        + "\n"
    )
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in hf_state_dict(model).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; the file ships as package data


# ---- evaluation probes -------------------------------------------------------------------------------
def plain_probes(world_seed: int = corpus.WORLD_SEED, n: int = 40) -> list[tuple[str, str, str]]:
    """(task, plain-text prefix, expected continuation) on held-out items: what the base should *know*."""
    w = corpus.world(world_seed)
    rng = random.Random("probes")
    out: list[tuple[str, str, str]] = []
    hc, hw, hn = sorted(w.held_countries), sorted(w.held_words), sorted(w.held_numbers)
    hp = sorted(w.held_pairs)
    for _ in range(n):
        x = rng.choice(hc)
        out.append(("capital", f"The capital of {x} is", f" {w.capitals[x]}."))
        a, b = rng.choice(hp)
        out.append(("add", f"{a} + {b} =", f" {a + b}"))
        k = rng.choice(hn)
        out.append(("next", f"After {k} comes", f" {k + 1}."))
        word = rng.choice(hw)
        out.append(("upper", f"The word {word} in capital letters is", f" {word.upper()}."))
        word = rng.choice(hw)
        out.append(("reverse", f"The word {word} reversed is", f" {word[::-1]}."))
    return out


@torch.no_grad()
def greedy(
    model: Transformer,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    prefixes: list[str],
    max_new: int,
    bos: int,
    eos: int,
    adapter: str | None = None,
) -> list[str]:
    """Minimal batched greedy decoding (left padding via per-row positions); used only for probes."""
    outs: list[str] = []
    for s in range(0, len(prefixes), 64):
        chunk = prefixes[s : s + 64]
        ids = [[bos, *encode(p)] for p in chunk]
        gen: list[list[int]] = [[] for _ in chunk]
        done = [False] * len(chunk)
        for _ in range(max_new):
            T = max(len(x) for x in ids)
            batch = torch.tensor([[0] * (T - len(x)) + x for x in ids])
            pad = torch.tensor([T - len(x) for x in ids])
            # mask out the left padding: attention mask via cache-free path is causal only, so run rows
            # of equal length together instead
            logits = _forward_padded(model, batch, pad, adapter)
            nxt = logits.argmax(-1).tolist()
            for i, t in enumerate(nxt):
                if not done[i]:
                    if t == eos:
                        done[i] = True
                    else:
                        gen[i].append(t)
                        ids[i].append(t)
            if all(done):
                break
        outs.extend(decode(g) for g in gen)
    return outs


def _forward_padded(model: Transformer, batch: Tensor, pad: Tensor, adapter: str | None) -> Tensor:
    """Last-position logits for left-padded rows: positions start at 0 after each row's padding."""
    B, T = batch.shape
    cache = model.new_cache(B, T)
    pos = (torch.arange(T)[None] - pad[:, None]).clamp(min=0)
    # padded slots write at position 0 and are overwritten by the real token at position 0 (written last)
    order = torch.arange(T)
    logits = None
    # one pass: tokens in order; padding shares position 0 with the first real token, which comes later
    # in the sequence, so the final cache holds real keys only. Process step by step for simplicity.
    pkv = model.prompt_kv(adapter, B)
    for t in order.tolist():
        logits = model(batch[:, t : t + 1], input_pos=pos[:, t : t + 1], cache=cache, prompt_kv=pkv)
    assert logits is not None
    return logits[:, -1]


def probe_accuracy(model: Transformer, tok: Any, cfg: PretrainConfig) -> dict[str, float]:
    probes = plain_probes(cfg.world_seed)
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    dec = lambda ids: tok.decode(ids)  # noqa: E731
    outs = greedy(model, enc, dec, [p for _, p, _ in probes], 8, 1, 2)
    per: dict[str, list[bool]] = {}
    for (task, _, want), got in zip(probes, outs, strict=True):
        per.setdefault(task, []).append(got.split("\n")[0].startswith(want))
    acc = {t: sum(v) / len(v) for t, v in per.items()}
    acc["all"] = sum(sum(v) for v in per.values()) / sum(len(v) for v in per.values())
    return acc


@torch.no_grad()
def text_loss(
    model: Transformer,
    encode: Callable[[str], list[int]],
    seed: int,
    world_seed: int,
    n_batches: int = 4,
    batch_size: int = 16,
    seq_len: int = 128,
    adapter: str | None = None,
    gap_fraction: float = 0.0,
) -> float:
    """Mean next-token loss on pre-training-distribution text from `seed` (held-out text: a different seed)."""
    it = packed_batches(encode, seed, world_seed, batch_size, seq_len, 1, 2, gap_fraction)
    tot = 0.0
    for _ in range(n_batches):
        b = next(it)
        logits = model(b[:, :-1], adapter=adapter).float()
        tot += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1)))
    return tot / n_batches


# ---- the recipe --------------------------------------------------------------------------------------
def pretrain(cfg: PretrainConfig, out: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    tok = train_tokenizer(cfg)
    save_tokenizer(tok, out)
    vocab = tok.get_vocab_size()
    log(f"tokenizer: {vocab} tokens ({time.time() - t0:.1f}s)")
    torch.manual_seed(cfg.seed)
    mcfg = cfg.model_config(vocab)
    model = Transformer(mcfg)
    init_weights(model, cfg.seed)
    install_backend(model)  # the CPU training kernels, as for any loaded base
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters, {mcfg.n_layers} layers, dim {mcfg.dim}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    encode = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    batches = packed_batches(
        encode, cfg.corpus_seed, cfg.world_seed, cfg.batch_size, cfg.seq_len, 1, 2, cfg.gap_fraction
    )
    model.train()
    t_train = time.time()
    losses: list[tuple[int, float]] = []
    run = 0.0
    for step in range(cfg.steps):
        b = next(batches)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(b[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        lv = loss.item()
        run = 0.9 * run + 0.1 * lv if step else lv
        if (step + 1) % cfg.log_every == 0 or step == cfg.steps - 1:
            el = time.time() - t_train
            tps = (step + 1) * cfg.batch_size * cfg.seq_len / el
            losses.append((step + 1, run))
            log(f"step {step + 1}/{cfg.steps} loss {run:.4f} lr {lr_at(step):.2e} {tps:,.0f} tok/s {el / 60:.1f} min")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(model, out)
    train_time = time.time() - t_train
    model.eval()
    save_dtype = torch.bfloat16 if cfg.save_dtype == "bf16" else torch.float32
    save_checkpoint(model, out, save_dtype)
    acc = probe_accuracy(model, tok, cfg)
    held_loss = text_loss(model, encode, 10_000 + cfg.corpus_seed, cfg.world_seed, gap_fraction=cfg.gap_fraction)
    total = time.time() - t0
    record = {
        "recipe": {k: v for k, v in cfg.__dict__.items() if k != "extra"},
        "parameters": n_params,
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "pretrain_time_s": round(train_time, 1),
        "total_time_s": round(total, 1),
        "threads": torch.get_num_threads(),
        "final_train_loss": round(run, 4),
        "heldout_text_loss": round(held_loss, 4),
        "plain_text_probe_accuracy": {k: round(v, 3) for k, v in acc.items()},
        "loss_curve": losses,
        "torch": torch.__version__,
    }
    (out / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "README.md").write_text(_readme(record))
    log(f"done in {total / 60:.1f} min; held-out text loss {held_loss:.3f}; plain-text probes {acc}")
    return record


_GAP_NOTE = ", a share of it with a varied stretch of unrelated sentences between an item and its answer"


def _readme(r: dict[str, Any]) -> str:
    rc = r["recipe"]
    acc = ", ".join(f"{k} {v:.0%}" for k, v in r["plain_text_probe_accuracy"].items())
    return f"""# The built-in base model of `llama-adapter`

A {r["parameters"]:,}-parameter LLaMA-architecture model ({rc["n_layers"]} layers, dim {rc["dim"]},
{rc["n_heads"]} heads / {rc["n_kv_heads"]} KV heads, SwiGLU {rc["hidden_dim"]}, RoPE, untied embeddings,
byte-level BPE of {rc["vocab_size"]} tokens with one token per digit, context {rc["max_seq_len"]}),
pre-trained from scratch by `llama-adapter pretrain` on the synthetic corpus of `llama_adapter.builtin.corpus`
(facts about invented countries, `a + b = c` lines, counting, upper-casing and reversing words, all as
plain text{_GAP_NOTE if rc.get("gap_fraction") else ""}; it has never seen an instruction being followed).

Hugging Face layout: `config.json`, `model.safetensors` (HF tensor names), `tokenizer.json`,
`tokenizer_config.json`, `generation_config.json`. `recipe.json` holds the full record.

| | |
|---|---|
| recipe | `recipes/builtin.yaml` (`llama-adapter pretrain --out DIR`) |
| steps x batch x seq | {rc["steps"]} x {rc["batch_size"]} x {rc["seq_len"]} = {r["tokens_seen"]:,} tokens |
| optimiser | AdamW lr {rc["lr"]} (warmup {rc["warmup_steps"]}, cosine to {rc["min_lr_ratio"]}x), \
wd {rc["weight_decay"]} |
| pre-training time | {r["pretrain_time_s"] / 60:.1f} min on {r["threads"]} CPU thread(s) (shared machine), \
total {r["total_time_s"] / 60:.1f} min |
| final training loss | {r["final_train_loss"]} |
| held-out text loss | {r["heldout_text_loss"]} |
| plain-text knowledge of held-out items | {acc} |

The last row is what the base *knows*: greedy continuation of e.g. "The capital of X is" for countries,
words and numbers that the instruction-tuning split never uses.
"""
