"""Hostile traffic and operations of the server (issue 14): body limits, work off the event loop, image checks,
400s instead of 500s, /health and /metrics, the access log, the 429 text, `serve`'s port check, and the
small defects of loading and training."""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
import time
import zlib

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

import llama_adapter as la
from llama_adapter.inference.decoder import DecodeRequest
from llama_adapter.serving.app import create_app
from llama_adapter.serving.engine import Engine, QueueFull
from tests.test_server import _Running

KEY = "k"
H = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model(tiny_base, device):
    m = la.load_model(tiny_base, dtype=torch.float32, device=device)
    m.add_adapter("text", la.AdapterConfig(prompt_length=2, layers=1))
    return m


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, api_key=KEY, max_body_mb=1)) as c:
        yield c


def _png_header(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h (no real pixel data: only the header is ever read)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _chat_with_image(model_name: str, png: bytes) -> dict:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    parts = [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": model_name, "messages": [{"role": "user", "content": parts}], "max_tokens": 1}


# ---- 3: body limit, nothing heavy on the event loop ------------------------------------------------------------
def test_over_limit_body_is_413(client):
    r = client.post("/v1/completions", content=b'{"prompt": "' + b"a" * (1024 * 1024 + 10) + b'"}', headers=H)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_health_answers_while_a_big_prompt_is_encoded(model, monkeypatch):
    tok = model.tokenizer
    real = tok.encode

    def slow(text, *a, **k):  # a tokenizer taking seconds on a huge prompt, made deterministic
        if len(text) > 100_000:
            time.sleep(3)
        return real(text, *a, **k)

    monkeypatch.setattr(tok, "encode", slow)
    srv = _Running(create_app(model, api_key=KEY))
    try:
        big = {"model": "base", "prompt": "word " * 100_000, "max_tokens": 1}
        t = threading.Thread(target=lambda: httpx.post(srv.url + "/v1/completions", json=big, headers=H, timeout=60))
        t.start()
        time.sleep(0.8)  # the big request is being tokenised now
        t0 = time.monotonic()
        assert httpx.get(srv.url + "/health", timeout=10).json()["status"] == "ok"
        assert time.monotonic() - t0 < 1.5
        t.join(timeout=60)
    finally:
        srv.stop()


# ---- 4/5: images checked before decoding, hostile JSON --------------------------------------------------------
def test_images_for_text_model_and_bombs_are_400(client, model, monkeypatch):
    from PIL import Image

    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    small = io.BytesIO()
    Image.new("RGB", (4, 4)).save(small, format="PNG")
    r = client.post("/v1/chat/completions", json=_chat_with_image("text", small.getvalue()), headers=H)
    assert r.status_code == 400 and "does not take images" in r.json()["error"]["message"] and not opened
    # a multi-modal adapter: the header is read, the 13000x13000 claim refused before any pixel is decoded
    a = model.add_adapter("mm", la.AdapterConfig(prompt_length=2, layers=1))
    a.visual_proj = torch.nn.Linear(4, model.config.dim)
    try:
        r = client.post("/v1/chat/completions", json=_chat_with_image("mm", _png_header(13000, 13000)), headers=H)
        assert r.status_code == 400 and "13000x13000" in r.json()["error"]["message"]
    finally:
        model.remove_adapter("mm")


def test_deep_json_and_lone_surrogates_are_400(client):
    deep = b'{"model": "base", "prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    r = client.post("/v1/completions", content=deep, headers=H)
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"]
    for body in (
        b'{"model": "base", "prompt": "a\\ud800b", "max_tokens": 1}',
        b'{"model": "base", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 1}',
    ):
        path = "/v1/completions" if b"prompt" in body else "/v1/chat/completions"
        r = client.post(path, content=body, headers=H)
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]


# ---- 8: /health, 429 text --------------------------------------------------------------------------------------
def test_health_tells_no_adapter_names(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["adapters"] == 1 and "text" not in json.dumps(h)


def test_queue_full_counts_only_waiting_requests(model):
    e = Engine(model, max_batch_size=2, max_queue=4)  # not started: everything stays pending
    e.submit([DecodeRequest([1, 2]) for _ in range(6)], lambda ev: None)  # 2 take the free slots, 4 wait
    with pytest.raises(QueueFull, match=r"^4 requests waiting \(limit 4\)"):
        e.submit([DecodeRequest([1, 2])], lambda ev: None)


# ---- operations: /metrics, access log --------------------------------------------------------------------------
def test_metrics_and_access_log(client, caplog):
    with caplog.at_level(logging.INFO, logger="llama_adapter.access"):
        r = client.post("/v1/completions", json={"model": "text", "prompt": "hi", "max_tokens": 3}, headers=H)
    assert r.status_code == 200
    line = [r.getMessage() for r in caplog.records if r.name == "llama_adapter.access"][-1]
    assert 'adapter="text"' in line and "status=200" in line and "completion_tokens=" in line
    m = client.get("/metrics").text
    assert 'llama_adapter_requests_total{adapter="text",status="200"}' in m
    assert 'llama_adapter_generated_tokens_total{adapter="text"}' in m
    for name in ("queue_depth", "running_batch_size", "adapters_resident", "adapter_loads_total"):
        assert "llama_adapter_" + name in m
    assert "llama_adapter_time_to_first_token_seconds_count 1.0" in m or "time_to_first_token_seconds_count" in m


def test_access_log_json(model, caplog):
    with TestClient(create_app(model, log_format="json")) as c, caplog.at_level(logging.INFO, "llama_adapter.access"):
        c.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
    rec = json.loads([r.getMessage() for r in caplog.records if r.name == "llama_adapter.access"][-1])
    assert rec["adapter"] == "nope" and rec["status"] == 404 and rec["latency_ms"] >= 0


# ---- operations: serve's port check ----------------------------------------------------------------------------
def test_serve_fails_fast_on_a_taken_port(capsys):
    from llama_adapter.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc = main(["serve", "--base", "builtin", "--port", str(port)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "already in use" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("port", ["99999", "0", "abc"])
def test_serve_refuses_what_is_not_a_port_in_one_line(port, capsys):
    from llama_adapter.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--base", "builtin", "--port", port])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith("llama-adapter serve: error: argument --port: ")
    assert ("1-65535" in err) if port != "abc" else "'abc' is not a port number" in err


# ---- 8: loading and training ---------------------------------------------------------------------------------
def test_unsafe_pickle_is_one_line():
    from llama_adapter.loading import load_error_line

    class Evil:
        def __reduce__(self):
            return (print, ("x",))

    buf = io.BytesIO()
    torch.save({"a": Evil()}, buf)
    buf.seek(0)
    with pytest.raises(Exception) as e:
        torch.load(buf, weights_only=True)
    line = load_error_line(e.value)
    assert "\n" not in line and "unsafe pickle" in line


def test_deeply_nested_training_data_is_a_data_error(tmp_path):
    from llama_adapter.errors import DataError
    from llama_adapter.training.data import load_records

    p = tmp_path / "d.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested"):
        load_records(p)
