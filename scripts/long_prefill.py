"""A very long prompt through a small budget: the cache must never grow past budget + n_batch cells.

    python scripts/long_prefill.py [--tokens 100000] [--budget 1024] [--batch 512] [--policy criticalkv]

Prints the largest cell counts llama.cpp reported after any batch, the peak RSS, and the time.
"""

from __future__ import annotations

import argparse
import resource
import time

import pyllmkv
from pyllmkv import _lib, models
from eviction_table import session, text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--policy", default="criticalkv")
    a = ap.parse_args()
    model = a.model or str(models.smollm2())
    sess = session(model, a.batch, pyllmkv.EvictConfig(budget=a.budget, policy=a.policy))
    llm = sess.llm
    piece = llm.tokenize(text().encode(), add_bos=False)
    tokens = (piece * (a.tokens // len(piece) + 1))[: a.tokens]
    peak = {"n_seq_cells": 0, "n_cells_used": 0}
    rss = []

    def on_batch(done, total):
        st = _lib.stats(llm)
        for k in peak:
            peak[k] = max(peak[k], st[k])
        if done % (20 * a.batch) == 0:
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

    t0 = time.perf_counter()
    sess.decode(tokens, on_batch=on_batch)
    dt = time.perf_counter() - t0
    st = _lib.stats(llm)
    print(f"{a.tokens} tokens, budget {a.budget}, batch {a.batch}, {a.policy}: max cells of the sequence "
          f"{peak['n_seq_cells']}, max cells used {peak['n_cells_used']} (bound {a.budget + a.batch}), "
          f"cache {st['kv_size']} cells / {st['kv_bytes'] / 2**20:.1f} MiB, {st['n_evictions']} evictions, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
          f"(sampled every {20 * a.batch} tokens: {[r // 1024 for r in rss]}), {dt:.0f} s")


if __name__ == "__main__":
    main()
