#!/usr/bin/env python3
"""Several conversations at once on llama-server: pyllmkv's slots (each within --kv-budget) against one slot and
against llama-server without eviction (the full cache, and context shift in a slot of the budget's size).

Each client holds one conversation that grows turn by turn to about --tokens tokens: a turn sends the whole
conversation so far plus --chunk new tokens of text (Debian's licence texts) and asks for --n-predict tokens, with
llama-server's prompt reuse (cache_prompt), as a chat client does. Reports per server the conversations completed,
the wall time until all ended, the prompt tokens decoded and reused, the generated tokens per second over all clients
and the median turn latency. Writes results.json and results.md under --out.

    python scripts/parallel_bench.py smollm2-135m --out docs/bench/smollm2-135m-parallel-7k
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llama_server import Server
from pyllmkv import models, parallel
from pyllmkv._lib import EvictConfig
from pyllmkv.session import context_size, sliding_window

LICENCES = ["GPL-3", "GPL-2", "Apache-2.0", "LGPL-3", "LGPL-2.1", "MPL-2.0", "CC0-1.0", "Artistic"]


def corpus() -> list[str]:
    words = []
    for name in LICENCES:
        p = Path("/usr/share/common-licenses") / name
        if p.exists():
            words += p.read_text().split()
    return words


def conversation(server: Server, words: list[str], start: int, args) -> dict:
    """One client's conversation; stops at its first error (the server refused the conversation's length)."""
    history, turns, evaluated, reused, predicted, latencies, error, tokens = "", 0, 0, 0, 0, [], None, 0
    at = start
    while tokens < args.tokens:
        # about 0.75 words per token in these texts
        n_words = int(args.chunk * 0.75)
        history += " ".join(words[at % len(words): at % len(words) + n_words]) + "\n\nIn short:"
        at += n_words
        t0 = time.perf_counter()
        r = server.complete(history, args.n_predict, cache_prompt=True)
        if "error" in r:
            error = r["error"]["message"]
            break
        latencies.append(time.perf_counter() - t0)
        turns += 1
        evaluated += r["timings"]["prompt_n"]  # prompt tokens decoded; cache_n: reused from the slot
        reused += r["timings"]["cache_n"]
        predicted += r["timings"]["predicted_n"]
        tokens = r["tokens_evaluated"] + r["tokens_predicted"]
        history += r["content"] + "\n\n"
    return dict(turns=turns, evaluated=evaluated, reused=reused, predicted=predicted, latencies=latencies, error=error,
                tokens=tokens)


def run(name: str, binary: Path, model: str, config, n_parallel: int, n_ctx: int, args, extra=()) -> dict:
    words = corpus()
    out = Path(args.out)
    with Server.start(binary, model, config, n_parallel, out / f"{name}.log", args.n_batch, n_ctx,
                ["-t", str(args.threads), *extra]) as server:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            convs = list(pool.map(lambda i: conversation(server, words, 5000 * i, args), range(args.clients)))
        wall = time.perf_counter() - t0
        rss = server.rss_kib()
        n_evictions = len(server.evictions())
    processed = sum(c["evaluated"] + c["predicted"] for c in convs)
    return dict(server=name, n_parallel=n_parallel, n_ctx=n_ctx, wall_s=round(wall, 1),
                completed=sum(c["error"] is None for c in convs), clients=args.clients,
                tokens_per_conversation=[c["tokens"] for c in convs],
                processed_tok_s=round(processed / wall, 1),
                generated_tok_s=round(sum(c["predicted"] for c in convs) / wall, 2),
                prompt_reused=sum(c["reused"] for c in convs), prompt_decoded=sum(c["evaluated"] for c in convs),
                median_turn_s=round(statistics.median([t for c in convs for t in c["latencies"]] or [0]), 2),
                errors=sorted({c["error"] for c in convs if c["error"]}), rss_mib=round(rss / 1024), evictions=n_evictions)


def write_report(out: Path, meta: dict, rows: list[dict]) -> None:
    lines = [f"# {meta['clients']} conversations of about {meta['tokens']} tokens on llama-server ({meta['model']})", "",
             f"`{meta['command']}`", "",
             f"Budget {meta['kv_budget']} cells per slot ({meta['policy']}), turns of {meta['chunk']} new tokens and "
             f"{meta['n_predict']} generated, -b {meta['n_batch']}, -t {meta['threads']}. stock-full and stock-shift are "
             "the same llama-server build without LLAMA_KV_EVICT, where every hook returns at once (stock-full: a slot "
             "holds a whole conversation; stock-shift: a slot of pyllmkv's cells with --context-shift, which llama-server "
             "applies to generation only and so refuses a prompt longer than the slot). wall: until every conversation "
             "ended.", "",
             "| server | slots | cells (all slots) | completed | wall s | tokens per conversation | prompt tokens decoded / reused "
             "| generated tok/s | median turn s | RSS MiB | evictions | errors |",
             "|---" * 12 + "|"]
    for r in rows:
        lines.append(f"| {r['server']} | {r['n_parallel']} | {r['n_ctx']} | {r['completed']}/{r['clients']} | {r['wall_s']} | "
                     f"{', '.join(map(str, r['tokens_per_conversation']))} | {r['prompt_decoded']} / {r['prompt_reused']} | "
                     f"{r['generated_tok_s']} | {r['median_turn_s']} | {r['rss_mib']} | {r['evictions']} | "
                     f"{'; '.join(r['errors'][:1])}{' ...' if len(r['errors']) > 1 else ''} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=models.BENCH_DEFAULT)
    ap.add_argument("--out", required=True)
    ap.add_argument("--kv-budget", type=int, default=1024)
    ap.add_argument("--policy", default=EvictConfig.policy)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=7000,
                    help="each conversation goes on until it passes this many tokens (its last turn within SmolLM2's 8k)")
    ap.add_argument("--chunk", type=int, default=1000, help="new tokens of text per turn")
    ap.add_argument("--n-predict", type=int, default=64)
    ap.add_argument("-b", "--n-batch", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--servers", default="pyllmkv,pyllmkv-1,stock-full,stock-shift")
    args = ap.parse_args()

    model = args.model if Path(args.model).exists() else str(models.MODELS[args.model].path())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    binary = parallel.binary()
    config = EvictConfig.for_cells(args.kv_budget, policy=args.policy)
    cells = context_size(sliding_window(model), config.cells, args.n_batch)
    n_ctx_full = args.tokens + 2 * (args.chunk + args.n_predict)  # a slot holds a whole conversation
    jobs = {
        "pyllmkv": lambda: run("pyllmkv", binary, model, config, args.parallel, args.parallel * cells, args),
        "pyllmkv-1": lambda: run("pyllmkv-1", binary, model, config, 1, cells, args),
        "stock-full": lambda: run("stock-full", binary, model, None, args.parallel, args.parallel * n_ctx_full, args),
        "stock-shift": lambda: run("stock-shift", binary, model, None, args.parallel, args.parallel * cells, args,
                                   extra=["--context-shift"]),
    }
    rows = []
    for name in args.servers.split(","):
        rows.append(jobs[name]())
        print(json.dumps(rows[-1]), flush=True)
    meta = dict(command="python scripts/parallel_bench.py " + " ".join(sys.argv[1:]), model=Path(model).name, kv_budget=args.kv_budget,
                policy=args.policy, clients=args.clients, tokens=args.tokens, chunk=args.chunk,
                n_predict=args.n_predict, n_batch=args.n_batch, threads=args.threads)
    Path(args.out, "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    write_report(Path(args.out), meta, rows)


if __name__ == "__main__":
    main()
