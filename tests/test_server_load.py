"""The server under load and at shutdown (issue 14): SIGTERM ends `serve` cleanly (every stream gets a final event and
[DONE], exit 0), and a bounded loopback load of mixed requests, disconnects and adapter churn gives no 5xx, keeps
/health up and does not grow the process's memory."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch

import llama_adapter as la
from llama_adapter.inference.decoder import DecodeRequest
from llama_adapter.inference.sampling import SamplingParams
from llama_adapter.serving.app import create_app
from llama_adapter.serving.engine import Engine, EngineStopped
from llama_adapter.serving.protocol import error_from_seq
from tests.test_server import _free_port, _Running

KEY = "load-key"
H = {"Authorization": f"Bearer {KEY}"}
ROOT = Path(__file__).resolve().parents[1]
# RSS after round 2 may exceed RSS after round 1 by at most this much (allocator noise, lazily built caches);
# a leak of per-request state (queues, sinks, K/V rows of cancelled streams) over 200 requests would pass it.
RSS_SLACK_BYTES = 50 * 1024 * 1024
RSS_SLACK_FRACTION = 0.10


# ---- SIGTERM ------------------------------------------------------------------------------------------------
def _stream_lines(url: str, body: dict, out: list[str], opened: list[bool]) -> None:
    """Read one SSE stream to its end into `out` (the whole list of lines; a torn connection raises)."""
    with httpx.Client(timeout=60) as c, c.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        opened.append(True)
        for line in r.iter_lines():
            if line:
                out.append(line)


def test_sigterm_ends_streams_with_a_final_event_and_exits_0(tmp_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_adapter", "serve", "--base", "builtin", "--port", str(port)]
    cmd += ["--max-batch-size", "1", "--shutdown-grace", "0", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "serve did not start"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        # one slot: the first stream decodes, the others wait in the queue, so SIGTERM finds work to cut
        results: list[list[str]] = [[] for _ in range(4)]
        opened: list[bool] = []
        bodies = [
            {"model": "base", "prompt": "Once upon a time", "max_tokens": 240, "stream": True, "temperature": 0},
            {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": True},
        ]
        threads = [
            threading.Thread(
                target=_stream_lines,
                args=(url + ("/v1/completions" if i % 2 == 0 else "/v1/chat/completions"), bodies[i % 2]),
                kwargs={"out": results[i], "opened": opened},
                daemon=True,
            )
            for i in range(4)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(opened) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, (tmp_path / "serve.log").read_text()
        for t in threads:
            t.join(timeout=20)
            assert not t.is_alive()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
    cut = 0
    for lines in results:
        assert lines and lines[-1] == "data: [DONE]", lines[-3:]
        last = json.loads(lines[-2][5:])
        if "error" in last:
            assert last["error"]["code"] == "server_shutting_down", last
            cut += 1
        else:
            assert last["choices"][0]["finish_reason"] in ("stop", "length"), last
    assert cut >= 1  # the queued streams at least were cut, with their final event


def test_drain_ends_requests_in_flight_with_a_503_final_event(load_server):
    """What SIGTERM does inside: `Engine.drain` past its grace ends queued and decoding requests with "the server is
    shutting down" (a 503 body), and a request after it is a 503, not a 500."""
    m = load_server.server.config.app.state.server.model
    eng = Engine(m, max_batch_size=1, max_queue=4, max_len=64)
    got: list[DecodeRequest] = []
    eng.start()
    seqs = [DecodeRequest([1, 5, 6], None, SamplingParams(max_new_tokens=60, temperature=0)) for _ in range(3)]
    eng.submit(seqs, lambda ev: got.append(ev.seq) if ev.finished else None)
    eng.drain(0)
    assert len(got) == 3
    for s in got:
        if s.finish_reason == "error":
            err = error_from_seq(s)
            assert err.status == 503 and err.body()["error"]["code"] == "server_shutting_down"
    assert sum(s.finish_reason == "error" for s in got) >= 2  # the queued ones at least
    with pytest.raises(EngineStopped):
        eng.submit([DecodeRequest([1, 5], None, SamplingParams(max_new_tokens=2))], lambda ev: None)


# ---- load ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def load_server(tiny_base, tmp_path_factory, one_thread):
    """The tiny model; adapters a0-a2 (non-zero gates) in an --adapter-dir, and `churn`, loaded through the API
    from a file outside it, which the load test deletes and re-adds."""
    m = la.load_model(tiny_base, dtype=torch.float32)
    root = tmp_path_factory.mktemp("load")
    d = root / "adapters"
    d.mkdir()
    torch.manual_seed(3)
    for name, k in (("a0", 2), ("a1", 3), ("a2", 4), ("churn", 3)):
        a = m.add_adapter(name, la.AdapterConfig(prompt_length=k, layers=2))
        with torch.no_grad():
            a.gates.normal_(0, 2.0)
        la.save_adapter(m, name, (d if name != "churn" else root) / f"{name}.safetensors")
        m.remove_adapter(name)
    app = create_app(m, api_key=KEY, max_batch_size=8, max_queue=64, max_context=128, adapter_dir=d)
    r = _Running(app)
    r.churn_path = str(root / "churn.safetensors")
    assert (
        httpx.post(r.url + "/v1/adapters", json={"name": "churn", "path": r.churn_path}, headers=H).status_code == 201
    )
    yield r
    r.stop()


async def _one(client: httpx.AsyncClient, rng: random.Random, sem: asyncio.Semaphore) -> tuple[str, int, str]:
    """One random request: (model, HTTP status, "ok" | "disconnected" | the SSE error's code)."""
    model = rng.choice(["base", "a0", "a1", "a2", "churn"])
    chat, stream = rng.random() < 0.5, rng.random() < 0.5
    leave = stream and rng.random() < 0.2
    body: dict = {"model": model, "max_tokens": rng.randint(2, 8), "temperature": rng.choice([0, 0.8])}
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": "the quick brown"}]
    else:
        path, body["prompt"] = "/v1/completions", "the quick brown"
    body["stream"] = stream
    async with sem:
        if not stream:
            r = await client.post(path, json=body)
            return model, r.status_code, "ok"
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return model, r.status_code, "ok"
            lines = []
            async for line in r.aiter_lines():
                if line:
                    lines.append(line)
                if leave and len(lines) >= 1:
                    return model, r.status_code, "disconnected"  # closes the connection mid-stream
        assert lines[-1] == "data: [DONE]", lines[-3:]
        last = json.loads(lines[-2][5:])
        return model, r.status_code, last["error"]["code"] if "error" in last else "ok"


async def _round(url: str, churn_path: str, n: int = 200, seed: int = 0) -> list[tuple[str, int, str]]:
    rng = random.Random(seed)
    sem = asyncio.Semaphore(16)
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=url, headers=H, timeout=60, limits=limits) as client:

        async def churn() -> list[int]:
            await asyncio.sleep(0.3)
            codes = [(await client.delete("/v1/adapters/churn")).status_code]
            await asyncio.sleep(0.5)
            codes.append((await client.post("/v1/adapters", json={"name": "churn", "path": churn_path})).status_code)
            return codes

        admin = asyncio.create_task(churn())
        results = await asyncio.wait_for(asyncio.gather(*(_one(client, rng, sem) for _ in range(n))), timeout=90)
        assert await admin == [200, 201]
    return results


def _check(results: list[tuple[str, int, str]]) -> None:
    for model, status, outcome in results:
        if status == 404 or outcome == "model_not_found":
            assert model == "churn", (model, status, outcome)  # only the adapter deleted meanwhile
        else:
            assert 200 <= status < 300 and outcome in ("ok", "disconnected"), (model, status, outcome)
    assert sum(o == "disconnected" for _, _, o in results) >= 5


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_load_mixed_requests_disconnects_and_adapter_churn(load_server):
    srv = load_server
    t0 = time.monotonic()
    _check(asyncio.run(_round(srv.url, srv.churn_path, seed=1)))
    rss1 = _rss()
    _check(asyncio.run(_round(srv.url, srv.churn_path, seed=2)))
    rss2 = _rss()
    assert time.monotonic() - t0 < 120
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"
    deadline = time.monotonic() + 10  # cancelled streams leave the batch at the next step
    while (h := httpx.get(srv.url + "/health").json())["running"] + h["queued"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert h["running"] == 0 and h["queued"] == 0, h
    assert rss2 <= rss1 + max(RSS_SLACK_BYTES, RSS_SLACK_FRACTION * rss1), (rss1, rss2)
