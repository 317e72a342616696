"""The fused scoring kernels vs the plain ggml graphs at 4k cells, side by side, on SmolLM2 (or --model) on the CPU,
or on the GPU with -ngl 99 in a CUDA build (--part norms: there the window attention is the ggml graph).

    python scripts/kernel_bench.py [--part norms|attn] [--cells 4096] [--repeat 5] [--threads 2] [--model M] [-ngl N]

One process decodes --cells tokens of text once, then alternates the fused kernel and the graph (the environment
variable LLAMA_KV_EVICT_VALUE_NORMS=graph or LLAMA_KV_EVICT_WINDOW_ATTN=graph selects the graph) --repeat times,
each on every cell of every layer, and prints the median time of each and the ratio.
- norms: the projected-value norms, timed as llama_kv_evict_scores with norms less the same call without them;
- attn: the window attention of the window's 32 queries, timed as llama_kv_evict_scores without norms (its
  selection and pooling on the host are the same for both).
The extra memory is the compute buffers the hook's graphs needed (llama_kv_evict_stats.scoring_bytes); the fused
kernels' own scratch (a W_O tile of 32 x n_head*hd floats, or the logits of one KV head's query heads and the
transposed mask, (group + 1) x 32 x cells floats, per thread) is printed beside it. llama_kv_evict_scores computes the
scores twice (once for their count), the same for both kernels.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pyllmkv
from pyllmkv import _lib, models

sys.path.insert(0, os.path.dirname(__file__))
from eviction_table import session, text  # noqa: E402

PARTS = {"norms": ("LLAMA_KV_EVICT_VALUE_NORMS", "value_norm_kernel"),
         "attn": ("LLAMA_KV_EVICT_WINDOW_ATTN", "window_attn_kernel")}
WINDOW = 32


def prepared(model: str, cells: int, threads: int, n_gpu_layers: int):
    config = pyllmkv.EvictConfig(budget=cells + 64, window=WINDOW)  # no eviction: every cell stays to be scored
    sess = session(model, 512, config, threads=threads, n_gpu_layers=n_gpu_layers)
    sess.decode(sess.llm.tokenize(text().encode())[:cells])
    return sess.llm, sess, config


def timed_run(llm, sess, config, part: str, graph: bool):
    """Seconds the dispatch's kernel (or, with `graph`, the ggml graph) takes for `part` on every cell (re-enabling
    drops the cached norms), the kernel's name, and the compute buffers the hook's graphs needed for it."""
    env, stat = PARTS[part]
    os.environ.pop(env, None)
    if graph:
        os.environ[env] = "graph"
    n_kv = int(pyllmkv.llama_cpp.llama_model_n_head_kv(llm._model.model))
    _lib.enable(llm, config)  # (enabling again empties the query ring)
    sess.decode([13] * WINDOW)  # the window's queries
    t0 = time.perf_counter()
    _lib.scores(llm, 0, n_kv, value_norms=False)
    t1 = time.perf_counter()
    if part == "norms":
        _lib.scores(llm, 0, n_kv, value_norms=True)
    t2 = time.perf_counter()
    st = _lib.stats(llm)
    assert (st[stat] == "ggml-graph") == graph, st[stat]
    sess.truncate(sess.n_past - WINDOW)
    return (t2 - t1) - (t1 - t0) if part == "norms" else t1 - t0, st[stat], st["scoring_bytes"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=sorted(PARTS), default="norms")
    ap.add_argument("--cells", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct)")
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    a = ap.parse_args()
    path = a.model or str(models.smollm2())
    llm, sess, config = prepared(path, a.cells, a.threads, a.n_gpu_layers)
    times = {"fused": [], "ggml-graph": []}
    names, buffers = {}, {}
    for _ in range(a.repeat):
        for kernel in times:
            seconds, names[kernel], buffers[kernel] = timed_run(llm, sess, config, a.part, kernel == "ggml-graph")
            times[kernel].append(seconds)
    model = llm._model.model
    n_layer = int(pyllmkv.llama_cpp.llama_model_n_layer(model))
    n_head = int(pyllmkv.llama_cpp.llama_model_n_head(model))
    group = n_head // int(pyllmkv.llama_cpp.llama_model_n_head_kv(model))
    hd = int(pyllmkv.llama_cpp.llama_model_n_embd(model)) // n_head
    # a W_O tile; or the logits of a KV head's query heads and the transposed mask
    scratch = 32 * n_head * hd if a.part == "norms" else (group + 1) * WINDOW * (a.cells + WINDOW)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.part}: {os.path.basename(path)}, {a.cells} cells x {n_layer} layers x {n_head} heads, "
          f"{a.threads} threads, -ngl {a.n_gpu_layers}, median of {a.repeat}:")
    for k, v in times.items():
        print(f"  {names[k]:10s} {med[k]:.4f} s (min {min(v):.4f}, max {max(v):.4f}); "
              f"hook compute buffers {buffers[k] / 2**20:.1f} MiB")
    if names["fused"] == "fused-cpu":
        print(f"  fused kernel scratch {scratch * 4 * a.threads / 2**20:.2f} MiB ({a.threads} threads)")
    print(f"  graph / fused = {med['ggml-graph'] / med['fused']:.2f}")


if __name__ == "__main__":
    main()
