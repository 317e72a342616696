"""Numpy reference of the scores and selections (DESIGN.md "The algorithm", steps 1-4), written from the papers and
kvpress, independently of native/: the oracle the tests check the hook's scores against, and what a script reads to
see each rule stated. Never on the path of an eviction: the hook scores in ggml on the cache's backend."""

from __future__ import annotations

import numpy as np


def window_attention(q_win, q_pos, k, k_pos, scale):
    """A[h, w, i] = softmax_i(q_w . K_i * scale + causal mask). q_win [W, n_head, hd], k [N, n_kv, hd]."""
    n_head, n_kv = q_win.shape[1], k.shape[1]
    k_rep = np.repeat(k, n_head // n_kv, axis=1)  # query head h reads KV head h // group
    logits = np.einsum("whd,nhd->hwn", q_win.astype(np.float64), k_rep.astype(np.float64)) * scale
    logits = np.where(k_pos[None, None, :] > q_pos[None, :, None], -np.inf, logits)
    logits -= logits.max(axis=-1, keepdims=True)
    a = np.exp(logits)
    return a / a.sum(axis=-1, keepdims=True)


def avg_pool(x, kernel):
    """torch avg_pool1d(kernel, stride 1, padding kernel//2, count_include_pad=True) along the last axis."""
    if kernel <= 1:
        return x
    pad = kernel // 2
    xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)])
    return np.stack([xp[..., i : i + x.shape[-1]] for i in range(kernel)]).sum(axis=0) / kernel


def group_mean(x, n_kv):
    """[n_head, ...] -> [n_kv, ...], averaging the query heads of each KV head."""
    return x.reshape(n_kv, x.shape[0] // n_kv, *x.shape[1:]).mean(axis=1)


def head_scores(a, n_window, n_kv, policy, kernel=13):
    """Per KV head scores of the prefix cells (all but the last n_window): [n_kv, N - n_window]; `kernel`: the
    pooling (the hook's default pool_kernel)."""
    n_prefix = a.shape[-1] - n_window
    if policy == "tova":
        s = a[:, -1, :n_prefix]
    elif policy == "h2o":
        s = a.sum(axis=1)[:, :n_prefix]  # every captured query is new at the first eviction
    else:
        s = avg_pool(a.mean(axis=1)[:, :n_prefix], kernel)
    return group_mean(s, n_kv)


def key_norm_scores(k, n_prefix):
    """KNorm (Devoto et al. 2024; kvpress's KnormPress): minus the L2 norm of each prefix cell's key as cached (after
    RoPE), per KV head. k [N, n_kv, hd] -> [n_kv, n_prefix]."""
    return -np.linalg.norm(k[:n_prefix].astype(np.float64), axis=-1).T


def value_norms(v, w_o, n_head):
    """Group mean of |V_i W_O^h|_1: v [N, n_kv, hd], w_o [n_head*hd, n_embd] -> [n_kv, N]."""
    n_kv, hd = v.shape[1], v.shape[2]
    group = n_head // n_kv
    norms = np.stack([
        np.abs(v[:, h // group, :].astype(np.float64) @ w_o[h * hd : (h + 1) * hd]).sum(axis=-1)
        for h in range(n_head)
    ])
    return group_mean(norms, n_kv)


def int8_rows(x):
    """x [..., n] rounded to 8 bits per row as the CPU kernel's int8 product does (float32 arithmetic, to nearest
    even): (values as int64, scales [..., 1] = max |x| / 127)."""
    x = np.asarray(x, dtype=np.float32)
    amax = np.abs(x).max(axis=-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    return np.rint(x * inv).astype(np.int64), (amax / np.float32(127)).astype(np.float32)


def value_norms_int8(v, w_o, n_head):
    """value_norms with V's rows per KV head and W_O's rows per query head (one output's head_dim inputs) rounded to
    8 bits first, as the CPU kernel computes them for quantised W_O: exact integer products, scaled back."""
    n_kv, hd = v.shape[1], v.shape[2]
    group = n_head // n_kv
    qv, sv = int8_rows(v)                                                   # [N, n_kv, hd], [N, n_kv, 1]
    qw, sw = int8_rows(w_o.reshape(n_head, hd, -1).transpose(0, 2, 1))     # [n_head, n_embd, hd], [n_head, n_embd, 1]
    norms = np.stack([
        np.abs((qv[:, h // group] @ qw[h].T) * sw[h, :, 0].astype(np.float64)).sum(axis=-1) * sv[:, h // group, 0]
        for h in range(n_head)
    ])
    return group_mean(norms, n_kv)


def top_k(values, k, skip=None):
    order = sorted(
        (i for i in range(len(values)) if skip is None or not skip[i]),
        key=lambda i: (-values[i], i),
    )
    return order[:k]


def select_token(policy, scores, norms, budget, n_window, first_stage_ratio=0.5, epsilon=1e-4, n_sink=4):
    """Token granularity: the kept prefix cells, from per-(layer, KV head) scores [L, n_kv, n_prefix].

    One score per cell, the mean over layers and heads; CriticalKV's stage-2 products are normalised to sum to one
    per head first, as the attention shares already do."""
    n_prefix = scores.shape[-1] if scores is not None else norms
    b = budget - n_window
    keep = np.zeros(n_prefix, dtype=bool)
    if policy == "streaming":
        keep[: min(n_sink, b)] = True
        keep[n_prefix - (b - min(n_sink, b)) :] = True
        return keep
    s = scores.reshape(-1, n_prefix).mean(axis=0)
    if policy != "criticalkv":
        keep[top_k(s, b)] = True
        return keep
    c = (scores.astype(np.float64) + epsilon) * norms
    c = c / c.sum(axis=-1, keepdims=True)
    c = c.reshape(-1, n_prefix).mean(axis=0)
    n_first = int(np.floor(b * first_stage_ratio))
    keep[top_k(s, n_first)] = True
    keep[top_k(c, b - n_first, keep)] = True
    return keep


def adakv_shares(scores, budget, alpha, cap):
    """AdaKV over one layer's heads: scores [n_head, n] -> cells per head. Each head first takes its top
    max(1, floor(alpha * budget)) (at most cap); the rest of the pool n_head * budget goes to the best remaining
    (head, cell) pairs, ties to the lower head then cell, skipping heads already at cap."""
    n_head, n = scores.shape
    n_safe = min(max(1, int(np.floor(alpha * budget))), cap, n)
    share = np.full(n_head, n_safe)
    taken = np.zeros((n_head, n), dtype=bool)
    for h in range(n_head):
        taken[h, top_k(scores[h], n_safe)] = True
    return pooled_shares(scores, n_head * budget - share.sum(), cap, share, taken)


def select_head(policy, s, norm, k, first_stage_ratio=0.5, epsilon=1e-4):
    """One KV head's kept cells (sorted) out of its scores s [n] (and value norms for criticalkv): k of them."""
    if not policy.startswith("criticalkv"):
        return np.sort(top_k(s, k))
    keep = np.zeros(len(s), dtype=bool)
    n_first = int(np.floor(k * first_stage_ratio))
    keep[top_k(s, n_first)] = True
    keep[top_k((s.astype(np.float64) + epsilon) * norm, k - n_first, keep)] = True
    return np.flatnonzero(keep)


def defensive_scores(a, n_window, n_kv, norms, budget, kernel=13):
    """DefensiveKV (arXiv 2510.13334) scores of one layer's prefix cells, [n_kv, n_prefix]. a [n_head, W, N]: the
    window's attention over all N cells (the last n_window are the window's own); norms [n_kv, n_prefix]: the group
    mean of |V_i W_O^h|_1; budget: the per-head budget outside the window.

    The maximum over the group's heads and the queries of pooled_maxima, and the group's mean attention, through
    defensive_select."""
    n_prefix = a.shape[2] - n_window
    prefix = a[:, :, :n_prefix].astype(np.float64)
    m = pooled_maxima(prefix, kernel)
    m = m.reshape(n_kv, -1, n_prefix).max(axis=1)
    window_mass = a[:, :, n_prefix:].sum(-1).mean()
    return defensive_select(m, group_mean(prefix.mean(axis=1), n_kv), window_mass, norms, budget)


def pooled_maxima(prefix, kernel):
    """Per head, the maximum over the queries of each query's prefix row [n_head, W, n_prefix] pooled over `kernel`
    cells and rescaled to the unpooled row's sum: [n_head, n_prefix]."""
    pooled = avg_pool(prefix, kernel)
    return (pooled * (prefix.sum(-1, keepdims=True) / pooled.sum(-1, keepdims=True))).max(axis=1)


def defensive_select(m, attention, window_mass, norms, budget):
    """DefensiveKV's scores from m [n_kv, n_prefix], the pooled maxima, and attention [n_kv, n_prefix], the cells'
    attention over the queries (any scale): m floored at its mean over cells, weighted by the norm normalised across
    the KV heads. Stage 1: per KV head, the cells before the cumulative share of `attention` reaches 0.9 -
    window_mass (mass the window puts on its own cells, mean over heads and queries), at most `budget`, score the
    layer's maximum."""
    d = np.maximum(m, m.mean(axis=-1, keepdims=True))
    s = d * norms / norms.sum(axis=0, keepdims=True)
    top = s.max()
    for g in range(len(m)):
        share = attention[g] / attention[g].sum()
        order = top_k(share, len(share))
        reached = np.cumsum(share[order]) >= 0.9 - window_mass
        count = int(np.argmax(reached)) if reached.any() else 0
        s[g, order[: min(count, budget)]] = top
    return s


def pooled_shares(scores, pool, cap, share=None, taken=None):
    """One top-k over the (head, cell) pairs of scores [n_head, n] not yet `taken`: `pool` more cells added to each
    head's `share` (zeros by default), ties to the lower head then cell, no head past cap."""
    n_head, n = scores.shape
    share = np.zeros(n_head, dtype=int) if share is None else share.copy()
    pairs = sorted(((h, i) for h in range(n_head) for i in range(n) if taken is None or not taken[h, i]),
                   key=lambda p: (-scores[p], p))
    for h, i in pairs:
        if pool == 0:
            break
        if share[h] < cap:
            share[h] += 1
            pool -= 1
    return share
