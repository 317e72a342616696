"""Projected-value norms of 4k cells on SmolLM2: the fused CPU kernel vs the plain ggml graph, side by side.

    python scripts/value_norm_bench.py [--cells 4096] [--repeat 5] [--threads 2]

One process decodes --cells tokens of text once, then alternates the two kernels (LLAMA_KV_EVICT_VALUE_NORMS=graph
selects the graph) --repeat times, each on every cell of every layer, and prints the median time of each and the
ratio. The norm time is that of llama_kv_evict_scores with norms less that of the same call without them; the extra
memory is the compute buffers the hook's graphs needed (llama_kv_evict_stats.scoring_bytes), the kernels' own
scratch (the fused kernel's W_O tile, 32 x n_head*hd floats per thread) aside.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pyllmkv
from pyllmkv import _lib, models

sys.path.insert(0, os.path.dirname(__file__))
from eviction_table import session, text  # noqa: E402


def prepared(cells: int, threads: int):
    config = pyllmkv.EvictConfig(budget=cells + 64, window=32)  # no eviction: every cell stays to be scored
    sess = session(str(models.smollm2()), 512, config, threads=threads)
    sess.decode(sess.llm.tokenize(text().encode())[:cells])
    return sess.llm, sess, config


def norm_run(llm, sess, config, kernel: str):
    """Seconds of computing every cell's norms with `kernel` (re-enabling drops the cached norms), and the compute
    buffers the hook's graphs needed for it (llama_kv_evict_stats.scoring_bytes)."""
    os.environ.pop("LLAMA_KV_EVICT_VALUE_NORMS", None)
    if kernel == "ggml-graph":
        os.environ["LLAMA_KV_EVICT_VALUE_NORMS"] = "graph"
    n_kv = int(pyllmkv.llama_cpp.llama_model_n_head_kv(llm._model.model))
    _lib.enable(llm, config)
    sess.decode([13])  # a query for the window
    t0 = time.perf_counter()
    _lib.scores(llm, 0, n_kv, value_norms=False)
    t1 = time.perf_counter()
    _lib.scores(llm, 0, n_kv, value_norms=True)
    t2 = time.perf_counter()
    st = _lib.stats(llm)
    assert st["value_norm_kernel"] == kernel
    sess.truncate(sess.n_past - 1)
    return (t2 - t1) - (t1 - t0), st["scoring_bytes"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    llm, sess, config = prepared(a.cells, a.threads)
    times = {"fused-cpu": [], "ggml-graph": []}
    buffers = {}
    for _ in range(a.repeat):
        for kernel in times:
            seconds, buffers[kernel] = norm_run(llm, sess, config, kernel)
            times[kernel].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"SmolLM2-135M-Instruct, {a.cells} cells x 30 layers x 9 heads, {a.threads} threads, median of {a.repeat}:")
    for k, v in times.items():
        print(f"  {k:10s} {med[k]:.3f} s (min {min(v):.3f}, max {max(v):.3f}); hook compute buffers {buffers[k] / 2**20:.1f} MiB")
    print(f"  graph / fused = {med['ggml-graph'] / med['fused-cpu']:.2f}")


if __name__ == "__main__":
    main()
