"""`pyllmkv serve`: llama-cpp-python's OpenAI-compatible server on a budgeted model, driven over HTTP on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import SUBPROCESS_CWD, free_port
from soak import rss_mib


def _post(port: int, path: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


SERVER_PID = {}  # port -> pid of the server process


@pytest.fixture(scope="module")
def server(smollm2_path):
    with _serve(smollm2_path) as port:
        yield port


@contextlib.contextmanager
def _serve(model_path, *args):
    """Starts `pyllmkv serve` on a free port, yields the port once it answers, stops it (also when the test fails)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyllmkv", "serve", model_path, "--kv-budget", "128", "-b", "128", "--port", str(port), *args],
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
    SERVER_PID[port] = proc.pid
    try:
        yield port
    finally:
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


def test_eight_clients_for_a_minute(server):
    # 8 threads each asking again as soon as answered, for PYLLMKV_SERVER_SOAK_S seconds (default 60): every request
    # completes or gets a clean HTTP error, the server stays up, and its memory stays bounded
    seconds = float(os.environ.get("PYLLMKV_SERVER_SOAK_S", "60"))
    pid = SERVER_PID[server]
    rss = [rss_mib(pid)]
    done, failed, unclean = [0], [], []
    stop = time.time() + seconds

    def client(i):
        n = 0
        while time.time() < stop:
            try:
                out = _post(server, "/v1/chat/completions", {
                    "messages": [{"role": "user", "content": f"Client {i}, question {n}: name a colour and a fruit."}],
                    "max_tokens": 24, "temperature": 0.7, "seed": i * 1000 + n,
                }, timeout=600)
                assert out["choices"][0]["message"]["content"] is not None
                done[0] += 1
            except urllib.error.HTTPError as e:  # a clean error: an HTTP status with a JSON body
                failed.append(e.code)
                json.loads(e.read() or b"{}")
            except Exception as e:  # noqa: BLE001  (reported below)
                unclean.append(repr(e))
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(5)
        rss.append(rss_mib(pid))
    assert not unclean, unclean[:3]
    assert done[0] >= 8 and len(failed) <= done[0] // 10, (done, failed)
    assert max(rss) - rss[1] < 64, f"server RSS grew from {rss[1]:.0f} to {max(rss):.0f} MiB"


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


@pytest.mark.parametrize("policy", ["criticalkv", "snapkv-ada"])
def test_prompt_cache_resumes_a_conversation_past_evictions(smollm2_path, policy):
    # --cache: llama-cpp-python saves a state after each completion and resumes the next prompt from the longest
    # shared prefix; resuming a state whose cache is full needs the hook's data (the window's queries) to evict
    # (tests/test_api.py checks the answers against a live cache)
    with _serve(smollm2_path, "--cache", "--policy", policy) as port:
        first = "The baker opened the shop at dawn and sold bread to the fishermen. " * 25 + "Question: who bought the bread? Answer:"
        answer = _post(port, "/v1/completions", {"prompt": first, "max_tokens": 16, "temperature": 0})["choices"][0]["text"]
        _post(port, "/v1/completions", {"prompt": "Something else: the weather today is", "max_tokens": 8, "temperature": 0})
        out = _post(port, "/v1/completions", {"prompt": first + answer + "\nQuestion: when did the shop open? Answer:", "max_tokens": 16,
                                              "temperature": 0})
        assert out["usage"]["completion_tokens"] > 0, (answer, out)


def test_llama_cpp_flags_reach_the_model(smollm2_path):
    # chat's flags on the server: a q8_0 cache (flash attention turned on for it), token granularity, one thread;
    # the answer's log-probabilities are pyllmkv.Llama's with the same settings, past the budget (each of those
    # settings alone moves them by more than 1e-3)
    import pyllmkv
    from pyllmkv._lib import llama_cpp

    prompt = "The lighthouse keeper counted the ships that passed the rocky point each night. " * 20 + "The keeper counted"
    settings = ["--policy", "criticalkv", "--granularity", "token", "-ctk", "q8_0", "-ctv", "q8_0", "-t", "1", "--seed", "7"]
    with _serve(smollm2_path, *settings) as port:
        served = _post(port, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 1})
    llm = pyllmkv.Llama(smollm2_path, kv_budget=128, n_batch=128, policy="criticalkv", granularity="token", type_k=llama_cpp.GGML_TYPE_Q8_0,
                        type_v=llama_cpp.GGML_TYPE_Q8_0, flash_attn=True, n_threads=1, logits_all=True, verbose=False)
    local = llm.create_completion(prompt, max_tokens=6, temperature=0, logprobs=1)
    assert llm.kv_stats()["n_evictions"] > 0
    assert served["choices"][0]["text"] == local["choices"][0]["text"] != ""
    np.testing.assert_allclose(served["choices"][0]["logprobs"]["token_logprobs"],
                               np.array(local["choices"][0]["logprobs"]["token_logprobs"], dtype=float), atol=1e-5)


def test_quantized_v_without_flash_attention_is_refused(smollm2_path):
    r = subprocess.run([sys.executable, "-m", "pyllmkv", "serve", smollm2_path, "-ctv", "q8_0", "-fa", "off", "--port",
                        str(free_port())], capture_output=True, text=True, timeout=120, cwd=SUBPROCESS_CWD)
    assert r.returncode != 0 and "needs flash attention" in r.stderr and "Traceback" not in r.stderr


def test_a_conversation_goes_past_the_trained_context_over_http(tmp_path):
    # the server's engine (pyllmkv.Llama) renumbers positions past the model's trained context (256 here) as the
    # chat's (Session) does: served and local answers agree, positions stay below 256 after 600 tokens, and the tokens
    # the API decoded are the chat engine's greedy ones
    import pyllmkv
    from pyllmkv import _lib
    from pyllmkv.session import Session
    from tinymodel import write_tiny_llama

    model = write_tiny_llama(tmp_path / "tiny-256.gguf", seed=4, n_ctx_train=256)
    prompt = "The lighthouse keeper counted the ships that passed the point. " * 10
    request = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "repeat_penalty": 1.0}
    with _serve(model, "--kv-budget", "64", "-b", "32", "-c", "1024", "-t", "1") as port:
        served = _post(port, "/v1/completions", request)
        # past -c: the limit the error names is -c's, not the cache's cells
        with pytest.raises(urllib.error.HTTPError) as refused:
            _post(port, "/v1/completions", dict(request, prompt=prompt * 2))
        message = json.loads(refused.value.read())["error"]["message"]
        assert refused.value.code == 400 and "maximum context length is 1024 tokens" in message, message
    llm = pyllmkv.Llama(model, kv_budget=64, n_batch=32, n_ctx=1024, n_threads=1, verbose=False)
    local = llm.create_completion(**request)
    assert served["choices"][0]["text"] == local["choices"][0]["text"]
    n_prompt = len(llm.tokenize(prompt.encode(), special=True))
    assert n_prompt > 600 and llm.n_tokens > n_prompt and _lib.positions(llm).max() < 256

    plain = pyllmkv.llama_cpp.Llama(model_path=model, n_ctx=pyllmkv.llama_cpp.llama_n_ctx(llm.ctx), n_batch=32,
                                    n_ubatch=32, n_threads=1, verbose=False)
    sess = Session(plain, llm.evict_config)
    decoded = [int(t) for t in llm.input_ids[: llm.n_tokens]]
    logits, answer = sess.decode(decoded[:n_prompt]), []
    for _ in range(llm.n_tokens - n_prompt):
        answer.append(int(np.argmax(logits)))
        logits = sess.decode(answer[-1:])
    assert answer == decoded[n_prompt:]
