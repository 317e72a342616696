"""Whether renumbering keeps positions under Session.max_position, and what it costs in perplexity.

    python scripts/renumber_check.py [--tokens 6144] [--max-position 2048] [--policy criticalkv]
                                     [--granularity head|token] [--budget 1024] [MODEL]

Streams --tokens tokens of licence text through a budgeted Session in batches of 512 and prints the perplexity (and
per quarter of the stream), the position the next token would take (n_past) and the evictions. Compare a
--max-position above --tokens (no renumbering) with one below it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

import pyllmkv
from pyllmkv import _lib, models
from pyllmkv.surprisal import token_nll
from pyllmkv.session import Session

sys.path.insert(0, os.path.dirname(__file__))
from eviction_table import text  # noqa: E402

BATCH = 512


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--tokens", type=int, default=6144)
    ap.add_argument("--max-position", type=int, default=2048)
    ap.add_argument("--policy", default="criticalkv")
    ap.add_argument("--granularity", default="head", choices=["head", "token"])
    ap.add_argument("--budget", type=int, default=1024)
    a = ap.parse_args()
    config = pyllmkv.EvictConfig(budget=a.budget, window=32, policy=a.policy, granularity=a.granularity)
    llm = pyllmkv.llama_cpp.Llama(model_path=a.model or str(models.smollm2()), n_ctx=config.cells + BATCH,
                                  n_batch=BATCH, n_ubatch=BATCH, verbose=False, n_threads=2, n_threads_batch=2)
    sess = Session(llm, config, max_position=a.max_position)
    tokens = llm.tokenize((text() * 3).encode())[: a.tokens]
    nll = []
    for start in range(0, len(tokens) - 1, BATCH):
        logits = sess.decode(tokens[start : start + BATCH], all_logits=True)
        following = tokens[start + 1 : start + BATCH + 1]
        nll.extend(token_nll(logits[: len(following)], np.array(following)))
    nll = np.array(nll)
    quarter = len(nll) // 4
    print(json.dumps({
        "policy": a.policy, "granularity": a.granularity, "max_position": a.max_position,
        "ppl": round(float(np.exp(nll.mean())), 3),
        "ppl_quarters": [round(float(np.exp(nll[i * quarter : (i + 1) * quarter].mean())), 3) for i in range(4)],
        "n_past": sess.n_past, "n_evictions": _lib.stats(llm)["n_evictions"],
    }))


if __name__ == "__main__":
    main()
