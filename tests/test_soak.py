"""A reduced soak in CI: a long generated conversation on the tiny model through a small budget. Cells stay within
the bound after every turn, evictions keep happening, and RSS stays flat after warm-up (within 8 MiB). The full soak
(100,000 generated tokens of SmolLM2 at budget 512) is `python scripts/soak.py`."""

from __future__ import annotations

from pyllmkv._lib import EvictConfig
from pyllmkv.session import Session
from soak import rss_mib, soak
from test_hook import _llama


def test_generated_tokens_through_a_small_budget(llama_cpp, tiny_path):
    budget, n_batch = 64, 32
    config = EvictConfig(budget=budget, window=8, policy="criticalkv")
    llm = _llama(llama_cpp, tiny_path, "f16", n_ctx=config.cells + n_batch, n_batch=n_batch)
    samples = soak(Session(llm, config), n_tokens=6000, every=500, seed=7)
    cells = [s["n_seq_cells"] for s in samples]
    evictions = [s["n_evictions"] for s in samples]
    assert max(cells) <= config.cells + n_batch
    assert all(b > a for a, b in zip(evictions, evictions[1:])), "evictions keep happening"
    rss = [s["rss_mib"] for s in samples[2:]]
    assert max(rss) - min(rss) < 8, rss
    assert rss_mib() > 0
