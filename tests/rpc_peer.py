"""One eviction run, in a process of its own (RPC servers registered with ggml stay registered until the process
exits), for tests/test_rpc.py and scripts/rpc_bench.py:

  python rpc_peer.py MODEL OUT.npz [HOST:PORT,...]

Decodes a fixed text through a small budget at head granularity (evicting between batches), then renumbers the kept
cells and decodes a few tokens more, with every layer on the RPC servers when they are given (-ngl 99) and on the CPU
when not. OUT.npz: the logits of the last tokens, the positions each KV head holds per layer, the renumbered positions,
and the hook's counters; "kernel" says what computed the window attention.
"""

from __future__ import annotations

import sys

import numpy as np

import pyllmkv
from pyllmkv import _lib, debug, rpc
from pyllmkv.session import Session

TEXT = ("The harbour master kept a ledger of every ship: its name, its cargo, the hour it came in and the hour it left. "
        "On the third of May the Aurora brought salt, the Ceres brought timber, and the Juno brought nothing at all. ") * 12


def run(model: str, servers: str = "", budget: int = 96, n_batch: int = 64, window: int = 16) -> dict:
    if servers:
        rpc.add_servers(servers)
    config = pyllmkv.EvictConfig.for_cells(budget, window=window, granularity="head")
    llm = pyllmkv.llama_cpp.Llama(model_path=model, n_ctx=config.cells + n_batch, n_batch=n_batch, n_ubatch=n_batch,
                                  n_gpu_layers=99 if servers else 0, n_threads=1, n_threads_batch=1, verbose=False)
    sess = Session(llm, config)
    tokens = llm.tokenize(TEXT.encode())[:600]
    sess.decode(tokens[:-4])
    logits = [sess.decode([t]) for t in tokens[-4:]]
    n_layer = int(pyllmkv.llama_cpp.llama_model_n_layer(llm._model.model))
    n_kv = int(pyllmkv.llama_cpp.llama_model_n_head_kv(llm._model.model))
    held = np.stack([debug.head_positions(llm, il, n_kv) for il in range(n_layer)])
    sess.n_past = _lib.compact_positions(llm)  # renumbered from 0: llama.cpp's K shift runs where the cache is
    renumbered = _lib.positions(llm)
    after = [sess.decode([t]) for t in tokens[:3]]
    stats = _lib.stats(llm)
    return dict(logits=np.stack(logits), after=np.stack(after), held=held, renumbered=renumbered,
                n_evictions=stats["n_evictions"], n_seq_cells=stats["n_seq_cells"], kernel=stats["window_attn_kernel"])


if __name__ == "__main__":
    out = run(sys.argv[1], sys.argv[3] if len(sys.argv) > 3 else "")
    np.savez(sys.argv[2], **out)
