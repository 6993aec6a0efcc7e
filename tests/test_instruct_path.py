"""The instruct-model path end to end: an instruct base with its own chat template, an adapter fine-tuned on chat
data (`messages` JSONL), then generation and the server, all in the base's template without any flag."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from fastapi.testclient import TestClient

import llama_adapter as la
from llama_adapter.inference.chat import chat
from llama_adapter.serving.app import create_app
from llama_adapter.training.config import TrainConfig
from llama_adapter.training.loop import train

CONVERSATIONS = [
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Madrid"},
    ],
    [
        {"role": "user", "content": "What is the capital of Spain?"},
        {"role": "assistant", "content": "Madrid"},
    ],
]


def test_chat_data_adapter_is_trained_and_served_in_the_bases_template(tiny_instruct: Path, tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    model = la.load_model(tiny_instruct, dtype=torch.float32)
    assert model.chat_template is not None
    cfg = TrainConfig(
        base=str(tiny_instruct),
        data=[str(data)],
        out=str(tmp_path / "run"),
        epochs=2,
        warmup_epochs=0,
        batch_size=2,
        micro_batch=2,
        layers=2,
        prompt_length=4,
        lr=5e-2,
        dtype="fp32",
        progress=False,
    )
    result = train(cfg, model=model)
    meta = la.read_adapter(result.adapter_path)[0]
    assert meta["template"] == "chat" and meta["chat_template_digest"] == model.chat_template.digest

    served = la.load_model(tiny_instruct, dtype=torch.float32)
    served.load_adapter(result.adapter_path, "capitals")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    offline = chat(served, question, adapter="capitals", temperature=0.0, max_new_tokens=8)
    base_answer = chat(served, question, temperature=0.0, max_new_tokens=8)
    assert base_answer == "Paris"  # the instruct base answers in its own template, no flag

    with TestClient(create_app(served)) as client:
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert models["capitals"]["template"] == "chat" and models["base"]["template"] == "chat"
        for name, expected in (("capitals", offline), ("base", base_answer)):
            r = client.post(
                "/v1/chat/completions", json={"model": name, "messages": question, "temperature": 0, "max_tokens": 8}
            )
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["message"]["content"] == expected and choice["finish_reason"] == "stop"
