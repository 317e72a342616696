#!/usr/bin/env python3
"""Whether decode keeps llama.cpp's CUDA graphs in use: counts ggml-cuda's debug messages while one engine decodes.

  cuda_graphs.py MODEL ENGINE [BUDGET]   ENGINE: stock (PYLLMKV_STOCK_LIB_DIR) or a policy; prints one JSON line

The prompt (4 x BUDGET tokens) is decoded in batches of 512 and evicted down to BUDGET; then 128 tokens are decoded
one at a time, and each is counted as "reused" (ggml-cuda launched the captured graph: "CUDA Graph id .. reused") or
"reset" (the graph's nodes changed, so it ran without a CUDA graph: "CUDA graph warmup reset"). A hook that forced a
rebuild every token would show about one reset per token. Run once more with GGML_CUDA_DISABLE_GRAPHS=1 for the
decode speed without CUDA graphs: an engine whose decode does not change has none in use.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

root = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("worker", root / "pyllmkv" / "bench" / "worker.py")
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)


def main(model: str, engine: str, budget: int) -> None:
    import os

    n_batch, n_decode = 512, 128
    stock = engine == "stock"
    if not stock:
        sys.path.insert(0, str(root))
    job = dict(engine="stock" if stock else "pyllmkv", model=model, n_batch=n_batch, threads=os.cpu_count(),
               n_gpu_layers=99, n_ctx=4 * budget + n_decode + n_batch, n_keep=None,
               stock_lib=os.environ.get("PYLLMKV_STOCK_LIB_DIR", ""), budget=budget, policy=engine, window=32,
               pool_kernel=13, prompt_tail=True)
    stream = worker.open_stream(job)
    import llama_cpp
    import llama_cpp._logger

    counts = {"reused": 0, "reset": 0, "warmup_complete": 0}
    counting = [False]

    @llama_cpp.llama_log_callback
    def log(level, text, user_data):
        if counting[0] and text:
            line = text.decode("utf-8", "replace")
            counts["reused"] += "reused" in line and "CUDA Graph id" in line
            counts["reset"] += "CUDA graph warmup reset" in line
            counts["warmup_complete"] += "CUDA graph warmup complete" in line

    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    rng = np.random.default_rng(0)
    logits = stream.decode([int(t) for t in rng.integers(1000, 20000, 4 * budget)])
    stream.settle()
    tok = int(np.argmax(logits))
    counting[0] = True
    t0 = time.perf_counter()
    for _ in range(n_decode):
        tok = int(np.argmax(stream.decode([tok])))
    decode_tps = n_decode / (time.perf_counter() - t0)
    counting[0] = False
    # llama-cpp-python's own callback again: the context logs as it is freed, after this function's callback is gone
    llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))
    print(json.dumps(dict(engine=engine, budget=budget, graphs_disabled="GGML_CUDA_DISABLE_GRAPHS" in os.environ,
                          decoded=n_decode, decode_tps=decode_tps, **counts)), flush=True)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) == 4 else 2048)
