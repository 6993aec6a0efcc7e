"""The server's adapter registry (`serve --adapter-dir`, `--max-adapters`), adapter names, deleting an adapter that
queued requests wait for, and several API keys; a tiny model behind a live uvicorn server."""

from __future__ import annotations

import json
import os
import threading
import time

import httpx
import openai
import pytest
import torch
from test_server import _Running

import llama_adapter as la
from llama_adapter.cli import build_parser, main
from llama_adapter.cli import serve as serve_cli
from llama_adapter.errors import UserError
from llama_adapter.inference.decoder import DecodeRequest
from llama_adapter.inference.generate import generate
from llama_adapter.inference.sampling import SamplingParams
from llama_adapter.serving.app import create_app

KEY = "k1"
H = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def setup(tiny_base, tmp_path_factory, one_thread):
    """A model without adapters, and a directory with two adapter files (`a`, `b`), a symlink out of it and one
    file outside it."""
    m = la.load_model(tiny_base, dtype=torch.float32)
    root = tmp_path_factory.mktemp("registry")
    d = root / "adapters"
    d.mkdir()
    torch.manual_seed(1)
    for name, k in (("a", 3), ("b", 5), ("outside", 2)):
        a = m.add_adapter(name, la.AdapterConfig(prompt_length=k, layers=2))
        with torch.no_grad():
            a.gates.normal_(0, 2.0)
        la.save_adapter(m, name, (d if name != "outside" else root) / f"{name}.safetensors")
    ref = {n: generate(m, ["the quick"], adapter=n, max_new_tokens=6, temperature=0.0)[0] for n in ("a", "b")}
    for n in ("a", "b", "outside"):
        m.remove_adapter(n)
    os.symlink(root / "outside.safetensors", d / "evil.safetensors")
    return m, d, root, ref


@pytest.fixture()
def dir_server(setup):
    m, d, _, _ = setup
    r = _Running(create_app(m, api_key=[KEY, "k2"], max_batch_size=4, max_context=128, adapter_dir=d, max_adapters=1))
    r.srv = r.server.config.app.state.server
    yield r
    r.stop()
    for n in list(m.adapters):
        m.remove_adapter(n)


def _complete(url: str, model: str, key: str = KEY, **kw) -> httpx.Response:
    body = {"model": model, "prompt": "the quick", "max_tokens": 6, "temperature": 0, **kw}
    return httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_directory_adapters_load_on_first_use_and_evict_lru(dir_server, setup):
    m, _, _, ref = setup
    reg = dir_server.srv.registry
    models = httpx.get(dir_server.url + "/v1/models", headers=H).json()["data"]
    assert [(x["id"], x.get("loaded")) for x in models] == [("base", None), ("a", False), ("b", False)]
    assert not m.adapters
    for i, name in enumerate(("a", "b", "a", "b")):  # N=1: each switch evicts the other, between uses
        r = _complete(dir_server.url, name)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == ref[name]
        assert list(m.adapters) == [name]
        assert (reg.loads, reg.evictions) == (i + 1, i)
    assert _complete(dir_server.url, "b").status_code == 200 and reg.loads == 4  # resident: no reload
    models = httpx.get(dir_server.url + "/v1/models", headers=H).json()["data"]
    assert {x["id"]: x["loaded"] for x in models[1:]} == {"a": False, "b": True}
    # names are names, never paths: '..', absolute paths, slashes, the symlink out of DIR, the file outside
    for bad in ("..", "../outside", "/etc/passwd", str(setup[2] / "outside.safetensors"), "x/y", "evil", "outside"):
        r = _complete(dir_server.url, bad)
        assert r.status_code == 404, (bad, r.text)
    assert list(m.adapters) == ["b"]


def test_an_adapter_in_use_is_never_evicted(dir_server, setup):
    m, _, _, ref = setup
    reg, engine = dir_server.srv.registry, dir_server.srv.engine
    assert _complete(dir_server.url, "a").status_code == 200 and list(m.adapters) == ["a"]
    # held by a request (between its `acquire` and the engine): loading `b` leaves both resident, over N
    assert reg.acquire("a")
    assert _complete(dir_server.url, "b").json()["choices"][0]["text"] == ref["b"]
    assert set(m.adapters) == {"a", "b"} and reg.evictions == 0
    reg.release("a")
    # queued on the engine: `a` is the least recently used, but in use, so the idle `b` goes instead
    tok = m.tokenizer
    done = threading.Event()
    seq = DecodeRequest(tok.encode("the quick", bos=True), "a", SamplingParams(max_new_tokens=6, temperature=0.0))
    with engine.model_lock():  # no decode step meanwhile: the request stays queued
        engine.submit([seq], lambda ev: done.set() if ev.finished else None)
        reg.evict_over_limit()
        assert list(m.adapters) == ["a"] and reg.evictions == 1
    assert done.wait(30) and seq.finish_reason == "length"
    assert tok.decode(seq.out_ids) == ref["a"]
    assert _complete(dir_server.url, "a").json()["choices"][0]["text"] == ref["a"]


def test_delete_fails_queued_requests_with_404_and_lets_decoding_ones_finish(dir_server, setup):
    m = setup[0]
    srv = dir_server.srv
    assert _complete(dir_server.url, "a").status_code == 200  # resident now
    c = openai.OpenAI(base_url=dir_server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    result: dict = {}

    def queued() -> None:
        try:
            c.completions.create(model="a", prompt="hi", max_tokens=4)
        except openai.APIStatusError as e:
            result["err"] = e

    with srv.engine.model_lock():  # the engine cannot admit it: it stays queued while `a` is deleted
        t = threading.Thread(target=queued)
        t.start()
        deadline = time.time() + 20
        while srv.engine.queued < 1:
            assert time.time() < deadline
            time.sleep(0.01)
        srv.remove_adapter("a")
    t.join(30)
    err = result["err"]
    assert err.status_code == 404 and "'a'" in err.message, err.message  # not a 500 whose message is "a"
    # a request decoding when its adapter is deleted finishes normally
    body = {"model": "b", "prompt": "the quick", "max_tokens": 40, "temperature": 0, "stream": True}
    body["stop"] = ["\x00never"]
    url = dir_server.url + "/v1/completions"
    with httpx.Client(timeout=60) as hc, hc.stream("POST", url, json=body, headers=H) as r:
        lines = r.iter_lines()
        assert json.loads(next(x for x in lines if x.startswith("data:"))[5:])["choices"]
        assert httpx.delete(dir_server.url + "/v1/adapters/b", headers=H).status_code == 200
        rest = [json.loads(x[5:]) for x in lines if x.startswith("data:") and x != "data: [DONE]"]
    assert rest[-1]["choices"][0]["finish_reason"] == "length"
    assert "b" not in m.adapters
    assert _complete(dir_server.url, "b").status_code == 200  # a directory adapter stays servable


def test_adapter_names_and_several_keys(dir_server, setup):
    _, _, root, _ = setup
    for key in (KEY, "k2"):
        assert _complete(dir_server.url, "base", key=key).status_code == 200
    assert _complete(dir_server.url, "base", key="k3").status_code == 401
    path = str(root / "outside.safetensors")
    for name in ("x/y", " ", "n" * 300, "..", "a.b"):
        r = httpx.post(dir_server.url + "/v1/adapters", json={"name": name, "path": path}, headers=H)
        assert r.status_code == 400 and r.json()["error"]["param"] == "name", (name, r.text)
    r = httpx.post(dir_server.url + "/v1/adapters", json={"name": "a", "path": path}, headers=H)
    assert r.status_code == 409  # the directory's `a`
    r = httpx.post(dir_server.url + "/v1/adapters", json={"name": "out", "path": path}, headers={"x-api-key": "k2"})
    assert r.status_code == 201, r.text
    assert _complete(dir_server.url, "out").status_code == 200


def test_serve_flags(tiny_base, setup, tmp_path):
    _, d, root, _ = setup
    keys = tmp_path / "keys"
    keys.write_text("alpha\n\n  beta \n")
    args = build_parser().parse_args(["serve", "--base", "x", "--api-key", "one", "--api-key-file", str(keys)])
    assert serve_cli.api_keys(args) == ["one", "alpha", "beta"]
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty = str(empty)
    with pytest.raises(UserError, match="no keys"):
        serve_cli.api_keys(build_parser().parse_args(["serve", "--base", "x", "--api-key-file", empty]))
    base = ["serve", "--base", str(tiny_base), "--dtype", "fp32"]
    path = str(root / "outside.safetensors")
    for spec in (f"x/y={path}", f" ={path}", f"{'n' * 300}={path}"):
        assert main([*base, "--adapter", spec]) == 2
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "a.b.safetensors").write_bytes((d / "a.safetensors").read_bytes())
    assert main([*base, "--adapter-dir", str(bad_dir)]) == 2
    assert main([*base, "--adapter-dir", str(tmp_path / "missing")]) == 2
    assert main([*base, "--max-adapters", "0"]) == 2
