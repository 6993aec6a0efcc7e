"""Fine-tuning an adapter (`llama-adapter finetune`), one idea per module.

- `config`: `TrainConfig` (the options, one per CLI flag), `TrainResult`, `DTYPES`.
- `data`: records (Alpaca, OpenAI chat, ShareGPT; JSON/JSONL), validation split, tokenisation with the loss mask
  (responses, or assistant turns), the seeded batch plan, collation.
- `loss`: the response-only cross-entropy, logits a chunk at a time.
- `schedule`: the learning-rate schedule (warm-up, then half-cosine) and the step counts.
- `checkpointing`: `checkpoint.pt`, the resumable training state.
- `distributed`: torchrun processes: rank detection, the broadcast, the per-step all-reduce, FSDP2.
- `plot`: `loss.png`.
- `loop`: `train()`, composed of the stages above.

Nothing is imported here, so `from llama_adapter.training.config import TrainConfig` stays cheap.
"""
