"""DefensiveKV and LayerDefensiveKV (defensivekv, defensivekv-layer): the hook's scores and the cells each head keeps
against the numpy reference (pyllmkv/reference.py, written from the paper), the logits after an eviction
against the numpy forward with per-head masks, the cache bound on SmolLM2, and the granularity they need."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import held_positions, keep_from_held, random_tokens
from pyllmkv import _lib
from pyllmkv._lib import EvictConfig, KVEvictError
from pyllmkv.session import Session
from pyllmkv.reference import defensive_scores, pooled_shares, select_head, value_norms, window_attention
from test_hook import _llama
from tinymodel import TinyRef

WINDOW, BUDGET, KERNEL = 8, 40, 5


def _reference(ref, tokens):
    """Per layer the numpy DefensiveKV scores [n_kv, n_prefix]."""
    trace = ref.trace(tokens)
    pos = np.arange(len(tokens))
    out = []
    for il, layer in enumerate(trace.layers):
        a = window_attention(layer.q[-WINDOW:], pos[-WINDOW:], layer.k, pos, 1.0 / math.sqrt(ref.head_dim))
        norms = value_norms(layer.v, ref.w_o(il), ref.n_head)[:, : len(tokens) - WINDOW]
        out.append(defensive_scores(a, WINDOW, ref.n_head_kv, norms, BUDGET - WINDOW, KERNEL))
    return np.stack(out)


def _evicted(llama_cpp, tiny_path, policy, seed):
    ref = TinyRef(tiny_path, kv_cache_dtype="f32")
    llm = _llama(llama_cpp, tiny_path)
    sess = Session(llm, EvictConfig(budget=BUDGET, window=WINDOW, pool_kernel=KERNEL, policy=policy))
    tokens = random_tokens(100, seed=seed)
    sess.decode(tokens)
    return ref, llm, sess, tokens


@pytest.mark.parametrize("policy", ["defensivekv", "defensivekv-layer"])
def test_scores_match_numpy(llama_cpp, tiny_path, policy):
    ref, llm, _, tokens = _evicted(llama_cpp, tiny_path, policy, seed=31)
    expected = _reference(ref, tokens)
    for il in range(ref.n_layer):
        pos, score, _ = _lib.scores(llm, il, ref.n_head_kv)
        np.testing.assert_array_equal(pos, np.arange(len(tokens) - WINDOW))
        np.testing.assert_allclose(score, expected[il], rtol=1e-4, atol=1e-7)
    # stage 1 protected some cells at the layer's maximum, and not all of them
    top = expected.max(axis=(1, 2), keepdims=True)
    assert 0 < (expected == top).sum() < expected.size


@pytest.mark.parametrize("policy", ["defensivekv", "defensivekv-layer"])
def test_each_head_keeps_its_share_of_the_top_k(llama_cpp, tiny_path, policy):
    """defensivekv: one top-k over a layer's (head, cell) pairs; defensivekv-layer: over every layer's; each head
    then keeps its own best cells, the window in every head."""
    ref, llm, sess, tokens = _evicted(llama_cpp, tiny_path, policy, seed=32)
    scores = _reference(ref, tokens)
    b = BUDGET - WINDOW
    sess.evict()
    n_cells = _lib.stats(llm)["n_seq_cells"]
    held = held_positions(llm, ref, n_cells)
    if policy == "defensivekv":
        shares = np.stack([pooled_shares(scores[il], ref.n_head_kv * b, 2 * b) for il in range(ref.n_layer)])
    else:
        flat = scores.reshape(ref.n_layer * ref.n_head_kv, -1)
        shares = pooled_shares(flat, ref.n_layer * ref.n_head_kv * b, 2 * b).reshape(ref.n_layer, ref.n_head_kv)
    for il in range(ref.n_layer):
        for g in range(ref.n_head_kv):
            prefix = held[il, g, : n_cells - WINDOW]
            np.testing.assert_array_equal(prefix[prefix >= 0], select_head("snapkv", scores[il, g], None, shares[il, g]))
            assert (held[il, g, -WINDOW:] == np.arange(100 - WINDOW, 100)).all()
    assert n_cells == shares.max() + WINDOW
    assert shares.sum() == ref.n_layer * ref.n_head_kv * b
    if policy == "defensivekv-layer":
        assert len(set(shares.sum(axis=1))) > 1, "layers win different shares on this model"


@pytest.mark.parametrize("policy", ["defensivekv", "defensivekv-layer"])
def test_logits_after_eviction_match_numpy_with_per_head_masks(llama_cpp, tiny64_path, policy):
    ref = TinyRef(tiny64_path)
    llm = _llama(llama_cpp, tiny64_path)
    sess = Session(llm, EvictConfig(budget=48, window=8, policy=policy))
    prefix = random_tokens(120, seed=33)
    sess.decode(prefix)
    sess.evict()
    keep = keep_from_held(held_positions(llm, ref, _lib.stats(llm)["n_seq_cells"]), len(prefix))
    assert keep.sum() == ref.n_layer * ref.n_head_kv * 48
    assert len(np.unique(keep.sum(axis=-1))) > 1, "unequal shares, so the per-head mask matters"
    new = random_tokens(6, seed=34)
    got = np.stack([sess.decode([t]) for t in new])
    np.testing.assert_allclose(got, ref.decode_with_cache(prefix, keep=keep, new_tokens=new), rtol=0, atol=5e-5)


@pytest.mark.parametrize("policy", ["defensivekv", "defensivekv-layer"])
def test_repeated_evictions_stay_within_bound_smollm2(llama_cpp, smollm2_path, policy):
    budget, n_batch, window = 256, 128, 32
    config = EvictConfig(budget=budget, window=window, policy=policy)
    llm = _llama(llama_cpp, smollm2_path, "f16", n_ctx=config.cells + n_batch, n_batch=n_batch)
    sess = Session(llm, config)
    tokens = llm.tokenize(b"The committee met on Tuesday to review the budget of the harbour authority. " * 80)[:1500]
    seen = []
    logits = sess.decode(tokens, on_batch=lambda n, total: seen.append(_lib.stats(llm)["n_seq_cells"]))
    assert max(seen) <= config.cells + n_batch and _lib.stats(llm)["n_evictions"] >= 4
    assert np.isfinite(logits).all()


def test_needs_head_granularity(llama_cpp, tiny_path):
    llm = _llama(llama_cpp, tiny_path)
    with pytest.raises(KVEvictError, match="use granularity head"):
        _lib.enable(llm, EvictConfig(budget=64, window=8, granularity="token", policy="defensivekv"))
