"""Instruction tuning of one zero-init attention adapter on a frozen base (paper sec. 4.1): `train()`.

The recipe (defaults = the paper): AdamW (0.9, 0.95), weight decay 0.02, lr = blr x effective_batch / 256
with blr 9e-3, 5 epochs, 2 linear warm-up epochs then half-cosine to 0, stepped per iteration, effective
batch 64 reached by gradient accumulation. Adapter parameters and optimiser state are fp32; the frozen base
is bf16 by default.

`train()` is the pipeline; each stage is a function of its own: `load_data` (train + val records, the val
split), `load_base`, `build_adapter` (seeded; multi-modal when `--image-encoder`), `tokenize`,
`build_optimizer`, `prepare` (all of these, plus resuming, into a `Run`), `write_run_files`, `train_step` (one
optimiser step, returns its metrics), `evaluate` (validation loss) and `checkpoint`. The pieces live in
sibling modules: the options in `config`, the loss in `loss`, the lr schedule in `schedule`, checkpoint.pt in
`checkpointing`, the process group in `distributed`, loss.png in `plot`, records and batches in `data`.

Only rank 0 writes files (config.yaml, run_info.json, metrics.jsonl, checkpoint.pt, adapter.safetensors,
loss.png) and logs (to stderr).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from llama_adapter.backends import backend_of
from llama_adapter.errors import TrainingError
from llama_adapter.progress import Progress
from llama_adapter.training.checkpointing import (
    CHECKPOINT,
    check_trajectory,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from llama_adapter.training.config import DTYPES, TrainConfig, TrainResult
from llama_adapter.training.data import (
    CHAT,
    Example,
    LoadReport,
    TokenizeReport,
    collate,
    epoch_plan,
    load_records,
    resolve_template,
    split_validation,
    tokenize_records,
    validate_records,
)
from llama_adapter.training.distributed import (
    Topology,
    all_reduce_sum,
    barrier,
    broadcast_module,
    init_process_group,
    local_base_bytes,
    reduce_gradients,
    resolve_device,
    shard_frozen_base,
    topology,
)
from llama_adapter.training.loss import batch_loss, output_weight
from llama_adapter.training.plot import plot_losses
from llama_adapter.training.schedule import lr_factor, step_counts
from llama_adapter.zero_init_attention import INIT_NAMES, AdapterConfig

if TYPE_CHECKING:
    from llama_adapter.model import Transformer
    from llama_adapter.zero_init_attention import Adapter

Log = Callable[..., None]


@dataclass
class Run:
    """One training run once set up: what `train_step`, `evaluate` and `checkpoint` work on."""

    cfg: TrainConfig
    topo: Topology
    log: Log
    device: torch.device
    model: Transformer
    adapter: Adapter
    params: list[nn.Parameter]  # the trainable tensors (the adapter's)
    opt: torch.optim.Optimizer
    train_ex: list[Example]
    val_ex: list[Example]
    spe: int  # optimiser steps per epoch
    total_steps: int  # steps of the whole lr schedule
    run_steps: int  # steps this run ends at (<= total_steps with --max-steps)
    layers: int  # layers with adaption prompts
    pad_id: int  # the tokenizer's padding id (batches are right-padded with it)
    template: str = "alpaca"  # the template the examples were rendered with (`auto` resolved; recorded in the adapter)
    n_skipped: int = 0  # invalid records skipped (train + val)
    n_truncated: int = 0  # examples truncated to max_length (train + val)
    start: int = 0  # the first step to take (> 0 when resuming)
    metrics: list[dict[str, Any]] = field(default_factory=list)  # one dict per step taken so far

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def name(self) -> str:
        return self.cfg.adapter_name

    @property
    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.params)


def _logger(main: bool) -> Log:
    return (lambda *a: print(*a, file=sys.stderr, flush=True)) if main else (lambda *a: None)


# ---- setting up ------------------------------------------------------------------------------------------
def load_data(
    cfg: TrainConfig, records: list[dict] | None, val_records: list[dict] | None, log: Log
) -> tuple[list[dict], list[dict], int]:
    """(training records, validation records, number of invalid records skipped) from the arguments or the
    `--data` / `--val-data` files; `--val-fraction` splits the validation records off the training ones."""
    rep, vrep = LoadReport(), LoadReport()
    if records is not None:
        recs = validate_records(records, cfg.skip_invalid, "records", rep)
    else:
        if not cfg.data:
            raise TrainingError(
                "no training data: pass --data FILE|DIR (JSON list or JSONL, Alpaca records or conversations)"
            )
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
    return recs, vrecs, n_skipped


def load_base(cfg: TrainConfig, model: Transformer | None, device: torch.device, log: Log) -> tuple[Transformer, int]:
    """(the frozen base, loaded from `--base` unless given, the max length it allows)."""
    if model is None:
        from llama_adapter.loading import load_model

        model = load_model(cfg.base, dtype=DTYPES[cfg.dtype], device=device, quantize=cfg.quantize)
    backend_of(model)  # a model built by hand gets its device's backend here (load_model installed it already)
    if model.tokenizer is None:
        raise TrainingError(f"{cfg.base}: the base has no tokenizer (tokenizer.json or tokenizer.model)")
    max_length = min(cfg.max_length, model.config.max_seq_len)
    if max_length < cfg.max_length:
        log(f"note: --max-length {cfg.max_length} exceeds the model's context; using {max_length}")
    return model, max_length


def adapter_config(cfg: TrainConfig, n_layers: int) -> AdapterConfig:
    """The adapter's shape from the options; `--layers` defaults to min(30, n_layers)."""
    layers = cfg.layers if cfg.layers is not None else min(30, n_layers)
    if not 1 <= layers <= n_layers:
        raise TrainingError(f"--layers {layers}: the base has {n_layers} layers")
    return AdapterConfig(
        prompt_length=cfg.prompt_length,
        layers=layers,
        gate=cfg.gate,  # type: ignore[arg-type]
        init=INIT_NAMES[cfg.attention],
    )


def build_adapter(
    cfg: TrainConfig, model: Transformer, recs: list[dict], vrecs: list[dict], device: torch.device, topo: Topology
) -> tuple[Adapter, list[dict], list[dict]]:
    """A fresh adapter `cfg.adapter_name` on `model` (replacing one of that name), initialised from `--seed` and
    identical on every rank. With `--image-encoder` / `--audio-encoder` it gets a projection and the records their
    image / video / audio features, hence the records are returned too."""
    name = cfg.adapter_name
    if name in model.adapters:
        model.remove_adapter(name)
    acfg = adapter_config(cfg, model.config.n_layers)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    adapter = model.add_adapter(name, acfg)
    if cfg.image_encoder or cfg.audio_encoder:
        from llama_adapter.multimodal.features import prepare_multimodal

        recs, maybe_vrecs = prepare_multimodal(model, name, recs, vrecs, cfg)
        vrecs = maybe_vrecs or []
    adapter.to(device)
    broadcast_module(adapter, topo)
    return adapter, recs, vrecs


def run_template(cfg: TrainConfig, model: Transformer, recs: list[dict], vrecs: list[dict]) -> str:
    """The template of the run (`--template auto` resolved after the data); `chat` needs the base's own."""
    template = resolve_template(cfg.template, [*recs, *vrecs])
    if template == CHAT and model.chat_template is None:
        what = "the conversations" if cfg.template != CHAT else "the records"
        raise TrainingError(
            f"{getattr(model, 'source', None) or cfg.base}: the base has no chat template (chat_template.jinja, or "
            f"chat_template in tokenizer_config.json) to render {what} with; pass --template alpaca to render each "
            "user turn as an instruction"
        )
    return template


def tokenize(
    cfg: TrainConfig,
    model: Transformer,
    recs: list[dict],
    vrecs: list[dict],
    max_length: int,
    log: Log,
    template: str | None = None,
) -> tuple[list[Example], list[Example], int]:
    """(training examples, validation examples, number truncated) rendered with `template` (default: the run's,
    `run_template`); examples left with nothing supervised by max_length are dropped."""
    template = template if template is not None else run_template(cfg, model, recs, vrecs)
    trep, vtrep = TokenizeReport(), TokenizeReport()
    tok, chat, on = model.tokenizer, model.chat_template, cfg.train_on
    train_ex = tokenize_records(tok, recs, template, max_length, trep, chat_template=chat, train_on=on)
    val_ex = tokenize_records(tok, vrecs, template, max_length, vtrep, chat_template=chat, train_on=on)
    if not train_ex:
        raise TrainingError(f"every training record has its prompt cut off by --max-length {max_length}")
    log(
        f"data ({template} template): {len(train_ex)} train / {len(val_ex)} val examples, "
        f"{trep.n_supervised:,} supervised of "
        f"{trep.n_tokens:,} tokens; truncated to {max_length}: {trep.n_truncated + vtrep.n_truncated}"
        + (
            f"; dropped (prompt fills max-length): {trep.n_dropped + vtrep.n_dropped}"
            if trep.n_dropped + vtrep.n_dropped
            else ""
        )
    )
    return train_ex, val_ex, trep.n_truncated + vtrep.n_truncated


def param_groups(adapter: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed) trainable parameters: matrices decay; the gates and 1-D parameters do not."""
    decay = [p for n, p in adapter.named_parameters() if p.requires_grad and p.ndim >= 2 and n != "gates"]
    no_decay = [p for n, p in adapter.named_parameters() if p.requires_grad and not (p.ndim >= 2 and n != "gates")]
    return decay, no_decay


def build_optimizer(adapter: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = param_groups(adapter)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.effective_lr,
        betas=(cfg.beta1, cfg.beta2),
    )


def prepare(
    cfg: TrainConfig,
    model: Transformer | None = None,
    records: list[dict] | None = None,
    val_records: list[dict] | None = None,
) -> Run:
    """Everything before the first step, in this order: options, process group, resume checkpoint, data, base,
    adapter (seeds the RNGs), tokenisation, optimiser, then the resumed state (restores the RNGs)."""
    cfg.validate()
    topo = topology()
    if topo.main:
        check_out_dir(cfg)
    log = _logger(topo.main)
    device = resolve_device(cfg.device, topo) if model is None else output_weight(model).device
    if cfg.quantize is not None and model is None:  # refused (one line) before any data or weight is read
        from llama_adapter.quantize import check_quantize

        check_quantize(cfg.quantize, "cpu" if cfg.device == "auto" else device, cfg.fsdp)
        device = torch.device("cpu")
    init_process_group(topo, device)
    ckpt = None
    if cfg.resume:
        ckpt, ckpt_path = load_checkpoint(cfg.resume)
        check_trajectory(ckpt, cfg, ckpt_path)
        log(f"resuming from {ckpt_path} at step {ckpt['step']}")
    recs, vrecs, n_skipped = load_data(cfg, records, val_records, log)
    model, max_length = load_base(cfg, model, device, log)
    adapter, recs, vrecs = build_adapter(cfg, model, recs, vrecs, device, topo)
    params = [p for p in adapter.parameters() if p.requires_grad]
    if cfg.fsdp:
        shard_frozen_base(model)
    template = run_template(cfg, model, recs, vrecs)
    train_ex, val_ex, n_truncated = tokenize(cfg, model, recs, vrecs, max_length, log, template)
    opt = build_optimizer(adapter, cfg)
    spe, total_steps, run_steps = step_counts(len(train_ex), cfg.batch_size, cfg.epochs, cfg.max_steps)
    tokenizer = model.tokenizer
    assert tokenizer is not None  # load_base refuses a base without one
    run = Run(
        cfg=cfg,
        topo=topo,
        log=log,
        device=device,
        model=model,
        adapter=adapter,
        params=params,
        opt=opt,
        train_ex=train_ex,
        val_ex=val_ex,
        spe=spe,
        total_steps=total_steps,
        run_steps=run_steps,
        layers=adapter.cfg.layers,
        pad_id=tokenizer.pad_id,
        template=template,
        n_skipped=n_skipped,
        n_truncated=n_truncated,
    )
    if ckpt is not None:
        run.start, run.metrics = restore_checkpoint(ckpt, adapter, opt, device, len(train_ex))
    return run


RUN_FILES = ("adapter.safetensors", CHECKPOINT, "metrics.jsonl")  # what marks a directory as holding a run


def check_out_dir(cfg: TrainConfig) -> None:
    """Refuse an `--out` that holds an earlier run, unless resuming it or told `--overwrite`.

    A reused or mistyped `--out` would otherwise replace an adapter that took hours, without a word. Checked
    before the data and the base are loaded, so the refusal comes at once.
    """
    if cfg.resume or cfg.overwrite:
        return
    out = Path(cfg.out)
    found = [f for f in RUN_FILES if (out / f).exists()]
    if found:
        raise TrainingError(
            f"{out} holds an earlier run ({', '.join(found)}): continue it with --resume {out}, "
            "replace it with --overwrite, or choose another --out"
        )


def write_run_files(run: Run) -> None:
    """config.yaml (the options, to pass back with --config), run_info.json, and metrics.jsonl (on resume:
    exactly the metrics up to the checkpoint). With --overwrite, the earlier run's adapter, checkpoint and
    plot go first, so none of them can be taken for this run's."""
    import yaml

    cfg, out = run.cfg, run.out
    out.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite and not cfg.resume:
        for name in (*RUN_FILES, "loss.png"):
            (out / name).unlink(missing_ok=True)
    saved_cfg = cfg.to_dict() | {"resume": None, "overwrite": False}
    (out / "config.yaml").write_text(yaml.safe_dump(saved_cfg, sort_keys=False))
    (out / "run_info.json").write_text(
        json.dumps(
            {
                "peak_lr": cfg.effective_lr,
                "steps_per_epoch": run.spe,
                "total_steps": run.total_steps,
                "run_steps": run.run_steps,
                "n_train": len(run.train_ex),
                "n_val": len(run.val_ex),
                "n_truncated": run.n_truncated,
                "n_skipped": run.n_skipped,
                "n_trainable": run.n_trainable,
                "adapter_name": run.name,
                "template": run.template,
                "layers": run.layers,
                "world_size": run.topo.world,
                "fsdp": cfg.fsdp,
                "base_bytes_on_rank0": local_base_bytes(run.model),
                "device": str(run.device),
                "base": str(getattr(run.model, "source", cfg.base)),
            },
            indent=2,
        )
    )
    with open(out / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in run.metrics)


# ---- one step, evaluation, checkpoints -------------------------------------------------------------------
def _accumulate(run: Run, micro: list[list[int]], n_sup: int) -> tuple[Tensor, int]:
    """Forward and backward of this rank's micro-batches of a step; returns (summed loss, tokens seen)."""
    n_tok = 0
    loss_sum = torch.zeros((), dtype=torch.float32)
    pad_id = run.pad_id
    for mb in micro[run.topo.rank :: run.topo.world]:
        batch = collate([run.train_ex[i] for i in mb], pad_id)
        loss, _ = batch_loss(run.model, run.name, batch, run.cfg.loss_chunk)
        (loss / n_sup).backward()
        loss_sum += loss.detach().float().cpu()
        n_tok += sum(len(run.train_ex[i].ids) for i in mb)
    return loss_sum, n_tok


def train_step(run: Run, step: int, micro: list[list[int]]) -> dict[str, Any]:
    """Optimiser step `step` (0-based) on the micro-batches `micro` (example indices): the loss is the summed
    CE over all supervised tokens of the step / their count, on every rank. Returns the step's metrics."""
    cfg, spe = run.cfg, run.spe
    t0 = time.perf_counter()
    lr = cfg.effective_lr * lr_factor(step, spe, cfg.epochs, cfg.warmup_epochs)
    for g in run.opt.param_groups:
        g["lr"] = lr
    n_sup = sum(run.train_ex[i].n_supervised for mb in micro for i in mb)
    loss_sum, n_tok = _accumulate(run, micro, n_sup)
    flat, stats = reduce_gradients(run.params, loss_sum, n_tok, run.topo)
    step_loss = float(stats[0]) / n_sup
    grad_norm = float(torch.linalg.vector_norm(flat))
    if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
        good = run.out / CHECKPOINT
        where = (
            f"the last good checkpoint {good} is kept (resume with --resume {run.out})"
            if good.is_file()
            else "no checkpoint was written"
        )
        raise TrainingError(
            f"non-finite loss ({step_loss}) or gradient norm ({grad_norm}) at step "
            f"{step + 1}; stopping, {where}. Try a lower --lr/--blr or --dtype fp32"
        )
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    return {
        "step": step + 1,
        "epoch": round((step + 1) / spe, 4),
        "loss": step_loss,
        "lr": lr,
        "tokens_per_s": float(stats[1]) / dt,
        "grad_norm": grad_norm,
        "step_time_s": dt,
    }


def evaluate(run: Run) -> float | None:
    """Token-level mean CE over the validation examples (all ranks together); None without any."""
    val_ex, mbs = run.val_ex, run.cfg.micro_batch
    if not val_ex:
        return None
    tot = torch.zeros(2, dtype=torch.float64)
    order = sorted(range(len(val_ex)), key=lambda i: -len(val_ex[i].ids))
    micro = [order[i : i + mbs] for i in range(0, len(order), mbs)]
    with torch.no_grad():
        for mb in micro[run.topo.rank :: run.topo.world]:
            loss, n = batch_loss(run.model, run.name, collate([val_ex[i] for i in mb], run.pad_id), run.cfg.loss_chunk)
            tot += torch.tensor([float(loss), n], dtype=torch.float64)
    tot = all_reduce_sum(tot, run.device, run.topo)
    return float(tot[0] / tot[1])


def checkpoint(run: Run, step: int) -> None:
    """checkpoint.pt after `step` steps (rank 0 writes it; every rank waits for it)."""
    if run.topo.main:
        save_checkpoint(
            run.out / CHECKPOINT,
            step=step,
            n_train=len(run.train_ex),
            config=run.cfg.to_dict(),
            adapter=run.adapter,
            optimizer=run.opt,
            metrics=run.metrics,
        )
    barrier(run.topo)


# ---- the loop --------------------------------------------------------------------------------------------
def _record(run: Run, m: dict[str, Any], mfile: IO[str] | None, bar: Progress | None) -> None:
    run.metrics.append(m)
    if mfile is not None:
        mfile.write(json.dumps(m) + "\n")
        mfile.flush()
    if bar is not None:
        bar.update(
            1,
            epoch=f"{m['step'] / run.spe:.2f}",
            loss=f"{m['loss']:.4f}",
            lr=f"{m['lr']:.2e}",
            tok_s=f"{m['tokens_per_s']:.0f}",
        )


def run_loop(run: Run, mfile: IO[str] | None, bar: Progress | None) -> tuple[float | None, float | None]:
    """Steps `run.start` .. `run.run_steps` (validation at each epoch's end and the last step, periodic
    checkpoints), then the final checkpoint. Returns (the last train loss, the last val loss)."""
    cfg, spe = run.cfg, run.spe
    lengths = [len(e.ids) for e in run.train_ex]
    plan: list[list[list[int]]] = []
    plan_epoch = -1
    # resumed at the end (nothing left to run): the last loss is the checkpoint's, not None in the metadata
    last_loss: float | None = next((m["loss"] for m in reversed(run.metrics) if "loss" in m), None)
    last_val: float | None = next((m["val_loss"] for m in reversed(run.metrics) if "val_loss" in m), None)
    for step in range(run.start, run.run_steps):
        epoch = step // spe
        if epoch != plan_epoch:
            plan, plan_epoch = epoch_plan(lengths, cfg.batch_size, cfg.micro_batch, cfg.seed, epoch), epoch
        m = train_step(run, step, plan[step % spe])
        last_loss = m["loss"]
        if (step + 1) % spe == 0 or step + 1 == run.run_steps:
            last_val = evaluate(run)
            if last_val is not None:
                m["val_loss"] = last_val
                run.log(f"epoch {(step + 1) / spe:.2f}: val loss {last_val:.4f}")
        _record(run, m, mfile, bar)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < run.run_steps:
            checkpoint(run, step + 1)
    checkpoint(run, run.run_steps)
    return last_loss, last_val


def _progress_bar(run: Run) -> Progress | None:
    """A bar on a terminal, periodic lines in a log (`llama_adapter.progress`); rank 0 only."""
    if not (run.topo.main and run.cfg.progress):
        return None
    return Progress(run.run_steps, "finetune", unit="step", initial=run.start)


def _save_outputs(run: Run, adapter_path: Path, last_loss: float | None, train_time: float) -> None:
    from llama_adapter.adapter_file import save_adapter
    from llama_adapter.quantize import base_weights

    meta = run.adapter.meta
    meta["template"] = run.template
    meta["base_weights"] = base_weights(run.model)  # what it was trained on; the file loads on any of them
    meta.pop("chat_template_digest", None)
    if run.template == CHAT:  # inference can tell whether the base's template is still the one trained with
        assert run.model.chat_template is not None  # run_template refuses a base without one
        meta["chat_template_digest"] = run.model.chat_template.digest
    save_adapter(
        run.model,
        run.name,
        adapter_path,
        extra={"trained_steps": str(run.run_steps), "train_loss": f"{last_loss}" if last_loss is not None else ""},
    )
    plot_losses(run.metrics, run.out / "loss.png")
    run.log(f"saved {adapter_path} ({run.n_trainable:,} trainable parameters, {train_time:.1f}s)")


def train(
    cfg: TrainConfig,
    *,
    model: Transformer | None = None,
    records: list[dict] | None = None,
    val_records: list[dict] | None = None,
) -> TrainResult:
    """Train adapter `cfg.adapter_name` ("default") and write it to `cfg.out/adapter.safetensors`."""
    run = prepare(cfg, model, records, val_records)
    if cfg.compile:
        for layer in run.model.layers:
            layer.compile(dynamic=True)
    if run.topo.main:
        write_run_files(run)
    mfile = open(run.out / "metrics.jsonl", "a") if run.topo.main else None  # noqa: SIM115
    bar = _progress_bar(run)
    t_train = time.perf_counter()
    run.model.train()
    backend_of(run.model).prepare_training()
    try:
        last_loss, last_val = run_loop(run, mfile, bar)
    finally:
        if bar is not None:
            bar.close()
        if mfile is not None:
            mfile.close()
        run.model.eval()
    train_time = time.perf_counter() - t_train
    adapter_path = run.out / "adapter.safetensors"
    if run.topo.main:
        _save_outputs(run, adapter_path, last_loss, train_time)
    barrier(run.topo)
    return TrainResult(
        adapter_path=adapter_path,
        out_dir=run.out,
        metrics=run.metrics,
        train_time_s=train_time,
        n_trainable=run.n_trainable,
        final_train_loss=last_loss,
        val_loss=last_val,
        steps=run.run_steps,
        total_steps=run.total_steps,
        n_train=len(run.train_ex),
        n_val=len(run.val_ex),
        n_truncated=run.n_truncated,
        n_skipped=run.n_skipped,
        adapter_name=run.name,
    )
