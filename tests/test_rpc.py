"""Past one machine (pyllmkv.rpc, `--rpc`): a model's layers and their KV cache on two ggml-rpc-servers that the tests
start on 127.0.0.1 (distinct free ports, stopped by the tests; no other address). Each run that registers servers does
so in a child process, since ggml keeps them registered until the process exits. Oracle: the same run on the local
CPU. What loopback does not prove: bandwidth and latency between hosts, and servers with devices other than a CPU."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SUBPROCESS_CWD, free_port
from pyllmkv import rpc

PEER = Path(__file__).resolve().parent / "rpc_peer.py"


@contextlib.contextmanager
def _servers(n: int):
    """n ggml-rpc-servers on 127.0.0.1; yields ("127.0.0.1:p1,...", [processes])."""
    procs, ports = [], []
    try:
        for _ in range(n):
            port = free_port()
            procs.append(subprocess.Popen([str(rpc.server_path()), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            ports.append(port)
        for port in ports:
            deadline = time.time() + 30
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
                assert time.time() < deadline, f"ggml-rpc-server on port {port} did not start"
                time.sleep(0.2)
        yield ",".join(f"127.0.0.1:{p}" for p in ports), procs
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)


def _peer(model: str, out: Path, servers: str = "") -> dict:
    cmd = [sys.executable, str(PEER), model, str(out)] + ([servers] if servers else [])
    # value norms in floats, as the servers' graph computes them: the CPU kernel's int8 product of a quantised W_O
    # comes within 1 % of them, which can change a cell at the edge of the budget
    env = dict(os.environ, LLAMA_KV_EVICT_VALUE_NORMS="f32")
    proc = subprocess.run(cmd, cwd=SUBPROCESS_CWD, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(np.load(out))


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_layers_on_two_rpc_servers_keep_the_local_cells_and_logits(tiny_path, smollm2_path, tmp_path, model):
    path = tiny_path if model == "tiny" else smollm2_path
    local = _peer(path, tmp_path / "local.npz")
    with _servers(2) as (servers, _):
        remote = _peer(path, tmp_path / "remote.npz", servers)
    assert local["n_evictions"] > 3 and remote["n_evictions"] == local["n_evictions"]
    # the scoring ran as ggml graphs on the servers (the fused CPU kernels read host memory only)
    assert str(remote["kernel"]) == "ggml-graph" and str(local["kernel"]) == "fused-cpu"
    np.testing.assert_array_equal(remote["held"], local["held"])  # head-wise compaction, each head's cells
    np.testing.assert_array_equal(remote["renumbered"], local["renumbered"])
    assert (remote["renumbered"] == np.arange(len(local["renumbered"]))).all()
    # the same CPU kernels compute the layers there: equal within the f16 cache's tolerance
    np.testing.assert_allclose(remote["logits"], local["logits"], rtol=0, atol=1e-2)
    np.testing.assert_allclose(remote["after"], local["after"], rtol=0, atol=1e-2)


def test_a_server_that_does_not_answer_is_refused_before_loading():
    port = free_port()  # nothing listens there
    with pytest.raises(ConnectionError, match=rf"cannot reach the RPC server 127.0.0.1:{port}.*pyllmkv rpc-server"):
        rpc.add_servers(f"127.0.0.1:{port}")
    with pytest.raises(ValueError, match="'localhost' is not HOST:PORT"):
        rpc.add_servers("localhost")
    assert rpc._registered == []


def test_a_server_killed_mid_run_ends_the_run_with_the_reason(smollm2_path):
    # ggml aborts the process when a server stops answering: no hang, and pyllmkv says what was lost and what to do
    code = (f"import rpc_peer\nwhile True:\n    rpc_peer.run({smollm2_path!r}, {{servers!r}})\n    print('run', flush=True)\n")
    with _servers(1) as (servers, procs):
        peer = subprocess.Popen([sys.executable, "-c", code.format(servers=servers)], cwd=PEER.parent,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
        assert peer.stdout.readline().strip() == "run"  # one whole run went through the server
        procs[0].kill()
        try:
            _, err = peer.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            peer.kill()
            pytest.fail("the run hung after its RPC server was killed")
    assert peer.returncode != 0
    assert "RPC server crashed" in err and f"The layers on the RPC servers ({servers}) are lost" in err, err[-2000:]


def test_chat_and_the_api_with_rpc_answer_as_locally(smollm2_path):
    args = [sys.executable, "-m", "pyllmkv", "chat", smollm2_path, "-p", "Name three colours.", "--temp", "0", "-n", "16",
            "--kv-budget", "64", "-b", "32", "-t", "1"]
    # pyllmkv.Llama(rpc_servers=...): llama-cpp-python 0.3.36 takes the argument and ignores it; pyllmkv honours it
    api = ("import sys, pyllmkv\n"
           f"llm = pyllmkv.Llama({smollm2_path!r}, kv_budget=64, n_batch=32, n_threads=1, verbose=False, "
           "n_gpu_layers=99 if len(sys.argv) > 1 else 0, rpc_servers=sys.argv[1] if len(sys.argv) > 1 else None)\n"
           "out = llm.create_completion('The colours of the rainbow are red, orange and yellow. ' * 30, max_tokens=12, temperature=0)\n"
           "print(out['choices'][0]['text'], llm.kv_stats()['n_evictions'], llm.kv_stats()['window_attn_kernel'])\n")
    local = [subprocess.run(cmd, cwd=SUBPROCESS_CWD, capture_output=True, text=True, timeout=300)
             for cmd in (args, [sys.executable, "-c", api])]
    with _servers(2) as (servers, _):
        remote = [subprocess.run(cmd, cwd=SUBPROCESS_CWD, capture_output=True, text=True, timeout=300)
                  for cmd in (args + ["--rpc", servers, "-ngl", "99"], [sys.executable, "-c", api, servers])]
    assert all(p.returncode == 0 for p in local + remote), [p.stderr[-1000:] for p in local + remote]
    assert remote[0].stdout == local[0].stdout and local[0].stdout.strip()
    text, n_evictions, kernel = remote[1].stdout.rsplit(" ", 2)
    assert local[1].stdout.rsplit(" ", 2) == [text, n_evictions, "fused-cpu\n"] and kernel.strip() == "ggml-graph"
    assert int(n_evictions) > 0


def test_bench_with_rpc_runs_stock_and_pyllmkv_on_the_servers(tiny_path, tmp_path):
    # every job, stock llama.cpp's included, registers the servers with its own library; oracle: the same bench locally
    def bench(out: Path, *extra: str) -> list[dict]:
        cmd = [sys.executable, "-m", "pyllmkv", "bench", tiny_path, "--tiny", "--suite", "ppl", "-t", "1",
               "--ppl-policies", "criticalkv,snapkv", "-o", str(out), *extra]
        proc = subprocess.run(cmd, cwd=SUBPROCESS_CWD, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads((out / "results.json").read_text())["ppl"]

    local = bench(tmp_path / "local")
    with _servers(2) as (servers, _):
        remote = bench(tmp_path / "remote", "-ngl", "99", "--rpc", servers)
    assert [(r["engine"], r["policy"], r["budget"]) for r in remote] == [(r["engine"], r["policy"], r["budget"]) for r in local]
    assert {r["engine"] for r in remote} == {"stock", "stock-shift", "pyllmkv"}
    for r, l in zip(remote, local):
        assert [d for d in r["devices"] if d.startswith("RPC")] == ["RPC0", "RPC1"] and "devices" not in l
        np.testing.assert_allclose(r["ppl"], l["ppl"], rtol=1e-3)
        if r["policy"] == "criticalkv":  # the value norms were computed where the cache lives
            assert (r["value_norm_kernel"], l["value_norm_kernel"]) == ("ggml-graph", "fused-cpu")
