"""Fine-tuning and evaluating an encoder task model: `finetune(cfg)` and `evaluate(...)`.

The recipe is the decoder's in small: AdamW (0.9, 0.95), linear warm-up then half-cosine to 0, stepped per batch,
weight decay on the prompts and head weights only (not gates or biases); the data order is a function of the seed.
Everything is fp32 on one device. A run writes to `--out`: adapter.safetensors (`adapter_io`), config.json,
metrics.jsonl (one line per step: loss, lr; one per evaluation), loss.png (`training.plot`) and result.json.

Metrics: accuracy (classification), SQuAD EM / F1 (`squad_metric`; v2.0 no-answer handling when the data has
unanswerable questions), and for CLIP base-to-novel: accuracy on the trained (base) classes among themselves, on
the classes never trained (novel) among themselves, and their harmonic mean.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llama_adapter.encoders import data as D
from llama_adapter.encoders.adapter_io import load_encoder_adapter, save_encoder_adapter
from llama_adapter.encoders.heads import METHODS, PROMPT_METHODS, TASKS, TaskModel, backbone, qa_spans
from llama_adapter.encoders.prompts import PromptConfig
from llama_adapter.encoders.squad_metric import score as squad_score
from llama_adapter.errors import CheckpointError, TrainingError
from llama_adapter.progress import Progress, quiet_transformers
from llama_adapter.training.plot import plot_losses

DEFAULT_LR = {"zero-init": 1e-2, "rand-init": 1e-2, "linear-probe": 1e-2, "full": 1e-3}


@dataclass
class EncoderTrainConfig:
    """One `encoder finetune` run; every field is a flag of the command."""

    model: str = ""
    task: str = "image-classification"
    method: str = "zero-init"
    data: str = ""
    eval_data: str | None = None
    out: str = ""
    prompt_length: int = 8
    layers: int = 0  # 0: every layer
    gate: str = "tanh"
    epochs: float = 10.0
    batch_size: int = 32
    lr: float | None = None  # None: DEFAULT_LR[method]
    weight_decay: float = 0.02
    warmup_fraction: float = 0.1
    seed: int = 0
    max_length: int = 64
    max_answer_tokens: int = 16
    class_template: str = "a photo of a {}."
    eval_every: int = 0  # evaluate every N steps (0: only at the end)
    threads: int | None = None
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise TrainingError(f"--task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.method not in METHODS:
            raise TrainingError(f"--method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.gate not in ("tanh", "linear"):
            raise TrainingError(f"--gate must be tanh or linear, not {self.gate!r}")
        if self.epochs <= 0 or self.batch_size < 1 or self.prompt_length < 1 or self.layers < 0:
            raise TrainingError("--epochs, --batch-size and --prompt-length must be positive, --layers >= 0")
        if self.max_length < 8:
            raise TrainingError("--max-length must be at least 8")
        if "{}" not in self.class_template:
            raise TrainingError("--class-template must contain {} where the class name goes")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# ---- loading ------------------------------------------------------------------------------------------------
def load_encoder(model_dir: str | Path) -> Any:
    """A `transformers` encoder from a local checkpoint directory, fp32, eval mode, safetensors weights only."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a transformers checkpoint directory (no config.json)")
    from transformers import AutoModel

    try:
        with quiet_transformers():
            model = AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True).float()
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot load ({first})") from None
    return model.eval()


def _check_task(model: nn.Module, task: str, path: str) -> None:
    kind = getattr(getattr(model, "config", None), "model_type", "?")
    is_clip = hasattr(model, "vision_model") and hasattr(model, "text_model")
    takes_images = hasattr(backbone(model), "embeddings") and hasattr(backbone(model).embeddings, "patch_embeddings")
    ok = {
        "clip": is_clip,
        "image-classification": takes_images and not is_clip,
        "text-classification": not takes_images and not is_clip,
        "question-answering": not takes_images and not is_clip,
    }[task]
    if not ok:
        raise CheckpointError(f"{path}: a {kind!r} model cannot do --task {task}")


# ---- data -----------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """A data set as tensors for one model: `inputs` (each [N, ...]) and what scoring needs."""

    inputs: dict[str, Tensor]
    targets: dict[str, Tensor]
    labels: list[str]  # per record (classification, CLIP)
    qa: list[D.QARecord] | None = None
    qa_batch: D.QABatch | None = None

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])


def prepare(task: str, path: str, model_dir: str, model: Any, cfg: EncoderTrainConfig) -> Prepared:
    """Read the data file and turn it into tensors for this model."""
    if task in ("image-classification", "clip"):
        recs = D.load_image_records(path)
        vis = model.config.vision_config if task == "clip" else backbone(model).config
        pre = D.image_preprocessor(model_dir, int(vis.image_size))
        return Prepared({"pixel_values": D.image_tensor(recs, pre)}, {}, [r.label for r in recs])
    enc = D.TextEncoder(model_dir)
    if task == "text-classification":
        trecs = D.load_text_records(path)
        ids, mask = enc.encode_texts([r.text for r in trecs], cfg.max_length)
        return Prepared({"input_ids": ids, "attention_mask": mask}, {}, [r.label for r in trecs])
    qrecs = D.load_squad(path)
    qb = enc.encode_qa(qrecs, cfg.max_length)
    return Prepared(
        {"input_ids": qb.ids, "attention_mask": qb.mask}, {"starts": qb.starts, "ends": qb.ends}, [], qrecs, qb
    )


def class_texts(model_dir: str, classes: list[str], template: str, max_length: int) -> tuple[Tensor, Tensor]:
    """Token ids and mask of each class name in the template (CLIP's text side)."""
    return D.TextEncoder(model_dir).encode_texts([template.replace("{}", c) for c in classes], max_length)


# ---- training ---------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _trim(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Cut a text batch to its longest row (the set is padded to its longest)."""
    if "attention_mask" not in batch:
        return batch
    T = int(batch["attention_mask"].sum(1).max())
    return {k: (v[:, :T] if k in ("input_ids", "attention_mask") else v) for k, v in batch.items()}


def loss_of(model: TaskModel, batch: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
    logits = model(**batch)
    if model.task == "question-answering":
        ce = nn.functional.cross_entropy
        return 0.5 * (ce(logits[..., 0], targets["starts"]) + ce(logits[..., 1], targets["ends"]))
    return nn.functional.cross_entropy(logits, targets["labels"])


def _optimizer(model: TaskModel, lr: float, wd: float) -> torch.optim.Optimizer:
    decay = [p for n, p in model.trainable().items() if p.dim() >= 2 and not n.endswith("gates")]
    rest = [p for n, p in model.trainable().items() if not (p.dim() >= 2 and not n.endswith("gates"))]
    groups = [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95))


def _batches(n: int, batch: int, gen: torch.Generator) -> list[Tensor]:
    return list(torch.randperm(n, generator=gen).split(batch))


def finetune(
    cfg: EncoderTrainConfig,
    log: Callable[[str], None] | None = None,
    prepared: tuple[Prepared, Prepared | None] | None = None,
) -> dict[str, Any]:
    """Train one task model on `cfg.data`, evaluate it on `cfg.eval_data`, write the run to `cfg.out`.

    `prepared`: the (training, evaluation) sets already read by `prepare` for this model (a benchmark running many
    methods and seeds on one data set reads the images once); they are not modified."""
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if not cfg.model or not cfg.data or not cfg.out:
        raise TrainingError("--model, --data and --out are required")
    out = Path(cfg.out)
    if (out / "adapter.safetensors").exists() and not cfg.overwrite:
        raise TrainingError(f"{out}: holds an earlier run (pass --overwrite to replace it)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    encoder = load_encoder(cfg.model)
    _check_task(encoder, cfg.task, cfg.model)
    if prepared is not None:
        train_set, eval_set = replace(prepared[0], targets=dict(prepared[0].targets)), prepared[1]
    else:
        train_set = prepare(cfg.task, cfg.data, cfg.model, encoder, cfg)
        eval_set = prepare(cfg.task, cfg.eval_data, cfg.model, encoder, cfg) if cfg.eval_data else None
    classes = [] if cfg.task == "question-answering" else D.label_list(train_set.labels)
    if cfg.task != "question-answering":
        if len(classes) < 2:
            raise TrainingError(f"{cfg.data}: needs at least 2 classes, found {classes}")
        train_set.targets["labels"] = D.label_ids(train_set.labels, classes, cfg.data)
    n_layers = _depth(encoder, cfg.task)
    pcfg = PromptConfig(cfg.prompt_length, min(cfg.layers or n_layers, n_layers), cfg.gate)  # type: ignore[arg-type]
    torch.manual_seed(cfg.seed)
    model = TaskModel(encoder, cfg.task, cfg.method, len(classes), pcfg)
    if cfg.task == "clip":
        ids, mask = class_texts(cfg.model, classes, cfg.class_template, cfg.max_length)
        class_inputs = {"class_ids": ids, "class_mask": mask}
    else:
        class_inputs = {}
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.method]
    opt = _optimizer(model, lr, cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    spe = math.ceil(len(train_set) / cfg.batch_size)
    total = max(1, round(cfg.epochs * spe))
    warmup = round(cfg.warmup_fraction * total)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    mfile = (out / "metrics.jsonl").open("w")
    metrics: list[dict[str, Any]] = []
    say(
        f"encoder finetune: {cfg.task}, {cfg.method}, {len(train_set)} training records, {total} steps, "
        f"{model.n_trainable():,} trainable parameters"
    )
    t0 = time.perf_counter()
    step, order = 0, list[Tensor]()
    model.train()
    try:
        with Progress(total, f"{cfg.task} {cfg.method}", enabled=cfg.progress) as bar:
            while step < total:
                if not order:
                    order = _batches(len(train_set), cfg.batch_size, gen)
                idx = order.pop(0)
                batch = _trim({k: v[idx] for k, v in train_set.inputs.items()}) | class_inputs
                targets = {k: v[idx] for k, v in train_set.targets.items()}
                cur = lr_at(step, total, warmup, lr)
                for g in opt.param_groups:
                    g["lr"] = cur
                loss = loss_of(model, batch, targets)
                if not torch.isfinite(loss):
                    raise TrainingError(f"non-finite loss at step {step + 1}; try a lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                m: dict[str, Any] = {"step": step, "epoch": round(step / spe, 4), "loss": loss.item(), "lr": cur}
                if eval_set is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                    m |= score_model(model, eval_set, classes, cfg, _has_no_answer(train_set, eval_set))
                    model.train()
                metrics.append(m)
                mfile.write(json.dumps(m) + "\n")
                bar.update(1, loss=f"{loss.item():.4f}")
        train_time = time.perf_counter() - t0
        final: dict[str, Any] = {}
        if eval_set is not None:
            final = score_model(model, eval_set, classes, cfg, _has_no_answer(train_set, eval_set))
            metrics.append({"step": step, **final})
            mfile.write(json.dumps({"step": step, **final}) + "\n")
    finally:
        mfile.close()
    extra = {"class_template": cfg.class_template, "max_length": str(cfg.max_length)}
    if cfg.task == "question-answering":
        extra["squad_v2"] = json.dumps(_has_no_answer(train_set, eval_set))
    path = save_encoder_adapter(model, out / "adapter.safetensors", classes, extra)
    plot_losses(metrics, out / "loss.png")
    result = {
        "adapter": str(path),
        "task": cfg.task,
        "method": cfg.method,
        "steps": step,
        "trainable_params": model.n_trainable(),
        "train_time_s": round(train_time, 2),
        "final_train_loss": metrics[-1 if eval_set is None else -2]["loss"] if metrics else None,
        "eval": final,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _depth(encoder: Any, task: str) -> int:
    if task == "clip":
        cfg: Any = encoder.config
        return max(int(cfg.vision_config.num_hidden_layers), int(cfg.text_config.num_hidden_layers))
    return int(backbone(encoder).config.num_hidden_layers)


def _has_no_answer(*sets: Prepared | None) -> bool:
    return any(not r.answers for s in sets if s is not None and s.qa for r in s.qa)


# ---- evaluation -------------------------------------------------------------------------------------------
@torch.no_grad()
def score_model(
    model: TaskModel, data: Prepared, classes: list[str], cfg: EncoderTrainConfig, v2: bool | None = None
) -> dict[str, Any]:
    model.eval()
    if model.task == "question-answering":
        return _qa_metrics(model, data, cfg, _has_no_answer(data) if v2 is None else v2)
    if model.task == "clip":
        return _clip_metrics(model, data, classes, cfg)
    targets = D.label_ids(data.labels, classes, cfg.eval_data or "eval data")
    preds = _predict(model, data.inputs, cfg.batch_size, lambda lg: lg.argmax(-1))
    return {"accuracy": 100.0 * float((preds == targets).float().mean())}


def _predict(
    model: TaskModel, inputs: dict[str, Tensor], batch: int, f: Callable[[Tensor], Tensor], **extra: Tensor
) -> Tensor:
    n = int(next(iter(inputs.values())).shape[0])
    outs = []
    for i in range(0, n, max(batch, 64)):
        b = _trim({k: v[i : i + max(batch, 64)] for k, v in inputs.items()})
        outs.append(f(model(**b, **extra)))
    return torch.cat(outs)


def _qa_metrics(model: TaskModel, data: Prepared, cfg: EncoderTrainConfig, v2: bool) -> dict[str, Any]:
    assert data.qa is not None and data.qa_batch is not None
    qb = data.qa_batch
    preds: dict[str, str] = {}
    n = qb.ids.shape[0]
    step = max(cfg.batch_size, 64)
    for i in range(0, n, step):
        b = _trim({"input_ids": qb.ids[i : i + step], "attention_mask": qb.mask[i : i + step]})
        logits = model(**b)
        for j in range(logits.shape[0]):
            r = data.qa[i + j]
            c0, c1 = qb.spans[i + j]
            s, e, best, null = qa_spans(logits[j, :, 0], logits[j, :, 1], c0, c1, cfg.max_answer_tokens)
            if s < 0 or (v2 and null > best):
                preds[r.id] = ""
            else:
                offs = qb.offsets[i + j]
                preds[r.id] = r.context[offs[s - c0][0] : offs[e - c0][1]]
    sc = squad_score(preds, {r.id: r.answers for r in data.qa})
    return {k: v for k, v in sc.items() if k != "total"}


def _clip_metrics(model: TaskModel, data: Prepared, base: list[str], cfg: EncoderTrainConfig) -> dict[str, Any]:
    """Base accuracy (trained classes among themselves), novel accuracy (the others among themselves), HM."""
    seen = D.label_list(data.labels)
    groups = {"base": [c for c in seen if c in base], "novel": [c for c in seen if c not in base]}
    out: dict[str, Any] = {}
    for name, cls in groups.items():
        if not cls:
            continue
        rows = torch.tensor([i for i, lab in enumerate(data.labels) if lab in cls])
        ids, mask = class_texts(cfg.model, cls, cfg.class_template, cfg.max_length)
        pv = data.inputs["pixel_values"][rows]
        preds = _predict(
            model, {"pixel_values": pv}, cfg.batch_size, lambda lg: lg.argmax(-1), class_ids=ids, class_mask=mask
        )
        targets = D.label_ids([data.labels[int(i)] for i in rows], cls, cfg.eval_data or "eval data")
        out[f"{name}_accuracy"] = 100.0 * float((preds == targets).float().mean())
    if "base_accuracy" in out and "novel_accuracy" in out:
        a, b = out["base_accuracy"], out["novel_accuracy"]
        out["hm"] = 2 * a * b / (a + b) if a + b else 0.0
    return out


def evaluate(
    model_dir: str, adapter: str, data: str, batch_size: int = 64, threads: int | None = None
) -> dict[str, Any]:
    """Load an adapter onto its encoder and score it on `data` (the metrics of its task)."""
    if threads:
        torch.set_num_threads(threads)
    encoder = load_encoder(model_dir)
    model, meta = load_encoder_adapter(encoder, adapter)
    cfg = EncoderTrainConfig(
        model=model_dir,
        task=meta["task"],
        method=meta["method"],
        eval_data=data,
        batch_size=batch_size,
        max_length=int(meta.get("max_length", 64)),
        class_template=str(meta.get("class_template", "a photo of a {}.")),
    )
    eval_set = prepare(cfg.task, data, model_dir, encoder, cfg)
    v2 = json.loads(meta["squad_v2"]) if "squad_v2" in meta else None
    return {"task": cfg.task, "method": cfg.method, "records": len(eval_set)} | score_model(
        model, eval_set, meta["labels"], cfg, v2
    )


__all__ = ["DEFAULT_LR", "PROMPT_METHODS", "EncoderTrainConfig", "evaluate", "finetune", "load_encoder", "prepare"]
