"""``metal-marlin serve`` as a subprocess: the options reach the server (API key, KV blocks, metrics port)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_options():
    port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "metal_marlin.cli", "--threads", "2", "serve", "--port", str(port),
           "--max-batch", "4", "--kv-blocks", "40", "--block-size", "8", "--max-queue", "3", "--api-key", "k3y",
           "--metrics-port", str(metrics_port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        assert httpx.get(url + "/v1/models").status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
        model = client.models.list().data[0].id
        reply = client.completions.create(model=model, prompt="Hello", max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens == 3
        # a request needing more than the 39 usable blocks of 8 positions can never be served: one prompt
        # token and 39 * 8 + 1 new ones fill 39 * 8 + 1 positions (the last token is not cached)
        assert reply.usage.prompt_tokens == 1
        too_big = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k3y"},
                             json={"model": model, "prompt": "Hello", "max_tokens": 39 * 8 + 2})
        assert too_big.status_code == 400 and "KV blocks" in too_big.json()["error"]["message"]
        for where in (url, f"http://127.0.0.1:{metrics_port}"):
            families = {f.name: f for f in text_string_to_metric_families(httpx.get(where + "/metrics").text)}
            assert families["metal_marlin_kv_blocks_total"].samples[0].value == 39
            assert families["metal_marlin_generated_tokens"].samples[0].value == 3
    finally:
        proc.terminate()
        proc.wait(30)
