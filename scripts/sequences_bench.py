"""Several conversations in one context against the same conversations one after another (issue 26's library row).

  python scripts/sequences_bench.py MODEL [--n-seq 4] [--context 2048] [--n-gen 128] [--budget 1024] [--repeat 3]

Each conversation reads `context` tokens of Debian's GPL-3 (each from its own offset), then generates `n_gen` tokens
greedily, with the library's default policy evicting down to `budget` cells. `together`: the n_seq conversations in one
context (pyllmkv.sequences.Sequences), their prompts sharing batches, then one token of each per decode. `one by one`:
the same conversations in turn through one single-sequence Session, as a server with one slot serves them. Runs are
child processes, interleaved; prints one JSON line per run, then the medians and whether both generated the same tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def one_run(model: str, mode: str, n_seq: int, context: int, n_gen: int, budget: int) -> dict:
    import numpy as np

    import pyllmkv
    from pyllmkv import _lib
    from pyllmkv._lib import EvictConfig
    from pyllmkv.sequences import Sequences
    from pyllmkv.session import Session, context_size

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from eviction_table import text

    config = EvictConfig.for_cells(budget)
    n_ctx = context_size(0, config.cells, 512)
    llm = pyllmkv.llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=2,
                                  n_threads_batch=2, verbose=False)
    tokens = llm.tokenize(text().encode())
    step = (len(tokens) - context) // max(n_seq - 1, 1)
    prompts = [tokens[s * step : s * step + context] for s in range(n_seq)]
    out = [[] for _ in range(n_seq)]
    t0 = time.perf_counter()
    if mode == "together":
        seqs = Sequences(llm, config, n_seq, n_batch=512)
        logits = seqs.decode(dict(enumerate(prompts)))
        t1 = time.perf_counter()
        for _ in range(n_gen):
            nxt = {s: int(np.argmax(logits[s])) for s in range(n_seq)}
            for s, t in nxt.items():
                out[s].append(t)
            logits = seqs.decode({s: [t] for s, t in nxt.items()})
        cells = max(seqs.stats(s)["n_seq_cells"] for s in range(n_seq))
        t_prefill, t_decode = t1 - t0, time.perf_counter() - t1
    else:
        sess = Session(llm, config)
        t_prefill = t_decode = 0.0
        cells = 0
        for s in range(n_seq):
            sess.reset()
            ta = time.perf_counter()
            logits = sess.decode(prompts[s])
            tb = time.perf_counter()
            for _ in range(n_gen):
                out[s].append(int(np.argmax(logits)))
                logits = sess.decode([out[s][-1]])
            t_prefill += tb - ta
            t_decode += time.perf_counter() - tb
            cells = max(cells, _lib.stats(sess.ctx)["n_seq_cells"])
    return {"mode": mode, "prefill_tok_s": n_seq * context / t_prefill, "decode_tok_s": n_seq * n_gen / t_decode,
            "seconds": time.perf_counter() - t0, "max_cells_per_seq": cells, "tokens": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--n-seq", type=int, default=4)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", default="")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_run(args.model, args.child, args.n_seq, args.context, args.n_gen, args.budget)))
        return
    runs = []
    for r in range(args.repeat):
        for mode in ("together", "one by one"):
            p = subprocess.run([sys.executable, __file__, args.model, "--n-seq", str(args.n_seq), "--context",
                                str(args.context), "--n-gen", str(args.n_gen), "--budget", str(args.budget), "--child", mode],
                               capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(p.stderr[-3000:])
            run = json.loads(p.stdout.strip().splitlines()[-1])
            run["repeat"] = r + 1
            runs.append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "tokens"}), flush=True)
    for mode in ("together", "one by one"):
        mine = [r for r in runs if r["mode"] == mode]
        print(json.dumps({"mode": mode, "median_prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in mine),
                          "median_decode_tok_s": statistics.median(r["decode_tok_s"] for r in mine),
                          "median_seconds": statistics.median(r["seconds"] for r in mine)}))
    together, alone = runs[0]["tokens"], runs[1]["tokens"]
    same = sum(a == b for ta, tb in zip(together, alone) for a, b in zip(ta, tb))
    print(json.dumps({"same_greedy_tokens": same, "of": args.n_seq * args.n_gen}))


if __name__ == "__main__":
    main()
