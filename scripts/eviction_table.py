"""Token vs head granularity, criticalkv vs criticalkv-ada vs snapkv, on one long text, side by side in one run.

    python scripts/eviction_table.py [--tokens 4096] [--budget 512] [--batch 512] [--next 32] [--repeat 3]

Each configuration prefills --tokens tokens of text through a --budget-cell cache (chunks of --batch, evicting before
a chunk that would not fit), evicts down to the budget, then decodes the --next tokens that follow in the text one by
one (teacher-forced). Columns: KV bytes llama.cpp allocated and cells held after that last eviction; time in
llama_kv_evict as a fraction of the rest of the run (median of --repeat runs, min-max); the mean KL divergence of the
next-token distribution from the full cache's over the --next tokens. The full cache is the same model with every
token in its cache. The text is the GPL-3 licence that Debian ships in /usr/share/common-licenses (real English).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

import pyllmkv
from pyllmkv import _lib, models
from pyllmkv.session import Session

CONFIGS = [("token", "criticalkv"), ("token", "snapkv"), ("head", "criticalkv"), ("head", "snapkv"),
           ("head", "criticalkv-ada"), ("head", "snapkv-ada")]


def text() -> str:
    for p in ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/GPL-2"):
        if Path(p).exists():
            return Path(p).read_text() * 3
    raise SystemExit("no licence text found in /usr/share/common-licenses")


def session(model: str, n_batch: int, config=None, n_ctx: int = 0, threads: int = 2, n_gpu_layers: int = 0) -> Session:
    """A context sized for `config` (budget + n_batch cells, more for -ada), or n_ctx cells without eviction."""
    n_ctx = config.cells + n_batch if config else n_ctx
    llm = pyllmkv.llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                  verbose=False, n_threads=threads, n_threads_batch=threads, n_gpu_layers=n_gpu_layers)
    return Session(llm, config)


def run(sess: Session, prompt, following):
    """Prefill, evict to the budget, decode the following tokens; returns (log-probs [n, vocab], seconds)."""
    t0 = time.perf_counter()
    sess.decode(prompt)
    sess.evict()
    cells = _lib.stats(sess.ctx)["n_seq_cells"]
    logits = [sess.decode([t]) for t in following]
    seconds = time.perf_counter() - t0
    logits = np.array(logits, dtype=np.float64)
    logp = logits - logits.max(axis=-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=-1, keepdims=True))
    return logp, seconds, cells


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--next", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    model = a.model or str(models.smollm2())

    full = session(model, a.batch, n_ctx=a.tokens + a.next + a.batch)
    tokens = full.llm.tokenize(text().encode())[: a.tokens + a.next]
    prompt, following = tokens[: a.tokens], tokens[a.tokens :]
    ref, _, full_cells = run(full, prompt, following)
    full_mib = _lib.stats(full.ctx)["kv_bytes"] / 2**20
    del full

    rows = []
    for granularity, policy in CONFIGS:
        config = pyllmkv.EvictConfig(budget=a.budget, policy=policy, granularity=granularity, window=a.window)
        ratios = []
        for r in range(a.repeat):
            sess = session(model, a.batch, config)
            logp, seconds, cells = run(sess, prompt, following)
            st = _lib.stats(sess.ctx)
            evict = st["t_evict_us"] / 1e6
            ratios.append(evict / (seconds - evict))
            if r == 0:
                kl = float(np.mean(np.sum(np.exp(ref) * (ref - logp), axis=-1)))
                kv_mib, n_evictions = st["kv_bytes"] / 2**20, st["n_evictions"]
            del sess
        rows.append((granularity, policy, kv_mib, cells, statistics.median(ratios), min(ratios), max(ratios), n_evictions, kl))
        print(f"{granularity} {policy}: done", flush=True)

    print(f"\nSmolLM2-135M-Instruct ({Path(model).name}), {a.tokens} tokens, budget {a.budget}, window {a.window}, "
          f"batch {a.batch}, 2 threads; KL over the next {a.next} tokens; times: median of {a.repeat}\n")
    print("| granularity | policy | KV MiB allocated | cells after eviction | evict / rest of run (min-max) | evictions | KL vs full cache |")
    print("|---|---|---|---|---|---|---|")
    print(f"| - | full cache | {full_mib:.1f} | {full_cells} | - | 0 | 0 |")
    for g, p, mib, cells, med, lo, hi, n, kl in rows:
        print(f"| {g} | {p} | {mib:.1f} | {cells} | {med:.3f} ({lo:.3f}-{hi:.3f}) | {n} | {kl:.4f} |")


if __name__ == "__main__":
    main()
