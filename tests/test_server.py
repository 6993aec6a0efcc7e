"""The OpenAI-compatible server, run for real by uvicorn on loopback and driven by the official client."""

from __future__ import annotations

import asyncio
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
from llama_adapter.inference.decoder import DecodeRequest, Event
from llama_adapter.inference.generate import generate
from llama_adapter.inference.sampling import SamplingParams
from llama_adapter.serving import app as app_module
from llama_adapter.serving.app import create_app
from llama_adapter.serving.protocol import (
    APIError,
    StreamOptions,
    parse_adapter_request,
    parse_body,
    parse_chat_request,
    parse_completion_request,
    parse_messages,
    parse_prompts,
    parse_sampling,
    parse_stream_options,
)
from llama_adapter.serving.responses import Reply, chunk, sse, sse_events, usage, usage_chunk
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
def model(tiny_base, tmp_path_factory, device):
    m = la.load_model(tiny_base, dtype=torch.float32, device=device)
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
    prompt = format_prompt("alpaca", "Tell me about alpacas.")
    ref = generate(model, [prompt], adapter="alpaca", max_new_tokens=12, temperature=0.0, strip_separator=True)[0]
    assert r.choices[0].message.content == ref  # without the space after "### Response:"
    chunks = list(
        c.chat.completions.create(
            model="alpaca",
            messages=msgs,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == ref
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1
    s = c.completions.create(model="math", prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True)
    assert (
        "".join(ch.choices[0].text for ch in s)
        == generate(model, [PROMPTS[1]], adapter="math", max_new_tokens=8, temperature=0.0)[0]
    )


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

    server.app.state.server.engine.peak_batch = 0
    with ThreadPoolExecutor(6) as ex:
        got = list(ex.map(one, range(6)))
    assert got == ref
    assert server.app.state.server.engine.peak_batch > 1  # decoded together, not one after another


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
    for bad in (
        dict(max_tokens=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(temperature="hot"),
        dict(max_tokens="3"),
        dict(stop=5),
        dict(n=0),
        dict(prompt="word " * 400),
        dict(prompt={"a": 1}),
        dict(prompt=[10**9]),
    ):
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
        c.chat.completions.create(
            model="math",
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}
            ],
        )
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
    kw = dict(prompt=PROMPTS[0], max_tokens=8, temperature=0)
    out = c.completions.create(model="extra", **kw).choices[0].text
    base = c.completions.create(model="base", **kw).choices[0].text
    assert out != base  # the loaded adapter (non-zero gates) is really used
    assert out == generate(model, [PROMPTS[0]], adapter="extra", max_new_tokens=8, temperature=0.0)[0]
    r = httpx.post(server.url + "/v1/adapters", json={"name": "extra", "path": str(model.extra_path)}, headers=h)
    assert r.status_code == 409
    r = httpx.post(server.url + "/v1/adapters", json={"name": "x2", "path": "/nonexistent.safetensors"}, headers=h)
    assert r.status_code == 400
    assert httpx.delete(server.url + "/v1/adapters/extra", headers=h).status_code == 200
    assert "extra" not in [m.id for m in c.models.list()] and "extra" not in model.adapters
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="extra", prompt="hi", max_tokens=2)
    assert httpx.delete(server.url + "/v1/adapters/extra", headers=h).status_code == 404
    # without an API key the server refuses to change adapters
    r = httpx.post(small.url + "/v1/adapters", json={"name": "e", "path": str(model.extra_path)})
    assert r.status_code == 403


def test_queue_full_and_disconnect_frees_slot(small):
    c = _client(small)
    body = {
        "model": "base",
        "prompt": "the quick",
        "max_tokens": 100,
        "temperature": 0,
        "stream": True,
        "stop": ["\x00never"],
    }
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
    r = c.completions.create(model="base", prompt="hi", max_tokens=2, temperature=0)
    assert r.choices[0].text == generate(small.app.state.server.model, ["hi"], temperature=0.0, max_new_tokens=2)[0]
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(small.app.state.server.model.tokenizer.encode("hi", bos=True))
    assert 1 <= r.usage.completion_tokens <= 2
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


# ---- the protocol and response modules, called directly --------------------------------------------------------
def _seq(prompt: list[int], out: list[int], tag: int = 0, finish: str | None = None) -> DecodeRequest:
    s = DecodeRequest(prompt, None, SamplingParams(), tag=tag)
    s.out_ids, s.finish_reason = out, finish
    return s


def test_one_chunk_builder_for_completions_and_chat():
    cmpl = Reply("cmpl-1", "completion", 123, "math")
    assert chunk(cmpl, 2, "ab", "stop") == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 123,
        "model": "math",
        "choices": [{"index": 2, "text": "ab", "logprobs": None, "finish_reason": "stop"}],
    }
    chat = Reply("chatcmpl-1", "chat", 123, "alpaca")
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 123, "model": "alpaca"}
    assert chunk(chat, 0, "ab", None) == {
        **head,
        "choices": [{"index": 0, "delta": {"content": "ab"}, "logprobs": None, "finish_reason": None}],
    }
    assert chunk(chat, 0, "", "length")["choices"][0]["delta"] == {}
    assert chunk(chat, 0, "", None, role="assistant")["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    seqs = [_seq([1, 2, 3], [4]), _seq([5], [6, 7], tag=1)]
    assert usage(seqs) == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert usage_chunk(cmpl, seqs) == {**chunk(cmpl, 0, "", None), "choices": [], "usage": usage(seqs)}
    assert sse({"a": 1}) == 'data: {"a": 1}\n\n'
    assert Reply.new("chat", "m").id.startswith("chatcmpl-") and Reply.new("completion", "m").id.startswith("cmpl-")


def _drain(reply: Reply, events: list[Event], seqs: list[DecodeRequest], include_usage: bool) -> list[str]:
    async def run() -> list[str]:
        q: asyncio.Queue[Event] = asyncio.Queue()
        for ev in events:
            q.put_nowait(ev)
        return [line async for line in sse_events(reply, q, seqs, include_usage)]

    return asyncio.run(run())


def test_sse_events():
    reply = Reply("chatcmpl-1", "chat", 1, "m")
    s = _seq([1], [])
    events = [Event(s, "he", False), Event(s, "", False), Event(s, "llo", False)]
    s2 = _seq([1], [2, 3], finish="stop")
    lines = _drain(reply, [*events, Event(s2, "", True)], [s2], include_usage=True)
    assert all(line.startswith("data: ") and line.endswith("\n\n") for line in lines)
    assert lines[-1] == "data: [DONE]\n\n"
    bodies = [json.loads(line[6:]) for line in lines[:-1]]
    assert bodies[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [b["choices"][0]["delta"].get("content") for b in bodies[1:3]] == ["he", "llo"]  # no empty delta
    assert bodies[3]["choices"][0]["finish_reason"] == "stop"
    assert bodies[4]["choices"] == [] and bodies[4]["usage"]["completion_tokens"] == 2
    failed = _seq([1], [], finish="error")
    failed.error = "no adapter named 'x'"
    lines = _drain(Reply("cmpl-1", "completion", 1, "m"), [Event(failed, "", True)], [failed], include_usage=True)
    assert len(lines) == 2 and json.loads(lines[0][6:])["error"]["code"] == "model_not_found"
    assert lines[1] == "data: [DONE]\n\n"  # a failed stream ends as every stream does


def _rejects(fn, *args) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*args)
    assert e.value.status == 400
    return e.value


def test_parse_sampling():
    p = parse_sampling({}, default_max=16)
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.stop, p.seed) == (16, 0.1, 0.75, 0, (), None)
    p = parse_sampling({"max_completion_tokens": 5, "temperature": 0, "top_k": 3, "stop": ["x", ""], "seed": 1}, 16)
    assert (p.max_new_tokens, p.temperature, p.top_k, p.stop, p.seed) == (5, 0.0, 3, ("x",), 1)
    assert parse_sampling({"max_tokens": 7, "max_completion_tokens": 5, "stop": "y"}, 16).max_new_tokens == 7
    for bad in (0, 1.5, "0.5", True):
        err = _rejects(parse_sampling, {"top_p": bad}, 16)
        assert err.param == "top_p" and err.type == "invalid_request_error"
    err = _rejects(parse_sampling, {"top_p": 0}, 16)
    assert err.message == "'top_p' must be in (0, 1]"
    assert _rejects(parse_sampling, {"temperature": "hot"}, 16).message == "'temperature' must be a number, got \"hot\""
    for body, param in (
        ({"max_tokens": -1}, "max_tokens"),
        ({"top_k": -1}, "top_k"),
        ({"stop": 5}, "stop"),
        ({"n": 0}, "n"),
        ({"seed": 1.5}, "seed"),
        ({"temperature": -1}, "temperature"),
    ):
        assert _rejects(parse_sampling, body, 16).param == param


def test_parse_requests():
    assert parse_prompts({"prompt": "hi"}) == ["hi"]
    assert parse_prompts({"prompt": [1, 2]}) == [[1, 2]]
    assert parse_prompts({"prompt": ["a", [3]]}) == ["a", [3]]
    for bad in (None, [], {"a": 1}, [1.5]):
        assert _rejects(parse_prompts, {"prompt": bad}).param == "prompt"
    assert parse_stream_options({}) == StreamOptions(False, False)
    assert parse_stream_options({"stream": True, "stream_options": {"include_usage": 1}}) == StreamOptions(True, True)
    assert _rejects(parse_stream_options, {"stream": "yes"}).param == "stream"
    req = parse_completion_request({"model": "m", "prompt": "hi"})
    assert (req.model, req.prompts, req.sampling.max_new_tokens) == ("m", ["hi"], 16)
    assert _rejects(parse_completion_request, {"model": 3, "prompt": "hi"}).param == "model"
    msgs = [
        {"role": "developer", "content": "be brief"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    assert parse_messages({"messages": msgs}) == ([("system", "be brief"), ("assistant", ""), ("user", "a\nb")], [])
    chat = parse_chat_request({"model": "m", "messages": msgs[2:]})
    assert (chat.messages, chat.images, chat.sampling.max_new_tokens) == ([("user", "a\nb")], [], 256)
    for bad in (
        "hi",
        [],
        [{"role": "assistant", "content": "x"}],
        [{"role": "robot", "content": "x"}],
        [{"role": "user", "content": [{"type": "audio"}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
    ):
        assert _rejects(parse_messages, {"messages": bad}).param == "messages"
    assert parse_body(b'{"a": 1}') == {"a": 1}
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b"null"):
        assert _rejects(parse_body, raw).param is None
    assert parse_adapter_request({"path": "/x/extra.safetensors"}, "base") == ("extra", "/x/extra.safetensors")
    for body, param in (
        ({"name": "a"}, "path"),
        ({"path": "/x/base.safetensors"}, "name"),
        ({"name": "a.b", "path": "p"}, "name"),
    ):
        assert _rejects(parse_adapter_request, body, "base").param == param


def test_routes_are_plain_functions(server):
    from types import SimpleNamespace

    request = SimpleNamespace(app=server.app, headers={"authorization": f"Bearer {KEY}"})
    h = asyncio.run(app_module.health(request))
    assert h["status"] == "ok" and h["adapters"] == len(server.app.state.server.model.adapters)
    models = asyncio.run(app_module.list_models(request))
    assert [m["id"] for m in models["data"]][:3] == ["base", "alpaca", "math"]
    assert models["data"][1]["template"] == "alpaca" and models["data"][0]["parent"] is None
    with pytest.raises(APIError) as e:
        asyncio.run(app_module.list_models(SimpleNamespace(app=server.app, headers={})))
    assert e.value.status == 401 and e.value.code == "invalid_api_key"


# ---- an instruct base: its own chat template, multi-turn, system messages, and adapters by the one rule ----------
FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def instruct_server(tiny_instruct, tmp_path_factory):
    m = la.load_model(tiny_instruct, dtype=torch.float32)
    d = tmp_path_factory.mktemp("instruct_adapters")
    for name, meta in (("alp", {"template": "alpaca"}), ("zero", {}), ("chatty", {"template": "chat"})):
        a = m.add_adapter(name, la.AdapterConfig(prompt_length=4, layers=2))  # zero-init: the base's answers
        a.meta.update(meta)
        la.save_adapter(m, name, d / f"{name}.safetensors")
    r = _Running(create_app(m, max_batch_size=4, max_context=128))
    r.model, r.app = m, r.server.config.app
    yield r
    r.stop()


def test_instruct_base_answers_in_its_chat_template(instruct_server):
    c = openai.OpenAI(base_url=instruct_server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    r = c.chat.completions.create(model="base", messages=[{"role": "user", "content": FRANCE}])
    assert r.choices[0].message.content == "Paris" and r.choices[0].finish_reason == "stop"
    m = instruct_server.model
    assert r.usage.completion_tokens == len(m.tokenizer.encode("Paris"))  # then <|im_end|> ended the turn ("stop")
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": FRANCE},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "What is the capital of Italy?"},
    ]
    chunks = list(c.chat.completions.create(model="base", messages=msgs, stream=True, temperature=0))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "Rome"
    for name in ("zero", "chatty"):  # no recorded template, or "chat": the base's chat template
        r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": FRANCE}], temperature=0)
        assert r.choices[0].message.content == "Paris"
    # an adapter trained with alpaca gets alpaca, whatever the base's own template
    alp = instruct_server.app.state.server.render_chat("alp", [("user", FRANCE)])
    assert alp.template == "alpaca" and alp.bos and alp.text.endswith("### Response:")
    # a completion is the raw text: the chat template is not applied
    p = "<|im_start|>user\n" + FRANCE + "<|im_end|>\n<|im_start|>assistant\n"
    assert c.completions.create(model="base", prompt=p, max_tokens=8, temperature=0).choices[0].text == "Paris"
    models = {m["id"]: m for m in httpx.get(instruct_server.url + "/v1/models").json()["data"]}
    assert {k: v["template"] for k, v in models.items()} == {
        "base": "chat",
        "alp": "alpaca",
        "zero": "chat",
        "chatty": "chat",
    }


def test_chat_template_refusal_is_a_400(instruct_server):
    """A conversation the base's template refuses (raise_exception) is the client's error, in one line."""
    from llama_adapter.chat_template import ChatTemplate

    m = instruct_server.model
    saved = m.chat_template
    m.chat_template = ChatTemplate("{{ raise_exception('Conversation roles must alternate') }}")
    try:
        r = httpx.post(
            instruct_server.url + "/v1/chat/completions",
            json={"model": "base", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 400 and "roles must alternate" in r.json()["error"]["message"]
    finally:
        m.chat_template = saved
