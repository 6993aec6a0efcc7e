"""Zero-init attention beyond LLaMA: gated prompts in Hugging Face encoders (ViT, RoBERTa/BERT, both CLIP towers).

- `prompts`: K learnable prompts per adapted layer, attached to a `transformers` encoder's own attention modules by
  hooks; the equations are `llama_adapter.zero_init_attention`'s, so every model family shares one implementation.
- `heads`: the task models (image/text classification, extractive QA, CLIP classification by class-name text) and
  the four comparison methods (zero-init, rand-init, linear-probe, full).
- `data`: image folders / JSONL, text JSONL / CSV, SQuAD JSON; image preprocessing with PIL + numpy.
- `squad_metric`: SQuAD EM / F1 with the official normalisation, v2.0 no-answer handling.
- `adapter_io`: adapters as safetensors with JSON metadata, checked before use.
- `train`: fine-tuning and evaluation (metrics.jsonl, loss.png, progress).
- `miniature`: the paper in miniature: tiny encoders pre-trained here, downstream sets they were not trained for.

`transformers` is needed (the `encoders` extra); it is imported by the modules that build or adapt models.
"""
