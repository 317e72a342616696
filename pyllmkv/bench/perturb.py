"""Output perturbation per head, the paper's analysis (Feng et al., section 3): how far each head's attention output
moves when the cache keeps only the cells a policy chose.

For every layer of the evicted cache and every query head h: the observation window's queries (captured by the hook,
after RoPE), the sequence's K and V rows (read from the cache) and the head's slice of the output projection W_O
(read from the GGUF file) give the attention output over every cell, o, and over the cells the policy kept for h's KV
head, o'; the perturbation is the mean over the window's queries of |(o - o') W_O^h|_1. Both policies evict the same
sequence with the same budget and window, head-wise.

The window's queries chose the eviction, so they favour it; the queries eviction exists for are those of the tokens
that follow. So the same is measured on the queries of the next `window` tokens of the text, decoded teacher-forced
after the whole context (their own cells, after the context, are kept in both outputs).
"""

from __future__ import annotations

import numpy as np

from .. import _lib, debug
from .._lib import EvictConfig, llama_cpp
from ..session import Session


def output_projections(model_path: str, layers) -> dict[int, np.ndarray]:
    """W_O of each layer, [n_embd, n_head * head_dim] float32, dequantised from the GGUF file."""
    import gguf

    reader = gguf.GGUFReader(model_path)
    by_name = {t.name: t for t in reader.tensors}
    out = {}
    for il in layers:
        t = by_name[f"blk.{il}.attn_output.weight"]
        out[il] = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    return out


def attention(q: np.ndarray, q_pos: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray, keep: np.ndarray,
              scale: float) -> np.ndarray:
    """Causal softmax attention of queries q [w, d] at q_pos over the rows k, v [n, d] at pos whose keep is set."""
    logits = (q.astype(np.float64) @ k.astype(np.float64).T) * scale
    logits[(pos[None, :] > q_pos[:, None]) | ~keep[None, :]] = -np.inf
    logits -= logits.max(axis=1, keepdims=True)
    a = np.exp(logits)
    a /= a.sum(axis=1, keepdims=True)
    return a @ v.astype(np.float64)


def _capture(model_path: str, tokens, config: EvictConfig, n_batch: int, threads: int, n_gpu_layers: int, read_rows: bool,
             evict: bool = True):
    """Decodes tokens with the hook enabled and nothing evicted, then evicts once (if `evict`). Returns the last
    window's queries and, when read_rows, K/V per layer (before the eviction), and the positions each KV head kept per
    layer."""
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=len(tokens) + n_batch, n_batch=n_batch, n_ubatch=n_batch,
                          n_threads=threads, n_threads_batch=threads, n_gpu_layers=n_gpu_layers, verbose=False)
    ctx = llm._ctx.ctx
    _lib.enable(ctx, config)
    Session(llm, None).decode(tokens)  # no config: nothing is evicted while decoding
    n_kv = int(llama_cpp.llama_model_n_head_kv(llm._model.model))
    layers = []
    for il in range(int(llama_cpp.llama_model_n_layer(llm._model.model))):
        try:
            layers.append((il, debug.queries(ctx, il)))
        except _lib.KVEvictError:  # a sliding-window layer: not in the evicted cache
            continue
    rows = {}
    if read_rows:
        pos = _lib.positions(ctx)
        for il, _ in layers:
            k = debug.read_rows(ctx, il, False, len(pos)).view(np.float16).reshape(len(pos), n_kv, -1)
            v = debug.read_rows(ctx, il, True, len(pos)).view(np.float16).reshape(len(pos), n_kv, -1)
            rows[il] = (pos, k, v)
    kept = {}
    if evict:
        _lib.evict(ctx)
        kept = {il: debug.head_positions(ctx, il, n_kv) for il, _ in layers}
    llm.close()
    return dict(layers), rows, kept, n_kv


def _per_head(queries, rows, kept: dict, w_o, n_kv, layers, n_context) -> dict:
    """Per policy, layer and query head the mean L1 of (o - o') W_O^h over the queries, o over every cell (computed once
    for all policies), o' over the cells the policy kept for its KV head (kept[policy]) and every cell past the context."""
    out = {policy: [] for policy in kept}
    for il in layers:
        q_pos, q, scale = queries[il]
        pos, k, v = rows[il]
        n_head = q.shape[1] // k.shape[2]
        head_dim = k.shape[2]
        q = q.reshape(len(q_pos), n_head, head_dim)
        per_head = {policy: [] for policy in kept}
        for h in range(n_head):
            g = h // (n_head // n_kv)
            full = attention(q[:, h], q_pos, k[:, g], v[:, g], pos, np.ones(len(pos), bool), scale)
            w_h = w_o[il][:, h * head_dim : (h + 1) * head_dim].astype(np.float64)
            for policy, held in kept.items():
                keep = np.isin(pos, held[il][g][held[il][g] >= 0]) | (pos >= n_context)
                part = attention(q[:, h], q_pos, k[:, g], v[:, g], pos, keep, scale)
                per_head[policy].append(float(np.abs((full - part) @ w_h.T).sum(axis=1).mean()))
        for policy in kept:
            out[policy].append(per_head[policy])
    return out


def perturbation(model_path: str, tokens, budget: int, window: int = 32, n_batch: int = 512, threads: int = 2,
                 n_gpu_layers: int = 0, policies=("criticalkv", "snapkv"), progress=None, pool_kernel: int = EvictConfig.pool_kernel) -> dict:
    """Per-head output perturbation of each policy on the window's queries: {"layers": [...], "n_head": H, policy:
    [[per head] per layer]}, and on the next tokens' queries: {"future": {policy: ...}}. `tokens`: the context, then
    the `window` tokens that follow it. Needs an f16 K/V cache (the default)."""
    n_context = len(tokens) - window
    context = tokens[:n_context]
    configs = {policy: EvictConfig(budget=budget, policy=policy, granularity="head", window=window, pool_kernel=pool_kernel)
               for policy in policies}
    captured = {}
    for i, policy in enumerate(policies):
        captured[policy] = _capture(model_path, context, configs[policy], n_batch, threads, n_gpu_layers, read_rows=(i == 0))
        if progress:
            progress(1)
    # the next tokens' queries and every row, from the whole text decoded without eviction
    future_q, future_rows, _, _ = _capture(model_path, tokens, configs[policies[0]], n_batch, threads, n_gpu_layers,
                                           read_rows=True, evict=False)
    queries, rows, _, n_kv = captured[policies[0]]
    w_o = output_projections(model_path, queries)
    layers = sorted(queries)
    kept = {policy: captured[policy][2] for policy in policies}
    out = {"layers": layers, "budget": budget, "window": window, "context": n_context, "pool_kernel": pool_kernel,
           **_per_head(queries, rows, kept, w_o, n_kv, layers, n_context),
           "future": _per_head(future_q, future_rows, kept, w_o, n_kv, layers, n_context)}
    out["n_head"] = len(out[policies[0]][0])
    return out


def summary(result: dict, a: str = "criticalkv", b: str = "snapkv") -> dict:
    """Share of heads where policy a perturbs the output less than b, and the log-ratio a/b per head."""
    pa, pb = np.asarray(result[a]).ravel(), np.asarray(result[b]).ravel()
    both = (pa > 0) & (pb > 0)
    return {"n_heads": int(pa.size), "lower": int((pa < pb).sum()), "equal": int((pa == pb).sum()),
            "share_lower": float((pa < pb).mean()), "mean_a": float(pa.mean()), "mean_b": float(pb.mean()),
            "log_ratio": np.log(pa[both] / pb[both]).tolist()}
