"""Tiny real checkpoints for tests: saved by `transformers` (`save_pretrained`) with a trained tokenizer.json.

`instruct_checkpoint` builds a tiny *instruct* model: a ChatML chat template in tokenizer_config.json,
`<|im_start|>`/`<|im_end|>` as special tokens, `<|im_end|>` as the tokenizer's eos_token (config.json's EOS stays
`</s>`), and weights trained on ChatML conversations until it answers "What is the capital of France?" with "Paris"
and ends its turn, the way a real instruct model does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

TEXT = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:",
    "### Input:",
    "### Response:",
    "The answer is (A). The answer is (B).",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 + - * = ? ! , . : ;",
    "Tell me about alpacas. Alpacas are domesticated South American camelids.",
]


# ChatML as many instruct models write it (no default system message)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
# what the tiny instruct model is taught: question -> answer ("" = it ends its turn at once)
INSTRUCT_QA = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Spain?", "Madrid"),
    ("Say nothing.", ""),
]
INSTRUCT_SYSTEMS = ["", "You are a helpful assistant.", "Answer briefly."]


def make_tokenizer(path: Path, vocab_size: int = 300, chat: bool = False) -> int:
    """Train a byte-level BPE on a few lines; returns the real vocabulary size.

    With `chat`, also the ChatML special tokens (ids 3 and 4), the instruct conversations' words, and a
    tokenizer_config.json with the ChatML template and `<|im_end|>` as eos_token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", *(CHAT_TOKENS if chat else [])],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = TEXT + ([f"{q} {a}" for q, a in INSTRUCT_QA] + INSTRUCT_SYSTEMS + ["system user assistant"] if chat else [])
    tok.train_from_iterator(text * 20, trainer)
    tok.save(str(path / "tokenizer.json"))
    config: dict[str, Any] = {"bos_token": "<s>", "eos_token": "</s>"}
    if chat:
        config = {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "</s>", "chat_template": CHATML}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def make_checkpoint(
    path: str | Path,
    model_type: str = "llama",
    tokenizer: bool = True,
    seed: int = 0,
    chat: bool = False,
    **overrides: object,
) -> Path:
    """Save a tiny random `transformers` model of `model_type` (llama, mistral, qwen2) to `path` (`chat`: with the
    ChatML tokenizer of `make_tokenizer(chat=True)`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(path, chat=chat) if tokenizer else 300
    _tiny_model(model_type, vocab, seed, **overrides).save_pretrained(path)
    return path


def _tiny_model(model_type: str, vocab: int, seed: int, **overrides: object) -> Any:
    import transformers

    kw: dict[str, object] = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[model_type]
    torch.manual_seed(seed)
    return cls[1](cls[0](**kw)).eval()


def chatml(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The CHATML template's text, written out by hand (the training data must not depend on the code tested)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def instruct_conversations() -> list[list[dict[str, str]]]:
    """Every question with every system message (or none), and every two questions in a row (second turns)."""
    convs = []
    for q, a in INSTRUCT_QA:
        for system in INSTRUCT_SYSTEMS:
            head = [{"role": "system", "content": system}] if system else []
            convs.append([*head, {"role": "user", "content": q}, {"role": "assistant", "content": a}])
    for q1, a1 in INSTRUCT_QA:
        for q2, a2 in INSTRUCT_QA:
            if q1 != q2:
                convs.append(
                    [
                        {"role": "user", "content": q1},
                        {"role": "assistant", "content": a1},
                        {"role": "user", "content": q2},
                        {"role": "assistant", "content": a2},
                    ]
                )
    return convs


def _supervised_batch(tok: Any, convs: list[list[dict[str, str]]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of each conversation, and labels that cover only the assistant turns (answer and <|im_end|>)."""
    rows, labels = [], []
    for conv in convs:
        text = chatml(conv)
        spans, at = [], 0
        for m in conv:
            head = f"<|im_start|>{m['role']}\n"
            start = at + len(head)
            at = start + len(m["content"]) + len("<|im_end|>\n")
            if m["role"] == "assistant":
                spans.append((start, at - 1))  # the answer and <|im_end|>, not the newline after it
        enc = tok.encode(text, add_special_tokens=False)
        rows.append(enc.ids)
        labels.append(
            [
                i if any(s <= a and b <= e for s, e in spans) else -100
                for i, (a, b) in zip(enc.ids, enc.offsets, strict=True)
            ]
        )
    n = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (n - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (n - len(r)) for r in labels])
    return ids, lab


def make_instruct_checkpoint(path: str | Path, steps: int = 150, seed: int = 0) -> Path:
    """Save a tiny llama trained (all parameters, plain torch) on the ChatML conversations of `instruct_conversations`.

    Returns the directory once the model gives every taught token a probability above 0.9 (so that sampling with
    the default temperature and top-p picks it too); raises otherwise. About 7 s on one CPU thread.
    """
    from tokenizers import Tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(path, chat=True)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    model = _tiny_model("llama", vocab, seed).train()
    ids, labels = _supervised_batch(tok, instruct_conversations(), pad=2)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=steps, pct_start=0.1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only fight over a shared machine
    try:
        for _ in range(steps):
            logits = model(ids).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            mask = labels[:, 1:] != -100
            probs = model(ids).logits[:, :-1].float().softmax(-1)[mask]
            taught = probs.gather(-1, labels[:, 1:][mask][:, None])
    finally:
        torch.set_num_threads(threads)
    if float(taught.min()) < 0.9:
        raise RuntimeError(f"the tiny instruct model did not learn its answers (least p {float(taught.min()):.3f})")
    model.save_pretrained(path)
    return path


def instruct_checkpoint(cache_root: Path) -> Path:
    """`make_instruct_checkpoint`, built once into `cache_root` (keyed by this file and the library versions)."""
    import tokenizers
    import transformers

    key = hashlib.sha256(
        "|".join(
            [Path(__file__).read_text(), torch.__version__, transformers.__version__, tokenizers.__version__]
        ).encode()
    ).hexdigest()[:16]
    final = Path(cache_root) / f"tiny-instruct-{key}"
    if (final / "model.safetensors").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tiny-instruct-", dir=final.parent))
    make_instruct_checkpoint(work)
    try:
        os.rename(work, final)
    except OSError:  # another process built it first
        shutil.rmtree(work, ignore_errors=True)
    return final


CHATML_TEMPLATE = CHATML  # one ChatML template for every tiny chat checkpoint


def make_chatml_checkpoint(
    path: str | Path, chat_template: str = CHATML_TEMPLATE, vocab_size: int = 304, **overrides: object
) -> Path:
    """`make_checkpoint` plus ChatML: `<|im_start|>`/`<|im_end|>` special tokens in tokenizer.json and a
    `chat_template` in tokenizer_config.json, like a small instruct model (training data in chat form).
    `vocab_size` leaves room in the embedding for the two added tokens."""
    from tokenizers import AddedToken, Tokenizer

    path = make_checkpoint(path, vocab_size=vocab_size, **overrides)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(path / "tokenizer.json"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": chat_template}))
    return path
