"""What loading a CPU model without llama.cpp's repacked weight layouts (pyllmkv's default) changes, side by side with
llama.cpp's layouts for every weight but W_O (`--repack`) and for all of them (as stock llama.cpp loads it).

    python scripts/repack_effect.py [MODEL] [--runs 2] [--threads 2] [--budget 512] [--policy criticalkv]

Each run is a fresh process (peak RSS is per process) that prefills 1,024 tokens of licence text, evicts to the
budget, decodes 32 tokens one at a time, prefills 512 more and evicts again; runs alternate the layouts. Prints
each run and the medians: prefill, first and second eviction, the 32 decodes, peak RSS, and the value-norm kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def one_run(model: str, layout: str, threads: int, budget: int, policy: str) -> dict:
    import pyllmkv
    from pyllmkv import _lib
    from pyllmkv.bench.worker import peak_rss_mib
    from pyllmkv.session import Session

    sys.path.insert(0, os.path.dirname(__file__))
    from eviction_table import text

    config = pyllmkv.EvictConfig(budget=budget, window=32, policy=policy)
    with _lib.cpu_weights(layout):
        llm = pyllmkv.llama_cpp.Llama(model_path=model, n_ctx=config.cells + 512, n_batch=512, n_ubatch=512,
                                      verbose=False, n_threads=threads, n_threads_batch=threads)
    sess = Session(llm, config)
    tokens = llm.tokenize(text().encode())[:1568]
    t = [time.perf_counter()]
    sess.decode(tokens[:1024])
    t.append(time.perf_counter())
    sess.evict()
    t.append(time.perf_counter())
    for token in tokens[1024:1056]:
        sess.decode([token])
    t.append(time.perf_counter())
    sess.decode(tokens[1056:])
    t.append(time.perf_counter())
    sess.evict()
    t.append(time.perf_counter())
    return {"weights": layout, "prefill_s": t[1] - t[0], "evict1_s": t[2] - t[1], "decode32_s": t[3] - t[2],
            "evict2_s": t[5] - t[4], "peak_rss_mib": peak_rss_mib(),
            "value_norm_kernel": _lib.stats(llm)["value_norm_kernel"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--policy", default="criticalkv")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child process's run: its layout
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one_run(a.model, a.one, a.threads, a.budget, a.policy)))
        return
    if not a.model:
        from pyllmkv import models
        a.model = str(models.qwen25_coder_1_5b())
    rows = []
    for _ in range(a.runs):
        for mode in ("repack-all", "repack", "plain"):
            out = subprocess.run([sys.executable, __file__, a.model, "--one", mode, "--threads", str(a.threads),
                                  "--budget", str(a.budget), "--policy", a.policy],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    for mode in ("repack-all", "repack", "plain"):
        runs = [r for r in rows if r["weights"] == mode]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k.endswith(("_s", "_mib"))}
        print(f"{mode:<10}", runs[0]["value_norm_kernel"],
              " ".join(f"{k} {v:.2f}" if k.endswith("_s") else f"{k} {v:.0f}" for k, v in med.items()))


if __name__ == "__main__":
    main()
