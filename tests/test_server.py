"""`pyllmkv serve`: llama-cpp-python's OpenAI-compatible server on a budgeted model, driven over HTTP on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from conftest import SUBPROCESS_CWD


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, path: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(smollm2_path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyllmkv", "serve", smollm2_path, "--kv-budget", "128", "-b", "128", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy(), cwd=SUBPROCESS_CWD,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read().decode()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("server did not start within 120 s")
    yield port
    proc.terminate()
    proc.wait(timeout=30)


def test_chat_completion_over_http(server):
    out = _post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 24, "temperature": 0,
    })
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["content"].strip()


def test_two_concurrent_requests_complete(server):
    results, errors = [], []

    def ask(q):
        try:
            results.append(_post(server, "/v1/chat/completions", {
                "messages": [{"role": "user", "content": q}], "max_tokens": 160, "temperature": 0,
            }))
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(q,)) for q in ("Tell me about the sea.", "Tell me about the moon.")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors
    assert len(results) == 2 and all(r["choices"][0]["message"]["content"].strip() for r in results)
    # the answers together outgrow the 128 + 128 cells the cache holds
    assert sum(r["usage"]["total_tokens"] for r in results) > 256


def test_port_in_use_is_a_clear_error(smollm2_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "pyllmkv", "serve", smollm2_path, "--port", str(port)],
                           capture_output=True, text=True, timeout=120, cwd=SUBPROCESS_CWD)
    assert r.returncode != 0
    assert f"port {port} on 127.0.0.1 is in use" in r.stderr
    assert "Traceback" not in r.stderr
