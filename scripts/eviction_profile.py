#!/usr/bin/env python3
"""Where an eviction's time goes: the prefill of a long text through a --kv-budget cache, per policy and context, with
the time of each part of llama_kv_evict (pyllmkv.debug.profile) and of the prompt tail's queries beside the decode.

Each (context, policy) prefills the text as `pyllmkv bench --suite speed` does (pyllmkv's Session, batches of -b,
the prompt tail on), in a fresh process, --repeat times interleaved; the table gives medians: prefill tokens/s, the
share of the prefill wall time spent evicting, in the prompt tail and turning logits into surprisal on the host
(WordSurprisal.read), the rest (llama_decode) per token, and milliseconds per eviction by phase.

    python scripts/eviction_profile.py smollm2-135m --contexts 16384,32768 --out docs/bench/smollm2-135m-eviction-profile
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PHASES = ("settle", "norms", "score", "select", "compact")


def one(model: str, context: int, policy: str, budget: int, n_batch: int, threads: int) -> dict:
    """One prefill in this process: wall, prompt tail, surprisal and eviction seconds by phase."""
    import pyllmkv
    from pyllmkv import _lib, debug
    from pyllmkv.bench import haystack
    from pyllmkv.session import PromptTail, Session, context_size, sliding_window
    from pyllmkv.surprisal import WordSurprisal

    config = pyllmkv.EvictConfig.for_cells(budget, policy=policy)
    llm = pyllmkv.llama_cpp.Llama(model_path=model, n_ctx=context_size(sliding_window(model), config.cells, n_batch),
                                  n_batch=n_batch, n_ubatch=n_batch, n_threads=threads, n_threads_batch=threads,
                                  verbose=False)
    text, _ = haystack.text()
    hay = llm.tokenize(text.encode(), add_bos=False)
    tokens = (llm.tokenize(b"", add_bos=True) + hay * (context // len(hay) + 1))[:context]
    session = Session(llm, config)
    spent = {"tail_s": 0.0, "surprisal_s": 0.0}

    def timed(cls, method: str, key: str) -> None:
        inner = getattr(cls, method)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t0

        setattr(cls, method, wrapper)

    timed(PromptTail, "queries", "tail_s")
    timed(WordSurprisal, "read", "surprisal_s")
    t0 = time.perf_counter()
    session.decode(tokens)
    session.evict()
    wall = time.perf_counter() - t0
    st = _lib.stats(session.ctx)
    return dict(wall_s=wall, **spent, evict_s=st["t_evict_us"] / 1e6, n_evictions=st["n_evictions"],
                **debug.profile(session.ctx))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--contexts", default="16384,32768")
    ap.add_argument("--policies", default="criticalkv,snapkv,defensivekv-layer,criticalkv-ada")
    ap.add_argument("--kv-budget", type=int, default=1024)
    ap.add_argument("-b", "--n-batch", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from pyllmkv import models

    model = args.model if Path(args.model).exists() else str(models.MODELS[args.model].path())
    if args.one:
        context, policy = args.one.split(":")
        print(json.dumps(one(model, int(context), policy, args.kv_budget, args.n_batch, args.threads)))
        return

    runs: dict = {}
    for _ in range(args.repeat):
        for context in map(int, args.contexts.split(",")):
            for policy in args.policies.split(","):
                cmd = [sys.executable, __file__, model, "--one", f"{context}:{policy}", "--kv-budget", str(args.kv_budget),
                       "-b", str(args.n_batch), "-t", str(args.threads)]
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                runs.setdefault((context, policy), []).append(r)
                print(context, policy, json.dumps(r), flush=True)

    rows = []
    for (context, policy), rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        n = max(med["n_evictions"], 1)
        rows.append(dict(context=context, policy=policy, prefill_tps=round(context / med["wall_s"], 1),
                         evict_share=round(med["evict_s"] / med["wall_s"], 3), tail_share=round(med["tail_s"] / med["wall_s"], 3),
                         surprisal_share=round(med["surprisal_s"] / med["wall_s"], 3),
                         decode_ms_per_token=round(1e3 * (med["wall_s"] - med["evict_s"] - med["tail_s"]
                                                          - med["surprisal_s"]) / context, 2),
                         n_evictions=int(med["n_evictions"]), ms_per_eviction=round(1e3 * med["evict_s"] / n, 1),
                         **{f"{p}_ms": round(1e3 * med[p] / n, 1) for p in PHASES}))
    if not args.out:
        print(json.dumps(rows, indent=1))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python scripts/eviction_profile.py " + " ".join(sys.argv[1:])
    (out / "results.json").write_text(json.dumps(dict(command=command, model=Path(model).name, runs=[
        dict(context=c, policy=p, runs=rs) for (c, p), rs in runs.items()], rows=rows), indent=1) + "\n")
    runs_said = f"medians of {args.repeat} runs" if args.repeat > 1 else "one run each"
    lines = [f"# Where an eviction's time goes ({Path(model).name}, budget {args.kv_budget}, -b {args.n_batch}, "
             f"-t {args.threads}, {runs_said})", "", f"`{command}`", "",
             "| context | policy | prefill tok/s | evicting | prompt tail | surprisal | decoding, ms per token | evictions "
             "| ms per eviction | " + " | ".join(f"{p} ms" for p in PHASES) + " |", "|---" * (9 + len(PHASES)) + "|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['policy']} | {r['prefill_tps']} | {100 * r['evict_share']:.1f} % | "
                     f"{100 * r['tail_share']:.1f} % | {100 * r['surprisal_share']:.1f} % | {r['decode_ms_per_token']} | "
                     f"{r['n_evictions']} | {r['ms_per_eviction']} | "
                     + " | ".join(str(r[f'{p}_ms']) for p in PHASES) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
