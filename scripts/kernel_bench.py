"""The fused scoring kernels vs the plain ggml graphs at 4k cells, side by side, on SmolLM2 (or --model) on the CPU,
or on the GPU with -ngl 99 in a CUDA build (--part norms: there the window attention is the ggml graph).

    python scripts/kernel_bench.py [--part norms|attn] [--cells 4096] [--repeat 5] [--threads 2] [--model M] [-ngl N]

One process decodes --cells tokens of text once, then alternates the fused kernel and the graph (the environment
variable LLAMA_KV_EVICT_VALUE_NORMS=graph or LLAMA_KV_EVICT_WINDOW_ATTN=graph selects the graph; for the norms on the
CPU also the fused kernel's float product, =f32, where it would run in int8) --repeat times, each on every cell of
every layer, and prints the median time of each and the ratios.
- norms: the projected-value norms, timed as llama_kv_evict_scores with norms less the same call without them;
- attn: the window attention of the window's 32 queries, timed as llama_kv_evict_scores without norms (its
  selection and pooling on the host are the same for both).
The extra memory is the compute buffers the hook's graphs needed (llama_kv_evict_stats.scoring_bytes); the fused
kernels' own scratch (a W_O tile of 32 x n_head*hd floats, or 64 x n_head*hd bytes and the thread's cells' V rows in
bytes for the int8 product; or the logits of one KV head's query heads and the transposed mask, (group + 1) x 32 x
cells floats, per thread) is printed beside it. llama_kv_evict_scores computes the
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
    # no eviction: every cell stays to be scored; snapkv's scores need no norms, so a call without norms computes none
    config = pyllmkv.EvictConfig(budget=cells + 64, window=WINDOW, policy="snapkv")
    sess = session(model, 512, config, threads=threads, n_gpu_layers=n_gpu_layers)
    sess.decode(sess.llm.tokenize(text().encode())[:cells])
    return sess.llm, sess, config


def timed_run(llm, sess, config, part: str, force: str | None):
    """Seconds the dispatch's kernel (or the one `force` names: "graph", or "f32" for the norms' float product) takes
    for `part` on every cell (re-enabling drops the cached norms), the kernel's name, and the compute buffers the
    hook's graphs needed for it."""
    env, stat = PARTS[part]
    os.environ.pop(env, None)
    if force:
        os.environ[env] = force
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
    assert (st[stat] == "ggml-graph") == (force == "graph"), st[stat]
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
    # by what the environment forces: the dispatch's choice, the CPU norms' float product (where it would be int8), the graph
    forced = {"fused": None, "ggml-graph": "graph"}
    if a.part == "norms" and a.n_gpu_layers == 0:
        forced["fused-f32"] = "f32"
    times = {k: [] for k in forced}
    names, buffers = {}, {}
    for _ in range(a.repeat):
        for kernel, force in forced.items():
            seconds, names[kernel], buffers[kernel] = timed_run(llm, sess, config, a.part, force)
            times[kernel].append(seconds)
    model = llm._model.model
    n_layer = int(pyllmkv.llama_cpp.llama_model_n_layer(model))
    n_head = int(pyllmkv.llama_cpp.llama_model_n_head(model))
    n_kv = int(pyllmkv.llama_cpp.llama_model_n_head_kv(model))
    hd = int(pyllmkv.llama_cpp.llama_model_n_embd(model)) // n_head
    # per thread: a W_O tile (and the int8 kernel's copy of its cells' V rows); or the logits of a KV head's query
    # heads and the transposed mask
    scratch = {"fused-cpu": 4 * 32 * n_head * hd,
               "fused-cpu-int8": 64 * n_head * hd + 4 * 64 * n_head + -(-a.cells // a.threads) * n_kv * (hd + 8)}
    if a.part == "attn":
        scratch = {"fused-cpu": 4 * (n_head // n_kv + 1) * WINDOW * (a.cells + WINDOW)}
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.part}: {os.path.basename(path)}, {a.cells} cells x {n_layer} layers x {n_head} heads, "
          f"{a.threads} threads, -ngl {a.n_gpu_layers}, median of {a.repeat}:")
    for k, v in times.items():
        extra = f"; kernel scratch {scratch[names[k]] * a.threads / 2**20:.2f} MiB" if names[k] in scratch else ""
        print(f"  {names[k]:14s} {med[k]:.4f} s (min {min(v):.4f}, max {max(v):.4f}); "
              f"hook compute buffers {buffers[k] / 2**20:.1f} MiB{extra}")
    for k in times:
        if k != "fused":
            print(f"  {names[k]} / {names['fused']} = {med[k] / med['fused']:.2f}")

if __name__ == "__main__":
    main()
