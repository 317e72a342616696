"""Time of llama_kv_evict as a fraction of decode time: a long text through a small budget, in one run.

    python scripts/evict_overhead.py [--tokens 4096] [--budget 512] [--batch 512] [--policy criticalkv] [--repeat 3]

The text is the GPL-3 licence that Debian ships in /usr/share/common-licenses (real English, ~8k tokens).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pyllmkv
from pyllmkv import _lib, models
from pyllmkv.session import Session


def text() -> str:
    for p in ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/GPL-2"):
        if Path(p).exists():
            return Path(p).read_text() * 3
    raise SystemExit("no licence text found in /usr/share/common-licenses")


def session(model: str, budget: int, n_batch: int, policy: str) -> Session:
    """A 2-thread context holding budget + n_batch cells, eviction enabled."""
    llm = pyllmkv.llama_cpp.Llama(model_path=model, n_ctx=budget + n_batch, n_batch=n_batch, n_ubatch=n_batch,
                                  verbose=False, n_threads=2, n_threads_batch=2)
    return Session(llm, pyllmkv.EvictConfig(budget=budget, policy=policy))


def run(model: str, n_tokens: int, budget: int, n_batch: int, policy: str):
    sess = session(model, budget, n_batch, policy)
    llm = sess.llm
    tokens = llm.tokenize(text().encode())[:n_tokens]
    t0 = time.perf_counter()
    sess.decode(tokens)
    total = time.perf_counter() - t0
    st = _lib.stats(llm)
    evict = st["t_evict_us"] / 1e6
    return evict, total - evict, st["n_evictions"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--policy", default="criticalkv")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    model = a.model or str(models.smollm2())
    runs = [run(model, a.tokens, a.budget, a.batch, a.policy) for _ in range(a.repeat)]
    ratios = [e / d for e, d, _ in runs]
    print(f"{a.policy}: {a.tokens} tokens, budget {a.budget}, batch {a.batch}: {runs[0][2]} evictions; "
          f"evict/decode time = {statistics.median(ratios):.3f} (median of {a.repeat}; "
          f"min {min(ratios):.3f}, max {max(ratios):.3f}); decode {statistics.median(d for _, d, _ in runs):.2f} s, "
          f"evict {statistics.median(e for e, _, _ in runs):.2f} s")


if __name__ == "__main__":
    main()
