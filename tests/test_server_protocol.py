"""The OpenAI protocol surface: pydantic request bodies and their 400s, logprobs, echo, n, best_of, streaming usage.

Log-probabilities are checked against a direct forward's `log_softmax`: they are the model's own, before any
temperature, top-p or top-k.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from test_server import _Running

import llama_adapter as la
from llama_adapter.inference.decoder import BatchDecoder, DecodeRequest
from llama_adapter.inference.sampling import SamplingParams
from llama_adapter.serving.app import create_app
from llama_adapter.serving.protocol import APIError, parse_chat_request, parse_completion_request

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def model(tiny_base, device):
    m = la.load_model(tiny_base, dtype=torch.float32, device=device)
    torch.manual_seed(0)
    a = m.add_adapter("math", la.AdapterConfig(prompt_length=6, layers=2))
    with torch.no_grad():
        a.gates.normal_(0, 2.0)
        a.prompts.mul_(0.5)
    return m


@pytest.fixture(scope="module")
def server(model):
    r = _Running(create_app(model, max_batch_size=8, max_queue=16, max_context=128))
    yield r
    r.stop()


def _post(server, path, **body):
    return httpx.post(server.url + path, json=body, timeout=60)


def _forward_logprobs(model, ids, adapter):
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=model.tok_embeddings.weight.device), adapter=adapter)
    return torch.log_softmax(logits[0].float(), -1).cpu()


def _greedy(model, ids, adapter, steps):
    ids = list(ids)
    for _ in range(steps):
        ids.append(int(_forward_logprobs(model, ids, adapter)[-1].argmax()))
    return ids


@pytest.mark.parametrize("name,adapter", [("base", None), ("math", "math")])
def test_completion_logprobs_are_the_forwards_log_softmax(server, model, name, adapter):
    tok = model.tokenizer
    prompt_ids = tok.encode(PROMPT, bos=True)
    r = _post(server, "/v1/completions", model=name, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3, echo=True)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    n_gen = len(lp["tokens"]) - len(prompt_ids)
    assert choice["text"].startswith(PROMPT) and 0 < n_gen <= 5
    ids = _greedy(model, prompt_ids, adapter, n_gen)
    ref = _forward_logprobs(model, ids, adapter)
    assert lp["tokens"] == [tok.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for pos in range(1, len(ids)):
        assert lp["token_logprobs"][pos] == pytest.approx(float(ref[pos - 1, ids[pos]]), abs=1e-4)
        top = lp["top_logprobs"][pos]
        values = list(top.values())
        assert values == sorted(values, reverse=True)
        best = ref[pos - 1].topk(3).values.tolist()  # tokens of the same text share one key of the dict
        assert values[0] == pytest.approx(best[0], abs=1e-4)
        allowed = [*best, lp["token_logprobs"][pos]]
        assert all(min(abs(v - x) for x in allowed) < 1e-4 for v in values)
        if pos >= len(prompt_ids):  # greedy: the chosen token is the most likely one
            assert lp["tokens"][pos] in top and values[0] == pytest.approx(lp["token_logprobs"][pos], abs=1e-6)
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)


def test_echo_with_zero_tokens_scores_the_prompt(server, model):
    """lm-eval's log-likelihood request: echo the prompt, generate nothing, return its tokens' logprobs."""
    ids = model.tokenizer.encode(PROMPT, bos=True)
    ref = _forward_logprobs(model, ids, None)
    for prompt in (PROMPT, ids):
        r = _post(server, "/v1/completions", model="base", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]["token_logprobs"]
        assert len(lp) == len(ids) and lp[0] is None
        assert lp[1:] == pytest.approx([float(ref[i - 1, ids[i]]) for i in range(1, len(ids))], abs=1e-4)
        assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 0
    assert choice["text"] == model.tokenizer.decode(ids)
    # echo alone returns the prompt's text and no logprobs
    r = _post(server, "/v1/completions", model="base", prompt=PROMPT, max_tokens=0, echo=True).json()
    assert r["choices"][0]["text"] == PROMPT and r["choices"][0]["logprobs"] is None


def test_openai_client_gets_echo_logprobs(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    r = c.completions.create(model="math", prompt=PROMPT, logprobs=2, echo=True, max_tokens=0)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and all(isinstance(x, float) for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == len(lp.text_offset) == len(lp.top_logprobs) and r.choices[0].text == PROMPT
    chat = c.chat.completions.create(
        model="math", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, logprobs=True
    )
    assert chat.choices[0].logprobs.content and chat.choices[0].logprobs.content[0].top_logprobs == []


def test_n_choices(server):
    body = dict(model="math", prompt=["hi", PROMPT], max_tokens=6)
    greedy = _post(server, "/v1/completions", n=3, temperature=0, **body).json()
    texts = [c["text"] for c in greedy["choices"]]
    assert [c["index"] for c in greedy["choices"]] == list(range(6))
    assert len(set(texts[:3])) == 1 and len(set(texts[3:])) == 1
    prompt_tokens = _post(server, "/v1/completions", temperature=0, **body).json()["usage"]["prompt_tokens"]
    assert greedy["usage"]["prompt_tokens"] == prompt_tokens  # each prompt counted once
    seeded = [
        [
            c["text"]
            for c in _post(server, "/v1/completions", n=3, temperature=1.0, top_p=1.0, seed=7, **body).json()["choices"]
        ]
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1] and len(set(seeded[0][:3])) > 1
    chat = _post(
        server,
        "/v1/chat/completions",
        model="base",
        messages=[{"role": "user", "content": "hi"}],
        n=2,
        temperature=0,
        max_completion_tokens=4,
    ).json()
    assert [c["index"] for c in chat["choices"]] == [0, 1]
    assert chat["choices"][0]["message"] == chat["choices"][1]["message"]


def test_best_of_returns_the_most_likely(server):
    body = dict(model="base", prompt=PROMPT, max_tokens=5, temperature=1.0, top_p=1.0, seed=3)
    all3 = _post(server, "/v1/completions", n=3, logprobs=0, **body).json()["choices"]
    best = _post(server, "/v1/completions", best_of=3, **body).json()
    scores = [sum(c["logprobs"]["token_logprobs"]) for c in all3]
    assert best["choices"][0]["text"] == all3[scores.index(max(scores))]["text"]
    assert best["choices"][0]["logprobs"] is None and len(best["choices"]) == 1


def test_chat_logprobs(server):
    r = _post(
        server,
        "/v1/chat/completions",
        model="math",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    ).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert 0 < len(content) <= 4
    for item in content:
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"} and len(item["top_logprobs"]) == 2
        assert item["top_logprobs"][0]["logprob"] == pytest.approx(item["logprob"], abs=1e-6)  # greedy
        assert item["top_logprobs"][0]["logprob"] >= item["top_logprobs"][1]["logprob"]
        assert item["bytes"] == list(item["token"].encode())


def _stream(server, path, **body):
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_streaming_with_logprobs_and_usage(server):
    body = dict(model="math", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1, echo=True)
    whole = _post(server, "/v1/completions", **body).json()
    chunks = _stream(server, "/v1/completions", stream=True, stream_options={"include_usage": True}, **body)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["choices"][0]["text"]
    lps = [x for c in chunks[:-1] if c["choices"][0]["logprobs"] for x in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert lps == whole["choices"][0]["logprobs"]["token_logprobs"]
    offsets = [
        x for c in chunks[:-1] if c["choices"][0]["logprobs"] for x in c["choices"][0]["logprobs"]["text_offset"]
    ]
    assert offsets == whole["choices"][0]["logprobs"]["text_offset"]
    chat = _stream(
        server,
        "/v1/chat/completions",
        model="base",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        n=2,
        temperature=0,
        logprobs=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert chat[-1]["choices"] == [] and chat[-1]["usage"]["completion_tokens"] > 0
    for i in (0, 1):
        items = [
            x
            for c in chat[:-1]
            if c["choices"][0]["index"] == i and c["choices"][0]["logprobs"]
            for x in c["choices"][0]["logprobs"]["content"]
        ]
        assert len(items) == chat[-1]["usage"]["completion_tokens"] // 2


@pytest.mark.parametrize(
    "path,extra,param",
    [
        ("/v1/completions", {"logprobs": 50}, "logprobs"),
        ("/v1/completions", {"logprobs": "2"}, "logprobs"),
        ("/v1/completions", {"n": 0}, "n"),
        ("/v1/completions", {"temperature": "x"}, "temperature"),
        ("/v1/completions", {"echo": "yes"}, "echo"),
        ("/v1/completions", {"best_of": 1, "n": 2}, "best_of"),
        ("/v1/completions", {"max_tokens": -1}, "max_tokens"),
        ("/v1/completions", {"top_p": 2}, "top_p"),
        ("/v1/completions", {"prompt": {"a": 1}}, "prompt"),
        ("/v1/chat/completions", {"max_completion_tokens": -2}, "max_completion_tokens"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages"),
        ("/v1/chat/completions", {"model": None}, "model"),
    ],
)
def test_invalid_parameters_are_named(server, path, extra, param):
    body = {"model": "base"} if "max_completion_tokens" in extra else {"model": "base", "max_tokens": 2}
    body.update({"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]})
    body.update(extra)
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["code"] is None
    assert err["message"]


def test_parsed_requests():
    req = parse_completion_request({"model": "m", "prompt": "hi", "n": 2, "echo": True, "logprobs": 0, "seed": 5})
    assert (req.n, req.best_of, req.echo, req.logprobs, req.sampling.seed) == (2, 2, True, 0, 5)
    chat = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True})
    assert chat.logprobs == 0 and chat.n == 1
    assert parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}]}).logprobs is None
    with pytest.raises(APIError) as e:
        parse_completion_request({"model": "m", "prompt": "hi", "stream": True, "best_of": 2})
    assert e.value.param == "best_of"


def test_openapi_documents_the_bodies(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    text = json.dumps(spec)
    for word in ("top_k", "logprobs", "echo", "best_of", "image_url", "top_logprobs", "stream_options"):
        assert word in text
    completions = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "top_k" in completions["properties"] and "$defs" not in json.dumps(completions)
    assert httpx.get(server.url + "/docs").status_code == 200


def test_decoder_records_logprobs_only_when_asked(model):
    dec = BatchDecoder(model, max_batch=4, max_len=64)
    ids = model.tokenizer.encode(PROMPT, bos=True)
    plain = DecodeRequest(ids, None, SamplingParams(max_new_tokens=4, temperature=0.0))
    scored = DecodeRequest(ids, None, SamplingParams(max_new_tokens=4, temperature=0.0), logprobs=2)
    dec.add([plain, scored])
    while dec.seqs:
        dec.step()
    assert plain.out_logprobs == [] and plain.prompt_logprobs is None
    assert [e.token for e in scored.out_logprobs] == scored.out_ids == plain.out_ids
    assert all(len(e.top) == 2 and e.top[0][0] == e.token for e in scored.out_logprobs)
