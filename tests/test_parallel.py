"""llama.cpp's llama-server with several slots on the patched library (`pyllmkv serve --parallel`): each slot is a
sequence evicted within its own cells while the slots decode together in one batch. The oracles: the same server with
one slot, one request at a time, and the same server without LLAMA_KV_EVICT (stock llama-server's behaviour)."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import SUBPROCESS_CWD, free_port
from llama_server import Server
from pyllmkv import parallel
from pyllmkv._lib import EvictConfig

N_BATCH = 32
CONFIG = EvictConfig.for_cells(96, window=16)  # the default policy, within 96 cells
CELLS = CONFIG.cells + N_BATCH  # per slot: what an eviction keeps + one batch
TEXT = Path("/usr/share/common-licenses/GPL-3")
EXTRA = ["-t", "2", "--seed", "1"]
SIZE = (N_BATCH, 0, EXTRA)  # the hook sizes each slot's cells


@pytest.fixture(scope="module")
def server_binary() -> Path:
    return parallel.binary()


@pytest.fixture(scope="module")
def texts(smollm2_path) -> list[str]:
    """Eight passages of a real English text, one per client."""
    if not TEXT.exists():
        pytest.fail(f"{TEXT} (Debian's licence texts) is missing: install the base-files package")
    words = TEXT.read_text().split()
    return [" ".join(words[400 + 150 * i: 400 + 150 * i + 60]) for i in range(8)]


def test_four_slots_eight_clients_within_budget(server_binary, smollm2_path, texts, tmp_path):
    """Eight clients on four slots: every conversation goes past its budget (prompt + answer > CELLS cells, evicted
    while it answers), each slot stays within its cells, the answers at temperature 0 are those of one slot serving one
    request at a time, and the server's RSS does not grow from round to round."""
    n_predict = 96
    with Server.start(server_binary, smollm2_path, CONFIG, 1, tmp_path / "one.log", *SIZE) as one:
        alone = [one.complete(t, n_predict) for t in texts]
    for r in alone:
        assert "error" not in r, r
        assert r["tokens_evaluated"] + r["tokens_predicted"] > CELLS

    with Server.start(server_binary, smollm2_path, CONFIG, 4, tmp_path / "four.log", *SIZE) as four:
        rss = []
        for _ in range(3):
            with ThreadPoolExecutor(8) as pool:
                together = list(pool.map(lambda t: four.complete(t, n_predict), texts))
            rss.append(four.rss_kib())
        evictions = four.evictions()

    assert [r.get("content") for r in together] == [r["content"] for r in alone]
    assert {seq for seq, _, _ in evictions} == {0, 1, 2, 3}
    assert all(after <= CONFIG.cells and before <= CELLS for _, before, after in evictions)
    # what the hook allocates it allocates once: no growth after the first round
    assert rss[2] - rss[0] < 16 * 1024, rss


def test_prompt_longer_than_the_cells(server_binary, smollm2_path, texts, tmp_path):
    """A prompt five times a slot's cells is read with evictions between its batches; stock llama-server, with the same
    cells and no LLAMA_KV_EVICT, refuses it."""
    prompt = " ".join(texts) + " " + " ".join(texts[:2])
    with Server.start(server_binary, smollm2_path, CONFIG, 2, tmp_path / "evict.log", *SIZE) as server:
        r = server.complete(prompt, 8)
        evictions = server.evictions()
    assert "error" not in r, r
    assert r["tokens_evaluated"] > 5 * CELLS
    assert len(evictions) >= (r["tokens_evaluated"] - CELLS) // N_BATCH

    with Server.start(server_binary, smollm2_path, None, 2, tmp_path / "stock.log", N_BATCH, 2 * CELLS, EXTRA) as stock:
        r = stock.complete(prompt, 8)
    assert "exceeds the available context size" in r["error"]["message"], r


def test_serve_parallel_is_llama_server_with_the_hook(server_binary, smollm2_path, texts, tmp_path):
    """`pyllmkv serve --parallel 2` execs llama-server with the hook on: its OpenAI chat endpoint answers a message
    longer than a slot's cells, evicting on the way."""
    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pyllmkv", "serve", smollm2_path, "--parallel", "2", "--kv-budget",
                                 "128", "-b", "32", "-t", "2", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                cwd=SUBPROCESS_CWD)
        with Server(proc, port, log) as server:
            body = {"messages": [{"role": "user", "content": " ".join(texts[:4])}], "max_tokens": 8, "temperature": 0}
            r = server.post("/v1/chat/completions", body)
    text = log.read_text(errors="replace")
    assert "error" not in r, r
    assert r["usage"]["prompt_tokens"] > 128 + 32 and r["choices"][0]["message"]["content"]
    assert "kv_evict: 2 slots of" in text and "kv_evict: seq " in text


@pytest.mark.parametrize("flag", ["--cache", "--renumber"])
def test_serve_parallel_refuses_what_llama_server_cannot_do(smollm2_path, flag):
    r = subprocess.run([sys.executable, "-m", "pyllmkv", "serve", smollm2_path, "--parallel", "2", flag,
                        "--port", str(free_port())], capture_output=True, text=True, timeout=120, cwd=SUBPROCESS_CWD)
    assert r.returncode != 0 and f"--parallel serves without {flag}" in r.stderr


@pytest.mark.parametrize("granularity", ["head", "token"])
def test_a_prompt_sharing_a_prefix_resumes_where_the_cells_allow(server_binary, smollm2_path, texts, tmp_path, granularity):
    """llama-server reuses a slot's cells for the prefix a new prompt shares with the last one. Where that prefix ends
    inside a long prompt, most of its cells were evicted: the slot resumes right after the last cell kept before it
    (llama.cpp continues a sequence only at its highest position + 1). With head granularity a compacted cell holds
    rows of tokens from all over the prompt, so it goes with the removed part: the slot starts afresh and answers as an
    empty slot does, not from positions with nothing before them."""
    config = EvictConfig.for_cells(96, window=16, policy="criticalkv", granularity=granularity)
    first = " ".join(texts)
    with Server.start(server_binary, smollm2_path, config, 2, tmp_path / "reuse.log", *SIZE) as server:
        assert "error" not in server.complete(first, 4, cache_prompt=True)
        slot = server.post("/completion", {"prompt": first, "n_predict": 0, "cache_prompt": True})["id_slot"]
        tokens = server.post("/tokenize", {"content": first})["tokens"]
        second = server.post("/detokenize", {"tokens": tokens[:len(tokens) // 2]})["content"] + " Now a question: why?"
        shared = next(i for i, (a, b) in enumerate(zip(tokens, server.post("/tokenize", {"content": second})["tokens"]))
                      if a != b)
        body = {"prompt": second, "n_predict": 16, "temperature": 0, "cache_prompt": True}
        resumed = server.post("/completion", {**body, "id_slot": slot})
        fresh = server.post("/completion", {**body, "id_slot": 1 - slot})
    assert "error" not in resumed and "error" not in fresh, (resumed, fresh)
    # stock llama-server would resume at `shared`, right after a cell that is gone
    assert resumed["timings"]["cache_n"] < shared and fresh["timings"]["cache_n"] == 0
    if granularity == "head":
        assert resumed["timings"]["cache_n"] == 0 and resumed["content"] == fresh["content"]
    else:
        assert resumed["timings"]["cache_n"] > 0
