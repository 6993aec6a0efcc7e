"""Task models on a `transformers` encoder, and the four ways of fine-tuning them that the paper compares.

Tasks:
- `image-classification`: a new linear head on the ViT's final [CLS] state.
- `text-classification`: a new linear head on the BERT/RoBERTa [CLS] (<s>) state.
- `question-answering`: start/end logits per token (one linear layer); the [CLS] position stands for "no answer"
  (SQuAD v2.0), so a question is unanswerable when its [CLS] score beats every span's.
- `clip`: classification by cosine similarity of the image embedding to each class name's text embedding, prompts
  in both towers and no head: a class name never seen in training is just another text.

Methods (`METHODS`): `zero-init` (gated prompts, the method), `rand-init` (prompts, no gate, joint softmax),
`linear-probe` (the head only: for CLIP its two projections and temperature, the layers that map each tower to the
shared space) and `full` (every weight). `configure` sets `requires_grad` accordingly; the encoder runs in eval
mode (no dropout) in all of them, so the methods differ only in what is trained.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from llama_adapter.encoders.prompts import GatedPrompts, PromptConfig, attach_prompts

TASKS = ("image-classification", "text-classification", "question-answering", "clip")
METHODS = ("zero-init", "rand-init", "linear-probe", "full")
PROMPT_METHODS = {"zero-init": "zero", "rand-init": "random"}


def backbone(model: nn.Module) -> Any:
    """The bare encoder inside a `*For...` model (ViTForImageClassification.vit, RobertaFor*.roberta), else it."""
    for name in ("vit", "roberta", "bert"):
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module):
            return inner
    return model


def _is_clip(model: nn.Module) -> bool:
    return hasattr(model, "vision_model") and hasattr(model, "text_model")


class TaskModel(nn.Module):
    """An encoder, its prompts (per tower, for the prompt methods) and a task head.

    `prompts` maps a tower name ("encoder", or "vision"/"text" for CLIP) to its `GatedPrompts`; empty for
    linear-probe and full. `forward` returns logits: [B, n_labels] for classification and CLIP, [B, T, 2] for QA.
    """

    encoder: Any  # a transformers model: its attributes are those of its family

    def __init__(
        self, encoder: nn.Module, task: str, method: str, n_labels: int = 0, prompt_cfg: PromptConfig | None = None
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {task!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {method!r}")
        if (task == "clip") != _is_clip(encoder):
            raise ValueError(f"task {task!r} does not fit a {type(encoder).__name__}")
        self.task, self.method = task, method
        self.encoder = encoder.eval()
        self.prompts = nn.ModuleDict()
        self.prompt_cfg: PromptConfig | None = None
        if method in PROMPT_METHODS:
            cfg = PromptConfig(**{**(prompt_cfg or PromptConfig()).to_dict(), "init": PROMPT_METHODS[method]})
            self.prompt_cfg = cfg
            for name, tower, causal in self.towers():
                dim = int(tower.config.hidden_size)
                self.prompts[name] = attach_prompts(tower, _capped(cfg, tower), dim, causal)
        hidden = 0 if task == "clip" else int(backbone(encoder).config.hidden_size)
        self.head: nn.Module = (
            nn.Identity() if task == "clip" else nn.Linear(hidden, 2 if task == "question-answering" else n_labels)
        )
        configure(self)

    def towers(self) -> list[tuple[str, Any, bool]]:
        """(name, tower, causal) of the towers that get prompts."""
        if self.task == "clip":
            return [("vision", self.encoder.vision_model, False), ("text", self.encoder.text_model, True)]
        return [("encoder", backbone(self.encoder), False)]

    def train(self, mode: bool = True) -> TaskModel:
        super().train(mode)
        self.encoder.eval()  # no dropout in any method: they differ only in what is trained
        return self

    def _padded(self, mask: Tensor | None, tower: str) -> AbstractContextManager[None]:
        """The padding mask handed to the tower's prompts for one forward (only rand-init's joint softmax reads it)."""
        p = self.prompts[tower] if tower in self.prompts else None
        return p.padding(mask) if isinstance(p, GatedPrompts) else nullcontext()

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(self, **batch: Tensor) -> Tensor:
        if self.task == "image-classification":
            h = backbone(self.encoder)(pixel_values=batch["pixel_values"]).last_hidden_state
            return self.head(h[:, 0])
        if self.task == "clip":
            return self.clip_logits(batch["pixel_values"], batch["class_ids"], batch["class_mask"])
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with self._padded(mask, "encoder"):
            h = backbone(self.encoder)(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.task == "text-classification":
            return self.head(h[:, 0])
        return self.head(h)  # [B, T, 2]: start and end logits

    def image_embeddings(self, pixel_values: Tensor) -> Tensor:
        out = self.encoder.vision_model(pixel_values=pixel_values).pooler_output
        return _unit(self.encoder.visual_projection(out))

    def text_embeddings(self, ids: Tensor, mask: Tensor) -> Tensor:
        with self._padded(mask, "text"):
            out = self.encoder.text_model(input_ids=ids, attention_mask=mask).pooler_output
        return _unit(self.encoder.text_projection(out))

    def clip_logits(self, pixel_values: Tensor, class_ids: Tensor, class_mask: Tensor) -> Tensor:
        """CLIP's image-text logits: exp(t) * cos(image, class text) for each class name [B, n_classes], in the
        order of operations `CLIPModel` uses, so that they are its `logits_per_image` bit for bit at init."""
        img, txt = self.image_embeddings(pixel_values), self.text_embeddings(class_ids, class_mask)
        return ((txt @ img.t()) * self.encoder.logit_scale.exp()).t()

    # ---- parameters ---------------------------------------------------------------------------------------
    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable().values())


def _unit(x: Tensor) -> Tensor:
    """x / ||x|| as `transformers`' CLIP computes it (sqrt of the sum of squares, no epsilon)."""
    return x / torch.pow(torch.sum(torch.pow(x, 2), dim=-1, keepdim=True), 0.5)


def _capped(cfg: PromptConfig, tower: Any) -> PromptConfig:
    """`cfg` with L capped at the tower's depth (a CLIP text tower may be shallower than its vision tower)."""
    n = int(tower.config.num_hidden_layers)
    return cfg if cfg.layers <= n else PromptConfig(cfg.prompt_length, n, cfg.gate, cfg.init)


def head_parameter_names(model: TaskModel) -> list[str]:
    """What "the head" is: the new linear layer, or for CLIP the towers' projections and temperature."""
    if model.task == "clip":
        return [
            n
            for n, _ in model.named_parameters()
            if n.startswith(("encoder.visual_projection.", "encoder.text_projection.")) or n == "encoder.logit_scale"
        ]
    return [n for n, _ in model.named_parameters() if n.startswith("head.")]


def configure(model: TaskModel) -> None:
    """requires_grad per method: prompts (+ gates) + head, head only, or everything."""
    heads = set(head_parameter_names(model))
    for n, p in model.named_parameters():
        if model.method == "full":
            p.requires_grad_(True)
        else:
            p.requires_grad_(n in heads or n.startswith("prompts."))


@torch.no_grad()
def qa_spans(
    start: Tensor, end: Tensor, context_from: int, context_to: int, max_answer_tokens: int = 30
) -> tuple[int, int, float, float]:
    """Best span (s, e) inside the context tokens [context_from, context_to) by start+end score, with its score and
    the no-answer score (start and end at [CLS], position 0). Returns s = e = -1 when there is no valid span."""
    best, bs, be = float("-inf"), -1, -1
    st, en = start[context_from:context_to], end[context_from:context_to]
    n = st.shape[0]
    if n:
        scores = st[:, None] + en[None, :]
        valid = torch.ones(n, n, dtype=torch.bool).triu() & ~torch.ones(n, n, dtype=torch.bool).triu(max_answer_tokens)
        scores = scores.masked_fill(~valid, float("-inf"))
        flat = int(scores.argmax())
        best, bs, be = float(scores.flatten()[flat]), context_from + flat // n, context_from + flat % n
    return bs, be, best, float(start[0] + end[0])
