#!/usr/bin/env python3
"""A change's effect on prefill and decode: the same Python, two builds of pyllmkv's library, side by side.

    python scripts/lib_ab.py [MODEL] --lib A_BIN --lib B_BIN [--policies criticalkv,criticalkv-ada]
                             [--context 4096] [--budget 2048] [-n 64] [--rounds 3] [-t 2] [-o FILE]

Each (library, policy) prefills the same licence text (--context tokens, batches of 512) through the policy's cells,
evicting to --budget, then decodes -n tokens greedily, in a fresh process; rounds interleave them. Prints each run
and, per (library, policy), the medians of prefill tokens/s and decode milliseconds per token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_ab import N_BATCH, PACKAGE, by_path, interleave, licence_tokens, write_out  # noqa: E402


def one_run(a) -> dict:
    sys.path.insert(0, str(PACKAGE.parent))
    import pyllmkv
    from pyllmkv import _lib
    from pyllmkv.session import Session

    worker = by_path("worker", PACKAGE / "bench" / "worker.py")
    evict = pyllmkv.EvictConfig.for_cells(a.budget, policy=a.policies)
    llm = pyllmkv.llama_cpp.Llama(model_path=a.model, n_ctx=evict.cells + N_BATCH, n_batch=N_BATCH, n_ubatch=N_BATCH,
                                  n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
    stream = worker.PyllmkvStream(_lib, Session(llm, evict))
    speed = worker.time_speed(stream, licence_tokens(llm, a.context), a.n_decode)
    return {"lib": os.environ["PYLLMKV_LIB_DIR"], "policy": a.policies, "prefill_tps": speed["prefill_tps"],
            "decode_ms": speed["decode_s"] / a.n_decode * 1e3, "cells": stream.counters()["cells"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--lib", action="append", default=[], help="a build's bin folder (PYLLMKV_LIB_DIR); give two or more")
    ap.add_argument("--policies", default="criticalkv,criticalkv-ada")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("-n", dest="n_decode", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-t", dest="threads", type=int, default=2)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process's run
    ap.add_argument("-o", "--out", type=Path, help="also write the runs and medians to this JSON file")
    a = ap.parse_args()
    if a.one:  # the library comes from PYLLMKV_LIB_DIR
        print(json.dumps(one_run(a)))
        return
    if len(a.lib) < 2:
        ap.error("give --lib at least twice: the builds to compare")
    sys.path.insert(0, str(PACKAGE.parent))
    from pyllmkv import models

    a.model = a.model or str(models.qwen25_coder_1_5b())
    args = [a.model, "--context", str(a.context), "--budget", str(a.budget), "-n", str(a.n_decode),
            "-t", str(a.threads)]
    configs = [(str(Path(lib).resolve()), policy) for policy in a.policies.split(",") for lib in a.lib]
    runs = interleave(a.rounds, [([__file__, *args, "--policies", policy, "--one"], dict(os.environ, PYLLMKV_LIB_DIR=lib))
                                 for lib, policy in configs])
    medians = []
    for lib, policy in configs:
        mine = [r for r in runs if r["lib"] == lib and r["policy"] == policy]
        medians.append({"lib": lib, "policy": policy, **{k: statistics.median(r[k] for r in mine)
                                                         for k in ("prefill_tps", "decode_ms", "cells")}})
        m = medians[-1]
        print(f"{lib:<40} {policy:<16} prefill {m['prefill_tps']:6.1f} tok/s  decode {m['decode_ms']:5.2f} ms/token  "
              f"cells {m['cells']:.0f}")
    write_out(a.out, runs, medians)


if __name__ == "__main__":
    main()
