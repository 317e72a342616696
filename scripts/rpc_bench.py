"""Eviction with the layers on ggml-rpc-servers against the same run on the local CPU (issue 27's measured row).

  python scripts/rpc_bench.py MODEL [--context 8192] [--budget 1024] [--repeat 2]

Starts two ggml-rpc-servers on 127.0.0.1 (2 threads each, like the local run), then runs, in a child process per run and
interleaved: local (every layer on this CPU) and rpc (-ngl 99, the layers split across the two servers). Each run
prefills `context` tokens of Debian's GPL-3 through `budget` cells (evicting between 512-token batches), decodes 64
tokens, then fills the cache past its budget once more and evicts once. One more rpc run, not timed, goes through
relays that count the bytes the connections carry around that eviction: what one eviction adds to the RPC traffic. Prints one JSON line per
run and the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import time



class CountingProxy:
    """A TCP relay from a free port on 127.0.0.1 to `target`, counting the bytes it carries both ways (threads of
    this process: they run while the main thread is inside llama.cpp, which releases the GIL)."""

    def __init__(self, target: str):
        import threading

        host, _, port = target.rpartition(":")
        self.target, self.bytes = (host, int(port)), 0
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(self.target)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 20):
                with self.lock:
                    self.bytes += len(data)
                dst.sendall(data)
        # ggml-rpc-server serves one client at a time: a closed client must close its server connection too
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def one_run(model: str, context: int, budget: int, servers: str, counted: bool) -> dict:
    import pyllmkv
    from pyllmkv import _lib, rpc
    from pyllmkv.session import Session
    from eviction_table import text

    proxies = [CountingProxy(e) for e in servers.split(",")] if counted else []
    if servers:
        rpc.add_servers(",".join(p.endpoint for p in proxies) if counted else servers)
    n_batch = 512
    config = pyllmkv.EvictConfig.for_cells(budget)
    llm = pyllmkv.llama_cpp.Llama(model_path=model, n_ctx=config.cells + n_batch, n_batch=n_batch, n_ubatch=n_batch,
                                  n_gpu_layers=99 if servers else 0, n_threads=2, n_threads_batch=2, verbose=False)
    sess = Session(llm, config)
    tokens = llm.tokenize(text().encode())
    assert len(tokens) >= context + 700, "text too short"
    t0 = time.perf_counter()
    logits = sess.decode(tokens[:context])
    prefill = context / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(64):
        logits = sess.decode([int(logits.argmax())])
    decode = 64 / (time.perf_counter() - t0)
    sess.decode(tokens[context : context + 600])  # past the budget again; the next evict has cells to drop
    before, t_before = sum(p.bytes for p in proxies), _lib.stats(llm)["t_evict_us"]
    _lib.evict(llm)
    stats = _lib.stats(llm)
    return dict(engine="rpc-counted" if counted else "rpc" if servers else "local", prefill_tok_s=prefill, decode_tok_s=decode,
                evict_ms=(stats["t_evict_us"] - t_before) / 1e3, evict_bytes=sum(p.bytes for p in proxies) - before,
                n_evictions=stats["n_evictions"], kernel=stats["window_attn_kernel"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--bytes-only", action="store_true", help="only the counted run (its bytes do not depend on load)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        spec = json.loads(args.child)
        print(json.dumps(one_run(args.model, args.context, args.budget, spec["servers"], spec["counted"])))
        return

    from pyllmkv import rpc

    ports, procs = [], []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        procs.append(subprocess.Popen([str(rpc.server_path()), "-H", "127.0.0.1", "-p", str(ports[-1]), "-t", "2"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(2)
    servers = ",".join(f"127.0.0.1:{p}" for p in ports)
    rows = []
    try:
        for _ in range(1 if args.bytes_only else args.repeat):
            specs = [] if args.bytes_only else [dict(servers="", counted=False), dict(servers=servers, counted=False)]
            if not rows:  # once: the bytes one eviction sends, through counting relays (which slow that run)
                specs.append(dict(servers=servers, counted=True))
            for spec in specs:
                out = subprocess.run([sys.executable, __file__, args.model, "--context", str(args.context), "--budget",
                                      str(args.budget), "--child", json.dumps(spec)], capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(out.stderr[-3000:])
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        for p in procs:
            p.kill()
    for engine in ("local", "rpc", "rpc-counted"):
        r = [x for x in rows if x["engine"] == engine]
        if not r:
            continue
        print(json.dumps({"engine": engine, "median": {k: statistics.median(x[k] for x in r)
                                                        for k in ("prefill_tok_s", "decode_tok_s", "evict_ms", "evict_bytes")}}))


if __name__ == "__main__":
    main()
