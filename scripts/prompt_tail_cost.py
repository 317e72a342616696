"""What the prompt tail costs: prefill time and peak RSS of one long prompt with and without it, alternating, each run
in a fresh process. Usage: python scripts/prompt_tail_cost.py [--model M] [--tokens 4096] [--budget 1024] [--runs 3]"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def one(model: str, tokens: int, budget: int, tail: bool) -> dict:
    import pyllmkv
    from pyllmkv.bench import haystack

    llm = pyllmkv.Llama(model, kv_budget=budget, prompt_tail=tail, n_threads=2, n_threads_batch=2, verbose=False)
    text, _ = haystack.text()
    prompt = llm.tokenize(text.encode())[:tokens]
    t0 = time.perf_counter()
    llm.eval(prompt)
    return {"prefill_s": time.perf_counter() - t0, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "n_evictions": llm.kv_stats()["n_evictions"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--one", choices=["0", "1"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.model is None:
        from pyllmkv import models

        a.model = str(models.smollm2())
    if a.one:
        print(json.dumps(one(a.model, a.tokens, a.budget, a.one == "1")))
        return
    runs: dict = {"1": [], "0": []}
    for _ in range(a.runs):
        for tail in ("1", "0"):
            out = subprocess.run([sys.executable, __file__, "--model", a.model, "--tokens", str(a.tokens), "--budget",
                                  str(a.budget), "--one", tail], capture_output=True, text=True, check=True)
            runs[tail].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for tail, label in (("1", "prompt tail"), ("0", "no prompt tail")):
        s = [r["prefill_s"] for r in runs[tail]]
        print(f"{label}: prefill {statistics.median(s):.2f} s ({min(s):.2f}-{max(s):.2f}), peak RSS "
              f"{statistics.median(r['peak_rss_mib'] for r in runs[tail]):.1f} MiB, evictions {runs[tail][0]['n_evictions']}")
    ratio = statistics.median(r["prefill_s"] for r in runs["1"]) / statistics.median(r["prefill_s"] for r in runs["0"])
    print(f"prefill ratio prompt tail / none: {ratio:.3f}")


if __name__ == "__main__":
    main()
