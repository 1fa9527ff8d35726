"""The real server (uvicorn on a free loopback port, the embedded default model) driven by the official
``openai`` client: chat and completions, streamed and not, concurrency, disconnects, metrics, bad
requests, the queue bound and the API key."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from metal_marlin.models import load_model
from metal_marlin.serving import Engine, GenerationRequest
from metal_marlin.serving.app import create_app

MODEL = "embedded"
KEY = "test-key"
MAX_QUEUE = 16
MAX_BATCH = 16


@pytest.fixture(scope="module")
def server():
    model, tokenizer = load_model()
    engine = Engine(model, tokenizer, max_batch=MAX_BATCH, num_blocks=256, block_size=16, max_queue=MAX_QUEUE)
    app = create_app(engine, MODEL, api_key=KEY, max_body_bytes=1 << 20)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield url, engine, model, tokenizer
    uv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics by name and labels, e.g. ``requests_total{status="200"}``."""
    text = httpx.get(url + "/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[s.name.removeprefix("metal_marlin_") + (f"{{{labels}}}" if labels else "")] = s.value
    return samples


def chat_ids(tokenizer, content: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_models_health_and_api_key(server, client):
    url = server[0]
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_chat_matches_generate_and_streams_the_same_text(server, client):
    _, _, model, tokenizer = server
    question = "What is the capital of France?"
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                           max_tokens=24, temperature=0)
    ids = chat_ids(tokenizer, question)
    # the oracle: the runtime's own generate with the preallocated cache, stopping at EOS
    out = model.generate(torch.tensor([ids]), max_new_tokens=24)[0, len(ids):].tolist()
    stop = set(model.stop_ids())
    new = out[:next((i for i, t in enumerate(out) if t in stop), len(out))]
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(new, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if len(new) < 24 else "length")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), len(new))
    assert reply.usage.total_tokens == len(ids) + len(new)

    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                                 max_tokens=24, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == len(new)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_completions_streaming_stop_strings_and_seed(server, client):
    url, _, model, tokenizer = server
    prompt = "The three primary colors are"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    ids = tokenizer(prompt).input_ids
    want = model.generate(torch.tensor([ids]), max_new_tokens=12, stop_token_ids=[])[0, len(ids):].tolist()
    text = full.choices[0].text
    assert text == tokenizer.decode(want, skip_special_tokens=True) and full.choices[0].finish_reason == "length"
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (len(ids), 12)

    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text
    assert streamed[-1].choices[0].finish_reason == "length"
    raw = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": MODEL, "prompt": prompt, "max_tokens": 3, "stream": True}).text
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"

    stop = text.strip().split()[1]  # a word inside the reply
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"

    sampled = [client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=1.0, seed=s).choices[0]
               .text for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_sixteen_concurrent_greedy_requests_equal_each_alone(server, client):
    """The same server serving each request alone (one at a time) gives exactly the text it gives
    inside a batch of 16 concurrent requests."""
    url = server[0]
    prompts = [f"Write a short sentence about the number {i}." for i in range(16)]

    def ask(c, p):
        return c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=10,
                                         temperature=0)

    alone = [ask(client, p).choices[0].message.content for p in prompts]

    async def together():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0) as c:
            return await asyncio.gather(*(ask(c, p) for p in prompts))

    replies = asyncio.run(together())
    assert [r.choices[0].message.content for r in replies] == alone
    assert len(set(alone)) > 1  # the prompts differ, so do the replies


def test_disconnect_mid_stream_frees_blocks(server):
    url, engine = server[0], server[1]
    tokens_before = metrics(url)["generated_tokens_total"]
    # Greedy, and a prompt whose continuation runs past 400 tokens (a sampled one may hit EOS early and
    # finish, freeing its blocks, before the client reads three chunks: decode is fast).
    body = {"model": MODEL, "prompt": "Here is a list of the numbers from 1 to 200: 1, 2, 3, 4,", "max_tokens": 400,
            "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(headers=headers, timeout=60) as http, http.stream("POST", url + "/v1/completions",
                                                                       json=body) as r:
        # Keep the line iterator alive while checking: closing it closes the response (a disconnect).
        lines, received = r.iter_lines(), 0
        while received < 3:
            received += next(lines).startswith("data: ")
        held = metrics(url)
        prompt_ids = tuple(engine.tokenizer(body["prompt"]).input_ids)
        assert held["kv_blocks_used"] == engine.blocks_needed(GenerationRequest(prompt_ids, 400))
        assert held["running_requests"] == 1
        lines.close()
    deadline = time.monotonic() + 30
    while (m := metrics(url))["kv_blocks_used"] != 0 or m["running_requests"] != 0:
        assert time.monotonic() < deadline, m
        time.sleep(0.1)
    assert m["generated_tokens_total"] - tokens_before < 100  # cancelled long before its 400 tokens


def test_metrics_parse_as_prometheus_text(server, client):
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
    m = metrics(server[0])
    for name in ("queue_depth", "running_requests", "kv_blocks_used", "kv_blocks_total", "generated_tokens_total",
                 "time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 'requests_total{status="200"}'):
        assert name in m, name
    assert m["time_to_first_token_seconds_count"] >= 1 and m["inter_token_latency_seconds_count"] >= 2
    assert m["kv_blocks_total"] == 255


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    url, engine = server[0], server[1]
    chat, comp = url + "/v1/chat/completions", url + "/v1/completions"
    msgs = [{"role": "user", "content": "hi"}]
    too_long = "hello " * (engine.max_model_len + 100)
    cases = [  # (url, body (bytes: sent raw), expected status, expected param)
        (chat, b'{"model": "embedded", "messages": [', 400, None),
        (chat, b"[1, 2]", 400, None),
        (chat, {"model": MODEL}, 400, "messages"),
        (chat, {"model": MODEL, "messages": []}, 400, "messages"),
        (chat, {"model": "gpt-4", "messages": msgs}, 404, "model"),
        (chat, {"model": MODEL, "messages": msgs, "max_tokens": -5}, 400, "max_tokens"),
        (chat, {"model": MODEL, "messages": msgs, "max_tokens": 10**9}, 400, "max_tokens"),
        (chat, {"model": MODEL, "messages": msgs, "max_tokens": "ten"}, 400, "max_tokens"),
        (chat, {"model": MODEL, "messages": "hi"}, 400, "messages"),
        (chat, {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
        (chat, {"model": MODEL, "messages": msgs, "temperature": "hot"}, 400, "temperature"),
        (chat, {"model": MODEL, "messages": msgs, "temperature": -1}, 400, "temperature"),
        (chat, {"model": MODEL, "messages": msgs, "n": 2}, 400, "n"),
        (chat, {"model": MODEL, "messages": [{"role": "user", "content": too_long}]}, 400, "messages"),
        (comp, {"model": MODEL, "prompt": too_long, "max_tokens": 5}, 400, "prompt"),
        (comp, {"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
        (comp, {"model": MODEL, "prompt": 5}, 400, "prompt"),
        (comp, {"model": MODEL, "prompt": "x" * (2 << 20)}, 413, None),
        (url + "/v1/nothing", {}, 404, None),
    ]
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        for target, body, status, param in cases:
            if isinstance(body, bytes):
                r = http.post(target, content=body, headers={"Content-Type": "application/json"})
            else:
                r = http.post(target, json=body)
            assert r.status_code == status, (body if len(str(body)) < 200 else target, r.text[:300])
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], error
            if param is not None:
                assert error["param"] == param, (error, body if len(str(body)) < 200 else target)
    reply = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0)
    assert reply.choices[0].message.content and engine.blocks_used == 0


def test_queue_bound_gives_429(server):
    """More requests than the batch and the queue hold at once: the excess gets 429 with an OpenAI error
    body, the rest are served."""
    url = server[0]
    total = MAX_BATCH + MAX_QUEUE + 12

    async def flood():
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
            body = {"model": MODEL, "prompt": "Count to ten:", "max_tokens": 6, "temperature": 0}
            return await asyncio.gather(*(http.post(url + "/v1/completions", json=body) for _ in range(total)))

    responses = asyncio.run(flood())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= MAX_BATCH
    rejected = next(r for r in responses if r.status_code == 429).json()["error"]
    assert rejected["code"] == "queue_full" and set(rejected) == {"message", "type", "param", "code"}
    served = [json.loads(r.text)["choices"][0]["text"] for r in responses if r.status_code == 200]
    assert len(set(served)) == 1  # the same greedy request: the same text, however it was batched
