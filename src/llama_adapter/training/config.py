"""The options of one fine-tuning run (`TrainConfig`), what a run returns (`TrainResult`), and the base dtypes.

Every `TrainConfig` field is a `llama-adapter finetune` flag (`--max-length` for `max_length`, ...): the CLI
builds its parser from these fields, and a run's `config.yaml` is `TrainConfig.to_dict()`, so it can be passed
back with `--config`. Kept apart from the training code so the CLI can read the options without importing it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llama_adapter.config import DTYPES
from llama_adapter.errors import TrainingError
from llama_adapter.zero_init_attention import ATTENTION_NAMES

ADAPTER_NAME = "default"


@dataclass
class TrainConfig:
    """Every field is a `llama-adapter finetune` flag (`--max-length` for max_length, ...)."""

    base: str = "builtin"  # base checkpoint: a directory (Hugging Face or Meta layout), a .gguf file, or "builtin"
    # training data files/directories: JSON lists or JSONL of Alpaca records or conversations (OpenAI `messages`,
    # ShareGPT `conversations`)
    data: list[str] = field(default_factory=list)
    out: str = "runs/adapter"  # output directory (adapter, config.yaml, metrics.jsonl, loss.png, checkpoint.pt)
    val_data: list[str] = field(default_factory=list)  # validation data files/directories
    val_fraction: float = 0.0  # hold out this fraction of the training records for validation (seeded)
    # How records become text. "auto": alpaca for Alpaca records, chat for conversations (data that mixes both must
    # choose). "chat": the base's own chat template (an Alpaca record is one user/assistant exchange; a base
    # without one is refused). An instruction template (alpaca, plain, or the path of a template .json): Alpaca
    # records as in the paper; a conversation turn by turn, each user turn an instruction (system text before the
    # first), each answer after its response marker and ending with EOS, as `prompting` lays out a chat.
    template: str = "auto"
    train_on: str = "all"  # assistant turns of a conversation that the loss covers: all, or only the last
    max_length: int = 512  # truncate BOS + prompt + output + EOS to this many tokens
    epochs: float = 5  # training epochs (fractional allowed)
    warmup_epochs: float = 2  # linear warm-up epochs before the half-cosine decay
    batch_size: int = 64  # effective batch per optimiser step (all processes together)
    micro_batch: int = 4  # rows per forward/backward (gradient accumulation up to batch_size)
    blr: float = 9e-3  # base learning rate: lr = blr * batch_size / 256
    lr: float | None = None  # overrides blr * batch_size / 256
    weight_decay: float = 0.02  # AdamW weight decay of the prompts (not of gates or 1-D parameters)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    prompt_length: int = 10  # adaption prompt length K
    layers: int | None = None  # top layers with adaption prompts L; None -> min(30, n_layers)
    gate: str = "tanh"  # gate function: tanh or linear
    attention: str = "zero-init"  # or "rand-init" (Table-5 baseline)
    dtype: str = "bf16"  # dtype of the frozen base (adapter and optimiser state are fp32)
    quantize: str | None = None  # int8 / int4: weight-only quantized frozen base (llama_adapter.quantize)
    seed: int = 0  # adapter init, data order and validation split
    save_every: int = 0  # write checkpoint.pt every N steps (0: only at the end)
    resume: str | None = None  # continue the run in this directory (or from this checkpoint.pt)
    overwrite: bool = False  # replace an earlier run in `out` (otherwise refused: use resume or another out)
    skip_invalid: bool = False  # skip invalid records (and report how many) instead of stopping
    max_steps: int | None = None  # stop after this many steps (the lr schedule is unchanged)
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    fsdp: bool = False  # shard the frozen base's blocks across processes (FSDP2)
    compile: bool = False  # torch.compile each transformer block
    image_encoder: str | None = None  # image encoder directory for multi-modal records
    image_root: str | None = None  # directory that record "image" / "audio" / "video" paths are relative to
    feature_cache: str | None = None  # directory to cache encoder features in (every modality)
    audio_encoder: str | None = None  # audio encoder directory (Whisper or CLAP) for records with "audio"
    video_frames: int = 8  # frames sampled uniformly from each video (through --image-encoder)
    video_pool: str = "mean"  # pooling of the frames' features over time: mean, or mean+max
    progress: bool = True  # show a progress bar
    adapter_name: str = ADAPTER_NAME  # name of the adapter inside the model while training
    loss_chunk: int | None = None  # supervised positions per logits chunk (None: the compute backend's)

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256

    def __post_init__(self) -> None:
        # one spelling in config.yaml and checkpoints, whichever the user wrote ("zero" or "zero-init")
        self.attention = ATTENTION_NAMES.get(self.attention, self.attention)

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
            (self.prompt_length >= 1, "--prompt-length must be >= 1"),
            (self.attention in ATTENTION_NAMES, "--attention must be zero-init or rand-init"),
            (self.gate in ("tanh", "linear"), "--gate must be tanh or linear"),
            (self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}"),
            (self.quantize in (None, "int8", "int4"), "--quantize must be int8 or int4"),
            (self.loss_chunk is None or self.loss_chunk >= 1, "--loss-chunk must be >= 1"),
            (self.train_on in ("all", "last"), "--train-on must be all or last"),
            (self.video_frames >= 1, "--video-frames must be >= 1"),
            (self.video_pool in ("mean", "mean+max"), "--video-pool must be mean or mean+max"),
        ]
        for ok, msg in checks:
            if not ok:
                raise TrainingError(msg)


@dataclass
class TrainResult:
    """What `train()` returns: where the adapter went, the per-step metrics, and the run's counts."""

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
