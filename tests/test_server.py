"""The OpenAI-compatible server, run for real by uvicorn on loopback and driven by the official client."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn

import llama_adapter as la
from llama_adapter.inference.generate import generate
from llama_adapter.serving.app import create_app
from llama_adapter.templates import format_prompt

KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Running:
    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def model(tiny_base, tmp_path_factory):
    m = la.load_model(tiny_base, dtype=torch.float32)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("adapters")
    for name, k, layers, tmpl in (("alpaca", 4, 3, "alpaca"), ("math", 6, 2, None), ("extra", 5, 4, None)):
        a = m.add_adapter(name, la.AdapterConfig(prompt_length=k, layers=layers))
        with torch.no_grad():
            a.gates.normal_(0, 2.0)
            a.prompts.mul_(0.5)
        if tmpl:
            a.meta["template"] = tmpl
        la.save_adapter(m, name, d / f"{name}.safetensors")
    m.remove_adapter("extra")
    m.extra_path = d / "extra.safetensors"
    return m


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model, api_key=KEY, max_batch_size=8, max_queue=16, max_context=128)
    r = _Running(app)
    r.app = app
    yield r
    r.stop()


@pytest.fixture(scope="module")
def small(model):
    """One slot, no queue, no API key: for 429, disconnects and the admin lock."""
    app = create_app(model, max_batch_size=1, max_queue=0, max_context=128)
    r = _Running(app)
    r.app = app
    yield r
    r.stop()


def _client(server, key=KEY):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


PROMPTS = ["Tell me about alpacas.", "the quick brown fox", "1 + 2 =", "The answer is", "### Input:", "jumps"]


def test_models_and_health(server):
    ids = [m.id for m in _client(server).models.list()]
    assert ids == ["base", "alpaca", "math"]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok"


def test_completion_matches_offline(server, model):
    c = _client(server)
    for name, adapter in (("math", "math"), ("base", None)):
        r = c.completions.create(model=name, prompt=PROMPTS[0], max_tokens=10, temperature=0)
        ref = generate(model, [PROMPTS[0]], adapter=adapter, max_new_tokens=10, temperature=0.0)[0]
        assert r.choices[0].text == ref
        assert r.usage.completion_tokens <= 10 and r.choices[0].finish_reason in ("stop", "length")


def test_chat_applies_template_and_streams(server, model):
    c = _client(server)
    msgs = [{"role": "user", "content": "Tell me about alpacas."}]
    r = c.chat.completions.create(model="alpaca", messages=msgs, max_tokens=12, temperature=0)
    ref = generate(model, [format_prompt("alpaca", "Tell me about alpacas.")], adapter="alpaca",
                   max_new_tokens=12, temperature=0.0)[0]
    assert r.choices[0].message.content == ref
    chunks = list(c.chat.completions.create(model="alpaca", messages=msgs, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == ref
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1
    s = c.completions.create(model="math", prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in s) == generate(model, [PROMPTS[1]], adapter="math",
                                                               max_new_tokens=8, temperature=0.0)[0]


def test_concurrent_mixed_adapters_batched(server, model):
    c = _client(server)
    names = ["alpaca", "math", "base", "math", "alpaca", "base"]
    adapters = [None if n == "base" else n for n in names]
    ref = generate(model, PROMPTS, adapter=adapters, max_new_tokens=24, temperature=0.0)

    def one(i):
        if i % 2:
            s = c.completions.create(model=names[i], prompt=PROMPTS[i], max_tokens=24, temperature=0, stream=True)
            return "".join(ch.choices[0].text for ch in s)
        return c.completions.create(model=names[i], prompt=PROMPTS[i], max_tokens=24, temperature=0).choices[0].text

    server.app.state.server.scheduler.peak_batch = 0
    with ThreadPoolExecutor(6) as ex:
        got = list(ex.map(one, range(6)))
    assert got == ref
    assert server.app.state.server.scheduler.peak_batch > 1  # decoded together, not one after another


def test_seeded_sampling_reproducible(server):
    c = _client(server)
    kw = dict(model="math", prompt=PROMPTS[2], max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    assert c.completions.create(**kw).choices[0].text == c.completions.create(**kw).choices[0].text
    # extreme but valid values do not hurt the batch
    r = c.completions.create(model="math", prompt="hi", max_tokens=3, seed=-(2**70), extra_body={"top_k": 10**20})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_errors(server):
    c = _client(server)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="hi", max_tokens=2)
    for bad in (dict(max_tokens=-1), dict(top_p=0.0), dict(top_p=1.5), dict(temperature="hot"),
                dict(max_tokens="3"), dict(stop=5), dict(n=2), dict(prompt="word " * 400), dict(prompt={"a": 1}),
                dict(prompt=[10**9])):
        kw = dict(model="math", prompt="hi", max_tokens=2)
        kw.update(bad)
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(**kw)
        assert e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="math", messages=[{"role": "assistant", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="math", messages="hi")
    with pytest.raises(openai.BadRequestError):  # images need a multi-modal adapter
        c.chat.completions.create(model="math", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    with pytest.raises(openai.AuthenticationError):
        _client(server, key="wrong").models.list()
    h = {"Authorization": f"Bearer {KEY}"}
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b"null"):
        r = httpx.post(server.url + "/v1/completions", content=raw, headers=h)
        assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "math", "messages": []})
    assert r.status_code == 401
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # still alive


def test_adapters_added_and_removed_at_run_time(server, small, model):
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/v1/adapters", json={"name": "extra", "path": str(model.extra_path)}, headers=h)
    assert r.status_code == 201, r.text
    c = _client(server)
    assert "extra" in [m.id for m in c.models.list()]
    out = c.completions.create(model="extra", prompt="hi", max_tokens=4, temperature=0).choices[0].text
    assert isinstance(out, str)
    r = httpx.post(server.url + "/v1/adapters", json={"name": "extra", "path": str(model.extra_path)}, headers=h)
    assert r.status_code == 409
    r = httpx.post(server.url + "/v1/adapters", json={"name": "x2", "path": "/nonexistent.safetensors"}, headers=h)
    assert r.status_code == 400
    assert httpx.delete(server.url + "/v1/adapters/extra", headers=h).status_code == 200
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="extra", prompt="hi", max_tokens=2)
    # without an API key the server refuses to change adapters
    r = httpx.post(small.url + "/v1/adapters", json={"name": "e", "path": str(model.extra_path)})
    assert r.status_code == 403


def test_queue_full_and_disconnect_frees_slot(small):
    c = _client(small)
    body = {"model": "base", "prompt": "the quick", "max_tokens": 100, "temperature": 0, "stream": True,
            "stop": ["\x00never"]}
    with httpx.Client(timeout=60) as hc, hc.stream("POST", small.url + "/v1/completions", json=body) as resp:
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert json.loads(first[5:])["choices"]
        with pytest.raises(openai.RateLimitError):  # one slot, busy; no queue
            c.completions.create(model="base", prompt="hi", max_tokens=2)
    # the client went away mid-stream: its slot is freed
    deadline = time.time() + 20
    while httpx.get(small.url + "/health").json()["running"]:
        assert time.time() < deadline, "slot not freed after disconnect"
        time.sleep(0.05)
    assert c.completions.create(model="base", prompt="hi", max_tokens=2, temperature=0).choices[0].text is not None
