"""The paper in miniature for encoders: tiny encoders pre-trained here, and downstream tasks they never saw.

No pretrained weights can be downloaded, so each encoder is pre-trained from scratch in a minute or two on a CPU,
by a recipe in this module, and saved as an ordinary `transformers` checkpoint (config.json, model.safetensors,
preprocessor_config.json / tokenizer.json):

- `vit`: a ViT classifies single PIL-drawn shapes by shape and colour (16 classes, light backgrounds).
  Downstream (`counting`): how many shapes (1-4) an image holds -- a task it was not trained for.
- `roberta`: a RoBERTa-style encoder learns the built-in corpus (`builtin.corpus`: facts about invented
  countries, sums, words) by masked-language modelling. Downstream (`fact-qa`): extractive QA over short
  paragraphs of two or three such facts of different kinds, SQuAD v2.0 style (a third of the questions ask for a
  kind of fact the paragraph does not state: no answer).
- `clip`: a CLIP learns to match drawn shapes with captions ("a photo of a red circle") by a contrastive loss;
  four of the 16 colour-shape pairs never occur in pre-training. Downstream (`base-novel`): the same 16 classes
  drawn in another style (dark, cluttered backgrounds, smaller shapes); prompts are trained on few shots of 8 base
  classes and scored on those and on the 8 novel ones (which include the 4 pairs never seen at all).

Everything is a function of its seed. Models are tiny on purpose (64 wide, 3-4 layers): the point is the
comparison between the fine-tuning methods, measured honestly on a small machine, not absolute numbers.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle", "cross")
IMAGE_SIZE = 32
# colour-shape pairs the miniature CLIP never sees in pre-training (each colour and each shape still occurs)
CLIP_UNSEEN = (("red", "cross"), ("green", "triangle"), ("blue", "square"), ("yellow", "circle"))
# the downstream base classes (trained on); the other 8 are novel, including all of CLIP_UNSEEN
CLIP_BASE = (
    ("red", "circle"),
    ("red", "square"),
    ("green", "circle"),
    ("green", "cross"),
    ("blue", "triangle"),
    ("blue", "cross"),
    ("yellow", "square"),
    ("yellow", "triangle"),
)
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]  # ids 0..4
CAPTIONS = ("a photo of a {c} {s}.", "a {c} {s}", "{c} {s}", "a {s} that is {c}", "the {s} is {c}")
Log = Callable[[str], None]


@dataclass
class Recipe:
    """Size and length of one pre-training run."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    steps: int = 600
    batch: int = 64
    lr: float = 2e-3
    seed: int = 0


RECIPES = {
    "vit": Recipe(layers=4, steps=800),
    "roberta": Recipe(layers=4, steps=1200, batch=32),
    "clip": Recipe(layers=3, steps=600),
}


# ---- drawing ------------------------------------------------------------------------------------------------
def draw(
    items: list[tuple[str, str]], rng: random.Random, size: int = IMAGE_SIZE, style: str = "light", scale: float = 1.0
) -> Image.Image:
    """Shapes (shape, colour) at random non-overlapping places. style "light": plain light background (the
    pre-training look); "dark": dark background with grey clutter lines (the downstream look)."""
    if style == "light":
        im = Image.new("RGB", (size, size), tuple(rng.randint(225, 255) for _ in range(3)))
    else:
        im = Image.new("RGB", (size, size), tuple(rng.randint(10, 60) for _ in range(3)))
    d = ImageDraw.Draw(im)
    if style != "light":
        for _ in range(3):
            g = rng.randint(70, 130)
            d.line([rng.uniform(0, size) for _ in range(4)], fill=(g, g, g), width=1)
    placed: list[tuple[float, float, float]] = []
    for shape, colour in items:
        for _ in range(50):
            r = rng.uniform(0.16, 0.3) * size * scale
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + rr + 1) ** 2 for x, y, rr in placed):
                break
        placed.append((cx, cy, r))
        fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour])
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":
            s = r * 0.85
            d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        elif shape == "triangle":
            a = (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
            d.polygon([(cx + r * math.cos(t), cy + r * math.sin(t)) for t in a], fill=fill)
        elif shape == "cross":
            w = max(1.0, r * 0.35)
            d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        else:
            raise ValueError(f"unknown shape {shape!r}")
    return im


def to_tensor(images: list[Image.Image]) -> Tensor:
    """What the saved preprocessor config does to a 32x32 image: rescale to [0, 1], normalise with 0.5 / 0.5."""
    a = np.stack([np.asarray(im, dtype=np.float32).transpose(2, 0, 1) for im in images]) / 255.0
    return torch.from_numpy((a - 0.5) / 0.5)


def _preprocessor_config(size: int = IMAGE_SIZE) -> dict[str, Any]:
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 2,
        "do_center_crop": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


def _save(model: nn.Module, out: Path, extra: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)  # type: ignore[operator]
    (out / "recipe.json").write_text(json.dumps(extra, indent=2) + "\n")


def _steps(
    model: nn.Module, recipe: Recipe, batches: Iterator[Any], loss_fn: Callable[[Any], Tensor], log: Log
) -> float:
    """AdamW with warm-up and cosine decay for recipe.steps; returns the mean loss of the last 20 steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = max(1, recipe.steps // 20)
    losses: list[float] = []
    model.train()
    for step in range(recipe.steps):
        lr = recipe.lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = loss_fn(next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % max(1, recipe.steps // 5) == 0:
            log(f"  step {step + 1}/{recipe.steps} loss {sum(losses[-20:]) / len(losses[-20:]):.4f}")
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])


# ---- ViT ----------------------------------------------------------------------------------------------------
def pretrain_vit(out: str | Path, recipe: Recipe | None = None, log: Log = print) -> dict[str, Any]:
    """A tiny ViT that names the shape and colour of one drawn shape (16 classes)."""
    from transformers import ViTConfig, ViTForImageClassification

    r = recipe or RECIPES["vit"]
    torch.manual_seed(r.seed)
    rng = random.Random(f"vit-{r.seed}")
    classes = [(s, c) for c in COLOURS for s in SHAPES]
    cfg = ViTConfig(  # type: ignore[call-arg]  # num_labels and the label maps are PretrainedConfig's
        hidden_size=r.hidden,
        num_hidden_layers=r.layers,
        num_attention_heads=r.heads,
        intermediate_size=2 * r.hidden,
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=len(classes),
        id2label={i: f"{c} {s}" for i, (s, c) in enumerate(classes)},
        label2id={f"{c} {s}": i for i, (s, c) in enumerate(classes)},
    )
    model = ViTForImageClassification(cfg)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            ys = [rng.randrange(len(classes)) for _ in range(r.batch)]
            yield to_tensor([draw([classes[y]], rng) for y in ys]), torch.tensor(ys)

    t0 = time.perf_counter()
    loss = _steps(model, r, batches(), lambda b: model(pixel_values=b[0], labels=b[1]).loss, log)
    x, y = next(batches())
    with torch.no_grad():
        acc = float((model(pixel_values=x).logits.argmax(-1) == y).float().mean())
    stats = {
        "recipe": "vit",
        **r.__dict__,
        "final_loss": loss,
        "probe_accuracy": acc,
        "time_s": time.perf_counter() - t0,
    }
    _save(model, Path(out), stats)
    (Path(out) / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(), indent=2) + "\n")
    return stats


def counting_data(out: str | Path, n_train: int = 400, n_test: int = 400, seed: int = 0) -> Path:
    """Images with 1-4 shapes, ImageFolder trees out/train and out/test with classes "1".."4"."""
    out = Path(out)
    rng = random.Random(f"counting-{seed}")
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            k = i % 4 + 1
            items = [(rng.choice(SHAPES), rng.choice(list(COLOURS))) for _ in range(k)]
            d = out / split / str(k)
            d.mkdir(parents=True, exist_ok=True)
            draw(items, rng, scale=0.6).save(d / f"{i:05d}.png")
    return out


# ---- RoBERTa ------------------------------------------------------------------------------------------------
def train_word_tokenizer(texts: Iterator[str], out: Path) -> Any:
    """A word-level tokenizer (words, numbers and punctuation marks are tokens), saved as out/tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIALS, show_progress=False))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return tok


def pretrain_roberta(out: str | Path, recipe: Recipe | None = None, log: Log = print, seq: int = 48) -> dict[str, Any]:
    """A tiny RoBERTa-style encoder learns the built-in corpus by masked-language modelling (15 % masked)."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    from llama_adapter.builtin import corpus

    r = recipe or RECIPES["roberta"]
    out = Path(out)
    torch.manual_seed(r.seed)
    docs = list(corpus.pretrain_documents(seed=r.seed, n=3000))
    # the tokenizer also learns the QA set's question words, which the corpus never uses
    tok = train_word_tokenizer(iter([*docs, QUESTIONS]), out)
    cfg = RobertaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=r.hidden,
        num_hidden_layers=r.layers,
        num_attention_heads=r.heads,
        intermediate_size=2 * r.hidden,
        max_position_embeddings=seq + 2,
        type_vocab_size=1,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = RobertaForMaskedLM(cfg)
    stream = [i for d in docs for i in tok.encode(d).ids]
    body = seq - 2
    rows = torch.tensor([[2, *stream[i : i + body], 3] for i in range(0, len(stream) - body, body)])
    gen = torch.Generator().manual_seed(r.seed)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            x = rows[torch.randint(len(rows), (r.batch,), generator=gen)].clone()
            pick = (torch.rand(x.shape, generator=gen) < 0.15) & (x > 4)
            labels = torch.where(pick, x, torch.full_like(x, -100))
            u = torch.rand(x.shape, generator=gen)
            x[pick & (u < 0.8)] = 4
            rand = pick & (u >= 0.8) & (u < 0.9)
            x[rand] = torch.randint(5, cfg.vocab_size, (int(rand.sum()),), generator=gen)
            yield x, labels

    def mlm_loss(b: tuple[Tensor, Tensor]) -> Tensor:
        # the vocabulary projection only at the masked positions: most of the cost of MLM on a tiny model
        pick = b[1] != -100
        h = model.roberta(input_ids=b[0]).last_hidden_state[pick]
        return nn.functional.cross_entropy(model.lm_head(h), b[1][pick])

    t0 = time.perf_counter()
    loss = _steps(model, r, batches(), mlm_loss, log)
    stats = {"recipe": "roberta", **r.__dict__, "final_loss": loss, "time_s": time.perf_counter() - t0}
    _save(model, out, stats)
    return stats


# fact kinds of the QA set: (sentence before the answer, after it, question); the sentences are the corpus' own
# phrasings, the questions are not in the corpus
FACTS = {
    "capital": ("The capital of {x} is ", ".", "What is the capital of {x}?"),
    "reverse": ("The word {x} reversed is ", ".", "What is the word {x} reversed?"),
    "add": ("{x} plus {z} is ", ".", "What is {x} plus {z}?"),
    "next": ("After {x} comes ", ".", "What number comes after {x}?"),
}
QUESTIONS = " ".join(q for _, _, q in FACTS.values())


def _fact(kind: str, rng: random.Random, w: Any) -> tuple[dict[str, str], str]:
    """Fill-ins and answer of one fact of `kind` from the built-in world."""
    if kind == "capital":
        x = rng.choice(w.countries)
        return {"x": x, "z": ""}, w.capitals[x]
    if kind == "reverse":
        x = rng.choice(w.words)
        return {"x": x, "z": ""}, x[::-1]
    if kind == "add":
        a, b = rng.randrange(100), rng.randrange(100)
        return {"x": str(a), "z": str(b)}, str(a + b)
    n = rng.randrange(998)
    return {"x": str(n), "z": ""}, str(n + 1)


def fact_qa_data(out: str | Path, n_train: int = 800, n_test: int = 300, seed: int = 0) -> Path:
    """SQuAD v2.0 files out/train.json, out/test.json: a paragraph of two or three facts of different kinds
    (a capital, a reversed word, a sum, a successor; the corpus' phrasings) and a question about one kind -- or, for
    a third of the questions, about a kind the paragraph does not state (no answer)."""
    from llama_adapter.builtin import corpus

    w = corpus.world()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"fact-qa-{seed}")
    for split, n in (("train", n_train), ("test", n_test)):
        paras = []
        for i in range(n):
            kinds = rng.sample(sorted(FACTS), 4)
            shown = kinds[: rng.randint(2, 3)]
            ctx, where = "", {}
            facts = {k: _fact(k, rng, w) for k in kinds}
            for k in shown:
                before, after, _ = FACTS[k]
                fill, answer = facts[k]
                pre = before.format(**fill)
                where[k] = (len(ctx) + len(pre), answer)
                ctx += pre + answer + after + " "
            ctx = ctx.strip()
            ask = kinds[3] if rng.random() < 1 / 3 else rng.choice(shown)
            q = FACTS[ask][2].format(**facts[ask][0])
            answers = [{"text": where[ask][1], "answer_start": where[ask][0]}] if ask in where else []
            qa = {"id": f"{split}-{i}", "question": q, "answers": answers, "is_impossible": not answers}
            paras.append({"context": ctx, "qas": [qa]})
        doc = {"version": "v2.0", "data": [{"title": f"facts-{split}", "paragraphs": paras}]}
        (out / f"{split}.json").write_text(json.dumps(doc))
    return out


# ---- CLIP ---------------------------------------------------------------------------------------------------
def pretrain_clip(out: str | Path, recipe: Recipe | None = None, log: Log = print) -> dict[str, Any]:
    """A tiny CLIP matches drawn shapes with captions; the pairs in CLIP_UNSEEN never occur.

    The contrastive targets treat two images of the same colour-shape pair in a batch as equally right for each
    other's caption (a batch of 64 over 12 pairs has many such duplicates; one-hot targets would punish them).
    """
    from transformers import CLIPConfig, CLIPModel

    r = recipe or RECIPES["clip"]
    out = Path(out)
    torch.manual_seed(r.seed)
    rng = random.Random(f"clip-{r.seed}")
    pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in CLIP_UNSEEN]
    texts = [t.format(c=c, s=s) for c in COLOURS for s in SHAPES for t in CAPTIONS]
    tok = train_word_tokenizer(iter(texts), out)
    width = r.hidden
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=tok.get_vocab_size(),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=r.layers,
            num_attention_heads=r.heads,
            max_position_embeddings=16,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        ),
        vision_config=dict(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=r.layers,
            num_attention_heads=r.heads,
            image_size=IMAGE_SIZE,
            patch_size=8,
        ),
        projection_dim=32,
    )
    model = CLIPModel(cfg)

    def encode(captions: list[str]) -> tuple[Tensor, Tensor]:
        rows = [[2, *tok.encode(t).ids, 3] for t in captions]
        T = max(len(x) for x in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, x in enumerate(rows):
            ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
        return ids, mask

    def batches() -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        while True:
            ps = [rng.randrange(len(pairs)) for _ in range(r.batch)]
            imgs = to_tensor([draw([(pairs[p][1], pairs[p][0])], rng) for p in ps])
            ids, mask = encode([rng.choice(CAPTIONS).format(c=pairs[p][0], s=pairs[p][1]) for p in ps])
            same = torch.tensor(ps)[:, None] == torch.tensor(ps)[None, :]
            yield imgs, ids, mask, same.float() / same.sum(1, keepdim=True)

    def loss_fn(b: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
        o = model(pixel_values=b[0], input_ids=b[1], attention_mask=b[2])
        lg = o.logits_per_image
        ce = lambda x: -(b[3] * x.log_softmax(-1)).sum(-1).mean()
        return 0.5 * (ce(lg) + ce(lg.t()))

    t0 = time.perf_counter()
    loss = _steps(model, r, batches(), loss_fn, log)
    stats = {"recipe": "clip", **r.__dict__, "final_loss": loss, "time_s": time.perf_counter() - t0}
    stats["unseen_pairs"] = [f"{c} {s}" for c, s in CLIP_UNSEEN]
    _save(model, out, stats)
    (out / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(), indent=2) + "\n")
    return stats


def base_novel_data(out: str | Path, shots: int = 16, n_test: int = 40, seed: int = 0) -> Path:
    """ImageFolder trees in the downstream style: out/train (`shots` images of each base class) and out/test
    (`n_test` of each of the 16 classes); class folders are named "<colour> <shape>"."""
    out = Path(out)
    rng = random.Random(f"base-novel-{seed}")
    every = [(c, s) for c in COLOURS for s in SHAPES]
    for split, classes, n in (("train", list(CLIP_BASE), shots), ("test", every, n_test)):
        for c, s in classes:
            d = out / split / f"{c} {s}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw([(s, c)], rng, style="dark", scale=0.7).save(d / f"{i:04d}.png")
    return out


PRETRAIN = {"vit": pretrain_vit, "roberta": pretrain_roberta, "clip": pretrain_clip}
DATASETS = {"counting": counting_data, "fact-qa": fact_qa_data, "base-novel": base_novel_data}
