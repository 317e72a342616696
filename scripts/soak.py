"""Soak: a long generated conversation through a fixed budget; RSS and cells sampled every --every tokens.

    python scripts/soak.py [--tokens 100000] [--budget 512] [--every 1000] [--model MODEL.gguf]

The model's own sampled tokens are fed back one by one, with a 32-token "user turn" of random tokens every 500, on
the default model (SmolLM2) unless --model. Prints one line per sample and fails if the cells ever pass budget +
batch, if evictions stop, or if RSS after the first two samples grows by more than --rss-tolerance MiB.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import pyllmkv
from pyllmkv import _lib, models
from pyllmkv.session import Session

sys.path.insert(0, os.path.dirname(__file__))
from eviction_table import session  # noqa: E402


def rss_mib(pid: int | str = "self") -> float:
    """Resident memory of a process (this one by default), from /proc."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def soak(sess: Session, n_tokens: int, every: int, seed: int = 0, temperature: float = 0.8, report=None) -> list:
    """Generates n_tokens through sess; returns kv stats + rss_mib + tokens sampled every `every` tokens."""
    rng = np.random.default_rng(seed)
    n_vocab = sess.n_vocab
    logits = sess.decode([1])
    samples = []
    for i in range(1, n_tokens + 1):
        if i % 500 == 0:
            logits = sess.decode([int(t) for t in rng.integers(0, n_vocab, 32)])
        p = np.exp((logits - logits.max()) / temperature)
        logits = sess.decode([int(rng.choice(n_vocab, p=p / p.sum()))])
        if i % every == 0:
            s = _lib.stats(sess.ctx)
            s.update(tokens=i, rss_mib=rss_mib())
            samples.append(s)
            if report:
                report(s)
    return samples


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--policy", default="criticalkv")
    ap.add_argument("--rss-tolerance", type=float, default=16.0)
    a = ap.parse_args()
    config = pyllmkv.EvictConfig(budget=a.budget, policy=a.policy)
    t0 = time.perf_counter()
    samples = soak(session(a.model or str(models.smollm2()), a.batch, config), a.tokens, a.every, report=lambda s: print(
        f"{s['tokens']:>7} tokens  {time.perf_counter() - t0:7.0f} s  cells {s['n_seq_cells']:>5}  "
        f"evictions {s['n_evictions']:>5}  RSS {s['rss_mib']:.1f} MiB", flush=True))
    cells = max(s["n_seq_cells"] for s in samples)
    rss = [s["rss_mib"] for s in samples[2:]] or [0.0]
    stalled = any(b["n_evictions"] == a_["n_evictions"] for a_, b in zip(samples, samples[1:]))
    print(f"max cells {cells} (bound {config.cells + a.batch}), RSS {min(rss):.1f}-{max(rss):.1f} MiB after warm-up, "
          f"evictions {samples[-1]['n_evictions']}{' (stalled between samples!)' if stalled else ''}")
    if cells > config.cells + a.batch or max(rss) - min(rss) > a.rss_tolerance or stalled:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
