"""Instruction tuning of one zero-init attention adapter on a frozen base (paper sec. 4.1).

The recipe (defaults = the paper): AdamW (0.9, 0.95), weight decay 0.02, lr = blr x effective_batch / 256
with blr 9e-3, 5 epochs, 2 linear warm-up epochs then half-cosine to 0, stepped per iteration, effective
batch 64 reached by gradient accumulation. Adapter parameters and optimiser state are fp32; the frozen base
is bf16 by default.

Loss: summed cross-entropy over every supervised token of a step divided by the step's supervised-token
count (a token-level mean over the whole effective batch), so the gradient does not depend on how the step
is split into micro-batches or across processes. Logits are computed only at supervised positions and a
chunk at a time (`linear_cross_entropy`), never as a [B, T, vocab] tensor.

Distributed (torchrun): every process reads the same data and the same seeded plan, takes micro-batches
rank, rank + world, ... of each step, and the adapter's gradients (the only trainable tensors) are summed
with one all-reduce per step (gloo on CPU, nccl on CUDA). Only rank 0 writes files.

Checkpoints (`checkpoint.pt`, written atomically) hold the adapter, optimiser, scheduler position, RNG
states and the step; the data order is a pure function of (seed, epoch), so the step is the data position
and a resumed run repeats the uninterrupted run's arithmetic exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from llama_adapter.errors import TrainingError
from llama_adapter.model import Transformer
from llama_adapter.training.data import (
    IGNORE_INDEX,
    LoadReport,
    TokenizeReport,
    collate,
    epoch_plan,
    load_records,
    split_validation,
    steps_per_epoch,
    tokenize_records,
    validate_records,
)
from llama_adapter.zero_init_attention import AdapterConfig

ADAPTER_NAME = "default"
CHECKPOINT = "checkpoint.pt"
KILL_ENV = "LLAMA_ADAPTER_KILL_AFTER_CHECKPOINT"  # test hook: SIGKILL self right after checkpoint at step N
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    """Every field is a `llama-adapter finetune` flag (`--max-length` for max_length, ...)."""

    base: str = "builtin"
    data: list[str] = field(default_factory=list)
    out: str = "runs/adapter"
    val_data: list[str] = field(default_factory=list)
    val_fraction: float = 0.0
    template: str = "alpaca"
    max_length: int = 512
    epochs: float = 5
    warmup_epochs: float = 2
    batch_size: int = 64  # effective batch per optimiser step (all processes together)
    micro_batch: int = 4
    blr: float = 9e-3
    lr: float | None = None  # overrides blr * batch_size / 256
    weight_decay: float = 0.02
    beta1: float = 0.9
    beta2: float = 0.95
    prompt_length: int = 10
    layers: int | None = None  # None -> min(30, n_layers)
    gate: str = "tanh"
    attention: str = "zero-init"  # or "rand-init" (Table-5 baseline)
    dtype: str = "bf16"
    seed: int = 0
    save_every: int = 0
    resume: str | None = None
    skip_invalid: bool = False
    max_steps: int | None = None  # stop after this many steps (the lr schedule is unchanged)
    device: str = "auto"
    fsdp: bool = False
    compile: bool = False
    image_encoder: str | None = None
    image_root: str | None = None
    feature_cache: str | None = None
    progress: bool = True
    adapter_name: str = ADAPTER_NAME
    loss_chunk: int = 256  # supervised positions per logits chunk

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainingError(f"{source}: unknown option(s) {', '.join(unknown)}")
        d = dict(d)
        for k in ("data", "val_data"):
            if isinstance(d.get(k), str):
                d[k] = [d[k]]
        return cls(**d)

    def validate(self) -> None:
        checks = [
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.micro_batch >= 1, "--micro-batch must be >= 1"),
            (self.max_length >= 2, "--max-length must be >= 2"),
            (self.epochs > 0, "--epochs must be > 0"),
            (self.warmup_epochs >= 0, "--warmup-epochs must be >= 0"),
            (self.effective_lr > 0, "the learning rate must be > 0"),
            (self.save_every >= 0, "--save-every must be >= 0"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1"),
            (self.attention in ("zero-init", "rand-init"), "--attention must be zero-init or rand-init"),
            (self.gate in ("tanh", "linear"), "--gate must be tanh or linear"),
            (self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}"),
            (self.loss_chunk >= 1, "--loss-chunk must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise TrainingError(msg)


@dataclass
class TrainResult:
    adapter_path: Path
    out_dir: Path
    metrics: list[dict[str, Any]]
    train_time_s: float
    n_trainable: int
    final_train_loss: float | None
    val_loss: float | None
    steps: int = 0
    total_steps: int = 0
    n_train: int = 0
    n_val: int = 0
    n_truncated: int = 0
    n_skipped: int = 0
    adapter_name: str = ADAPTER_NAME


# ---- loss ------------------------------------------------------------------------------------------------
class _LinearCrossEntropy(torch.autograd.Function):
    """sum CE(h @ W^T, y) for a frozen W, a chunk of rows at a time. The gradient w.r.t. h is produced in
    the forward pass chunk by chunk, so neither logits nor probabilities are kept for backward."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, target: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        n_rows, vocab = h.shape[0], weight.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        # two buffers for the whole call, reused by every chunk: fresh [chunk, vocab] tensors per chunk cost
        # more in page faults (CPU) or allocator churn than the softmax itself
        c = min(chunk, n_rows)
        logits_buf = h.new_empty(c, vocab)
        probs_buf = logits_buf if h.dtype == torch.float32 else torch.empty(c, vocab, device=h.device)
        wt = weight.t()
        for s in range(0, n_rows, chunk):
            y = target[s : s + chunk]
            n = len(y)
            logits, p = logits_buf[:n], probs_buf[:n]
            torch.mm(h[s : s + n], wt, out=logits)
            if p is not logits:
                p.copy_(logits)  # fp32 softmax
            picked = p.gather(1, y[:, None]).squeeze(1)
            mx = p.amax(dim=-1, keepdim=True)
            z = p.sub_(mx).exp_().sum(dim=-1, keepdim=True)
            total += (mx.squeeze(1) + z.squeeze(1).log() - picked).sum()
            if grad is not None:
                p.div_(z)[torch.arange(n, device=y.device), y] -= 1.0  # d(CE)/d(logits) = softmax - onehot
                if p is not logits:
                    logits.copy_(p)
                torch.mm(logits, weight, out=grad[s : s + n])
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad * g.to(grad.dtype) if grad is not None else None), None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, chunk: int = 256) -> Tensor:
    """Summed cross-entropy of rows h [N, dim] against a frozen output matrix; fp32 result."""
    if weight.requires_grad:  # a trainable head: plain autograd
        return F.cross_entropy(F.linear(h, weight).float(), target, reduction="sum")
    return _LinearCrossEntropy.apply(h, weight, target, chunk)


def output_weight(model: Transformer) -> Tensor:
    return model.tok_embeddings.weight if model.output is None else model.output.weight


def batch_loss(model: Transformer, adapter: str, batch: dict[str, Tensor], chunk: int = 256) -> tuple[Tensor, int]:
    """(summed CE over the supervised positions, number of them); logits only where labels != -100."""
    dev = output_weight(model).device
    ids = batch["input_ids"].to(dev, non_blocking=True)
    labels = batch["labels"].to(dev, non_blocking=True)
    feats = batch.get("image_features")
    h = model(ids, adapter=adapter, return_hidden=True,
              image_features=feats.to(dev) if feats is not None else None)
    tgt = labels[:, 1:]
    mask = tgt != IGNORE_INDEX
    sel = h[:, :-1][mask]
    return linear_cross_entropy(sel, output_weight(model), tgt[mask], chunk), int(mask.sum())


# ---- schedule --------------------------------------------------------------------------------------------
def lr_factor(step: int, spe: int, epochs: float, warmup_epochs: float) -> float:
    """Multiplier of the peak lr at (0-based) step: linear warm-up, then half-cosine to 0 at `epochs`."""
    w, total = warmup_epochs * spe, epochs * spe
    if step < w:
        return min(1.0, (step + 1) / w)
    if total <= w:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - w) / (total - w))))


# ---- helpers ---------------------------------------------------------------------------------------------
def _dist() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate())}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    py = json.loads(st["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _resolve_device(cfg: TrainConfig, local_rank: int, world: int) -> torch.device:
    dev = cfg.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and world > 1:
        dev = f"cuda:{local_rank}"
    d = torch.device(dev)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("--device cuda requested but CUDA is not available")
        torch.cuda.set_device(d)
    return d


def _plot(metrics: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    tr = [m for m in metrics if "loss" in m]
    va = [m for m in metrics if m.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot([m["step"] for m in tr], [m["loss"] for m in tr], label="train loss", lw=1)
    if va:
        ax.plot([m["step"] for m in va], [m["val_loss"] for m in va], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    if tr:
        ax2.plot([m["step"] for m in tr], [m["lr"] for m in tr], color="gray", ls="--", lw=1, label="lr")
    ax2.set_ylabel("lr")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper right")
    fig.tight_layout()
    tmp = path.with_name("tmp-" + path.name)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _load_checkpoint(path: str) -> tuple[dict[str, Any], Path]:
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no checkpoint to resume from")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unpickling failure means an unusable file
        raise TrainingError(f"{p}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    return ckpt, p


# Options that change the arithmetic of a run: a resumed run must use the same values.
_TRAJECTORY_KEYS = ("batch_size", "seed", "epochs", "warmup_epochs", "blr", "lr", "weight_decay", "beta1",
                    "beta2", "prompt_length", "layers", "gate", "attention", "template", "max_length",
                    "val_fraction")


# ---- training --------------------------------------------------------------------------------------------
def _local_base_bytes(model: Transformer) -> int:
    """Bytes of frozen base weights this process holds (a shard of each block under FSDP)."""
    total = 0
    for n, p in model.named_parameters():
        if not n.startswith("adapters."):
            t = p.to_local() if hasattr(p, "to_local") else p
            total += t.numel() * t.element_size()
    return total


def shard_frozen_base(model: Transformer) -> None:
    """FSDP2: shard each frozen transformer block across the process group (one block unsharded at a time).

    The adapter stays replicated (its gradients are all-reduced like DDP's); each layer projects its prompts
    inside its own forward, where FSDP has gathered that layer's k/v weights.
    """
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard  # type: ignore[no-redef]
    for block in model.layers:
        fully_shard(block)


def train(cfg: TrainConfig, *, model: Transformer | None = None, records: list[dict] | None = None,
          val_records: list[dict] | None = None) -> TrainResult:
    """Train adapter `cfg.adapter_name` ("default") and write it to `cfg.out/adapter.safetensors`."""
    cfg.validate()
    rank, world, local_rank = _dist()
    main = rank == 0
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if main else (lambda *a: None)

    # distributed
    dist = None
    if world > 1:
        import torch.distributed as dist

    device = _resolve_device(cfg, local_rank, world) if model is None else output_weight(model).device
    if world > 1 and dist is not None and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    # resume
    ckpt = None
    if cfg.resume:
        ckpt, ckpt_path = _load_checkpoint(cfg.resume)
        saved = json.loads(ckpt["config"])
        diff = [k for k in _TRAJECTORY_KEYS if saved.get(k) != getattr(cfg, k)]
        if diff:
            raise TrainingError(f"{ckpt_path}: checkpoint was made with different "
                                + ", ".join(f"{k}={saved.get(k)!r} (now {getattr(cfg, k)!r})" for k in diff))
        log(f"resuming from {ckpt_path} at step {ckpt['step']}")

    # data
    rep, vrep = LoadReport(), LoadReport()
    if records is not None:
        recs = validate_records(records, cfg.skip_invalid, "records", rep)
    else:
        if not cfg.data:
            raise TrainingError("no training data: pass --data FILE|DIR (JSON list or JSONL, Alpaca format)")
        recs = load_records(cfg.data, cfg.skip_invalid, rep)
    if val_records is not None:
        vrecs = validate_records(val_records, cfg.skip_invalid, "val records", vrep)
    elif cfg.val_data:
        vrecs = load_records(cfg.val_data, cfg.skip_invalid, vrep)
    else:
        vrecs = []
    if cfg.val_fraction:
        if vrecs:
            raise TrainingError("use either --val-data or --val-fraction, not both")
        recs, vrecs = split_validation(recs, cfg.val_fraction, cfg.seed)
    n_skipped = rep.n_skipped + vrep.n_skipped
    if n_skipped:
        log(f"skipped {n_skipped} invalid record(s), e.g. {(rep.problems + vrep.problems)[0]}")
    if not recs:
        where = ", ".join(cfg.data) if records is None else "records"
        raise TrainingError(f"{where}: the training set is empty")

    # base
    if model is None:
        from llama_adapter.loading import load_model

        model = load_model(cfg.base, dtype=DTYPES[cfg.dtype], device=device)
    if model.tokenizer is None:
        raise TrainingError(f"{cfg.base}: the base has no tokenizer (tokenizer.json or tokenizer.model)")
    mcfg = model.config
    max_length = min(cfg.max_length, mcfg.max_seq_len)
    if max_length < cfg.max_length:
        log(f"note: --max-length {cfg.max_length} exceeds the model's context; using {max_length}")

    # adapter
    name = cfg.adapter_name
    if name in model.adapters:
        model.remove_adapter(name)
    layers = cfg.layers if cfg.layers is not None else min(30, mcfg.n_layers)
    if not 1 <= layers <= mcfg.n_layers:
        raise TrainingError(f"--layers {layers}: the base has {mcfg.n_layers} layers")
    acfg = AdapterConfig(prompt_length=cfg.prompt_length, layers=layers, gate=cfg.gate,  # type: ignore[arg-type]
                         init="zero" if cfg.attention == "zero-init" else "random")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    adapter = model.add_adapter(name, acfg)
    if cfg.image_encoder:
        try:
            from llama_adapter.multimodal.features import prepare_multimodal  # type: ignore[import-not-found]
        except ImportError as e:
            raise TrainingError(f"--image-encoder needs llama_adapter.multimodal.features, which is not available ({e})"
                                ) from None
        recs, vrecs = prepare_multimodal(model, name, recs, vrecs, cfg)
        vrecs = vrecs or []
    adapter.to(device)
    if world > 1 and dist is not None:  # identical start on every rank
        for t in adapter.state_dict().values():
            dist.broadcast(t, 0)
    params = [p for p in adapter.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    if cfg.fsdp:
        shard_frozen_base(model)

    # tokenise
    trep, vtrep = TokenizeReport(), TokenizeReport()
    train_ex = tokenize_records(model.tokenizer, recs, cfg.template, max_length, trep)
    val_ex = tokenize_records(model.tokenizer, vrecs, cfg.template, max_length, vtrep)
    if not train_ex:
        raise TrainingError(f"every training record has its prompt cut off by --max-length {max_length}")
    log(f"data: {len(train_ex)} train / {len(val_ex)} val examples, {trep.n_supervised:,} supervised of "
        f"{trep.n_tokens:,} tokens; truncated to {max_length}: {trep.n_truncated + vtrep.n_truncated}"
        + (f"; dropped (prompt fills max-length): {trep.n_dropped + vtrep.n_dropped}"
           if trep.n_dropped + vtrep.n_dropped else ""))

    # optimiser
    decay = [p for n, p in adapter.named_parameters() if p.requires_grad and p.ndim >= 2 and n != "gates"]
    no_decay = [p for n, p in adapter.named_parameters() if p.requires_grad and not (p.ndim >= 2 and n != "gates")]
    peak_lr = cfg.effective_lr
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=peak_lr, betas=(cfg.beta1, cfg.beta2))
    lengths = [len(e.ids) for e in train_ex]
    spe = steps_per_epoch(len(train_ex), cfg.batch_size)
    total_steps = max(1, math.ceil(cfg.epochs * spe))
    run_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    out = Path(cfg.out)
    metrics: list[dict[str, Any]] = []
    start = 0
    if ckpt is not None:
        if ckpt["n_train"] != len(train_ex):
            raise TrainingError(f"checkpoint was made with {ckpt['n_train']} training examples, "
                                f"the data now gives {len(train_ex)}")
        with torch.no_grad():
            adapter.load_state_dict({k: v.to(device) for k, v in ckpt["adapter"].items()})
        opt.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"])
        start = int(ckpt["step"])
        metrics = json.loads(ckpt["metrics"])
    if cfg.compile:
        for layer in model.layers:
            layer.compile(dynamic=True)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        saved_cfg = cfg.to_dict() | {"resume": None}
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(saved_cfg, sort_keys=False))
        (out / "run_info.json").write_text(json.dumps({
            "peak_lr": peak_lr, "steps_per_epoch": spe, "total_steps": total_steps, "run_steps": run_steps,
            "n_train": len(train_ex), "n_val": len(val_ex), "n_truncated": trep.n_truncated + vtrep.n_truncated,
            "n_skipped": n_skipped, "n_trainable": n_trainable, "adapter_name": name, "layers": layers,
            "world_size": world, "fsdp": cfg.fsdp, "base_bytes_on_rank0": _local_base_bytes(model),
            "device": str(device), "base": str(getattr(model, "source", cfg.base)),
        }, indent=2))
        with open(out / "metrics.jsonl", "w") as f:  # on resume: exactly the metrics up to the checkpoint
            f.writelines(json.dumps(m) + "\n" for m in metrics)
    mfile = open(out / "metrics.jsonl", "a") if main else None  # noqa: SIM115

    def evaluate() -> float | None:
        if not val_ex:
            return None
        tot = torch.zeros(2, dtype=torch.float64)
        order = sorted(range(len(val_ex)), key=lambda i: -len(val_ex[i].ids))
        micro = [order[i : i + cfg.micro_batch] for i in range(0, len(order), cfg.micro_batch)]
        with torch.no_grad():
            for mb in micro[rank::world]:
                loss, n = batch_loss(model, name, collate([val_ex[i] for i in mb], model.tokenizer.pad_id),
                                     cfg.loss_chunk)
                tot += torch.tensor([float(loss), n], dtype=torch.float64)
        if world > 1 and dist is not None:
            t = tot.to(device)  # nccl reduces CUDA tensors only
            dist.all_reduce(t)
            tot = t.cpu()
        return float(tot[0] / tot[1])

    def checkpoint(step: int) -> None:
        if main:
            _atomic_torch_save({
                "step": step, "n_train": len(train_ex), "config": json.dumps(cfg.to_dict()),
                "adapter": {k: v.detach().cpu() for k, v in adapter.state_dict().items()},
                "optimizer": opt.state_dict(), "scheduler": {"step": step, "steps_per_epoch": spe,
                                                             "total_steps": total_steps, "peak_lr": peak_lr},
                "rng": _rng_state(), "metrics": json.dumps(metrics),
            }, out / CHECKPOINT)
            kill = os.environ.get(KILL_ENV)
            if kill and int(kill) == step:
                os.kill(os.getpid(), signal.SIGKILL)
        if world > 1 and dist is not None:
            dist.barrier()

    bar = None
    if main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=run_steps, initial=start, desc="finetune", unit="step", dynamic_ncols=True)
    t_train = time.perf_counter()
    pad_id = model.tokenizer.pad_id
    plan: list[list[list[int]]] = []
    plan_epoch = -1
    last_loss: float | None = None
    last_val: float | None = next((m["val_loss"] for m in reversed(metrics) if "val_loss" in m), None)
    model.train()
    try:
        for step in range(start, run_steps):
            epoch = step // spe
            if epoch != plan_epoch:
                plan, plan_epoch = epoch_plan(lengths, cfg.batch_size, cfg.micro_batch, cfg.seed, epoch), epoch
            micro = plan[step % spe]
            t0 = time.perf_counter()
            lr = peak_lr * lr_factor(step, spe, cfg.epochs, cfg.warmup_epochs)
            for g in opt.param_groups:
                g["lr"] = lr
            n_sup = sum(train_ex[i].n_supervised for mb in micro for i in mb)
            n_tok = 0
            loss_sum = torch.zeros((), dtype=torch.float32)
            for mb in micro[rank::world]:
                batch = collate([train_ex[i] for i in mb], pad_id)
                loss, _ = batch_loss(model, name, batch, cfg.loss_chunk)
                (loss / n_sup).backward()
                loss_sum += loss.detach().float().cpu()
                n_tok += sum(len(train_ex[i].ids) for i in mb)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
            stats = torch.tensor([float(loss_sum), n_tok], dtype=flat.dtype, device=flat.device)
            if world > 1 and dist is not None:
                buf = torch.cat([flat, stats])
                dist.all_reduce(buf)
                flat, stats = buf[: flat.numel()], buf[flat.numel() :]
                o = 0
                for p in params:
                    p.grad.copy_(flat[o : o + p.numel()].view_as(p))  # type: ignore[union-attr]
                    o += p.numel()
            step_loss = float(stats[0]) / n_sup
            grad_norm = float(torch.linalg.vector_norm(flat))
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                good = out / CHECKPOINT
                where = (f"the last good checkpoint {good} is kept (resume with --resume {out})"
                         if good.is_file() else "no checkpoint was written")
                raise TrainingError(f"non-finite loss ({step_loss}) or gradient norm ({grad_norm}) at step "
                                    f"{step + 1}; stopping, {where}. Try a lower --lr/--blr or --dtype fp32")
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            last_loss = step_loss
            m: dict[str, Any] = {"step": step + 1, "epoch": round((step + 1) / spe, 4), "loss": step_loss,
                                 "lr": lr, "tokens_per_s": float(stats[1]) / dt, "grad_norm": grad_norm,
                                 "step_time_s": dt}
            if (step + 1) % spe == 0 or step + 1 == run_steps:
                last_val = evaluate()
                if last_val is not None:
                    m["val_loss"] = last_val
                    log(f"epoch {(step + 1) / spe:.2f}: val loss {last_val:.4f}")
            metrics.append(m)
            if mfile is not None:
                mfile.write(json.dumps(m) + "\n")
                mfile.flush()
            if bar is not None:
                bar.set_postfix(epoch=f"{(step + 1) / spe:.2f}", loss=f"{step_loss:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{m['tokens_per_s']:.0f}", refresh=False)
                bar.update(1)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < run_steps:
                checkpoint(step + 1)
        checkpoint(run_steps)
    finally:
        if bar is not None:
            bar.close()
        if mfile is not None:
            mfile.close()
        model.eval()
    train_time = time.perf_counter() - t_train

    adapter_path = out / "adapter.safetensors"
    if main:
        from llama_adapter.adapter_file import save_adapter

        adapter.meta["template"] = cfg.template
        save_adapter(model, name, adapter_path, extra={"trained_steps": str(run_steps),
                                                       "train_loss": f"{last_loss}" if last_loss else ""})
        _plot(metrics, out / "loss.png")
        log(f"saved {adapter_path} ({n_trainable:,} trainable parameters, {train_time:.1f}s)")
    if world > 1 and dist is not None:
        dist.barrier()
    return TrainResult(adapter_path=adapter_path, out_dir=out, metrics=metrics, train_time_s=train_time,
                       n_trainable=n_trainable, final_train_loss=last_loss, val_loss=last_val, steps=run_steps,
                       total_steps=total_steps, n_train=len(train_ex), n_val=len(val_ex),
                       n_truncated=trep.n_truncated + vtrep.n_truncated, n_skipped=n_skipped, adapter_name=name)
