"""AdaKV head shares (the -ada policies): the allocation against a numpy reference, the cells each head keeps
against the numpy scores, the logits after an -ada eviction against the numpy forward with per-head masks (the
heads' shares differ, so llama.cpp's per-cell mask alone would be wrong), and the cache bound on SmolLM2."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import held_positions, keep_from_held, random_tokens
from pyllmkv import _lib, debug
from pyllmkv._lib import EvictConfig, KVEvictError
from pyllmkv.session import Session
from pyllmkv.reference import adakv_shares, select_head
from test_hook import _llama, _reference_scores
from tinymodel import TinyRef

TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # GGML_TYPE_*


@pytest.mark.parametrize("n_head", [1, 2, 3, 8])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_adakv_shares_match_numpy(n_head, alpha):
    rng = np.random.default_rng(n_head * 10 + int(alpha * 10))
    for trial in range(20):
        n = int(rng.integers(4, 60))
        budget = int(rng.integers(1, n + 1))
        cap = int(rng.integers(max(1, budget), n + 1)) if trial % 2 else n
        # few distinct values: many ties, across heads and within one
        scores = (rng.integers(0, 5, (n_head, n)) / 4).astype(np.float32) if trial % 3 == 0 else rng.random((n_head, n), dtype=np.float32) ** 4
        got = debug.adakv_shares(scores, budget, alpha, cap)
        np.testing.assert_array_equal(got, adakv_shares(scores, budget, alpha, cap), err_msg=f"n={n} budget={budget} cap={cap}")
        assert got.sum() == n_head * budget and got.max() <= cap
        assert got.min() >= min(max(1, int(np.floor(alpha * budget))), cap), "the safeguard"


def test_adakv_safeguard_and_cap_bind():
    # head 0 holds every high score: without the safeguard head 1 would get nothing, without the cap head 0 all
    scores = np.array([[9, 9, 9, 9, 9, 9, 9, 9, 9, 9], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=np.float32)
    assert list(debug.adakv_shares(scores, 5, 0.2, 10)) == [9, 1]
    assert list(debug.adakv_shares(scores, 5, 0.0, 10)) == [9, 1]  # at least one cell even with alpha 0
    assert list(debug.adakv_shares(scores, 5, 0.2, 6)) == [6, 4]
    with pytest.raises(KVEvictError, match="budget <= n"):
        debug.adakv_shares(scores, 11, 0.2, 10)


@pytest.mark.parametrize("policy", ["snapkv-ada", "criticalkv-ada"])
def test_each_head_keeps_its_adakv_share_of_its_own_best_cells(llama_cpp, tiny_path, policy):
    ref = TinyRef(tiny_path, kv_cache_dtype="f32")
    llm = _llama(llama_cpp, tiny_path)
    window, budget = 8, 40
    b = budget - window
    sess = Session(llm, EvictConfig(budget=budget, window=window, granularity="head", policy=policy))
    tokens = random_tokens(100, seed=20)
    sess.decode(tokens)
    scores, norms = _reference_scores(ref, tokens, window, policy.removesuffix("-ada"))
    sess.evict()
    n_cells = _lib.stats(llm)["n_seq_cells"]
    held = held_positions(llm, ref, n_cells)
    shares = []
    for il in range(ref.n_layer):
        share = adakv_shares(scores[il], b, 0.2, 2 * b)
        shares.append(share)
        for g in range(ref.n_head_kv):
            prefix = held[il, g, : n_cells - window]
            np.testing.assert_array_equal(prefix[prefix >= 0], select_head(policy, scores[il, g], norms[il, g], share[g]))
            assert (prefix[share[g]:] == -1).all()
            assert (held[il, g, -window:] == np.arange(100 - window, 100)).all()
    assert n_cells == max(s.max() for s in shares) + window
    assert any(len(set(s)) > 1 for s in shares), "the shares should differ between heads on this model"


# q8_0: the oracle quantizes K/V as llama.cpp stores them (Hadamard-rotated blocks); flash attention's own f16
# rounding of Q and of the softmax leaves ~0.03, far below the 1.7+ between the masked and the unmasked forward
@pytest.mark.parametrize("policy", ["snapkv-ada", "criticalkv-ada"])
@pytest.mark.parametrize("cache, flash_attn, atol", [("f32", False, 5e-5), ("f16", True, 1e-2), ("q8_0", True, 0.1)])
def test_logits_after_ada_eviction_match_numpy_with_per_head_masks(llama_cpp, tiny64_path, policy, cache, flash_attn, atol):
    ref = TinyRef(tiny64_path, kv_cache_dtype=None if cache == "f32" else cache)
    llm = llama_cpp.Llama(model_path=tiny64_path, n_ctx=512, n_batch=256, n_ubatch=256, verbose=False, flash_attn=flash_attn,
                          n_threads=2, n_threads_batch=2, type_k=TYPES[cache], type_v=TYPES[cache])
    sess = Session(llm, EvictConfig(budget=48, window=8, granularity="head", policy=policy))
    prefix = random_tokens(120, seed=21)
    sess.decode(prefix)
    sess.evict()
    keep = keep_from_held(held_positions(llm, ref, _lib.stats(llm)["n_seq_cells"]), len(prefix))
    assert (keep.sum(axis=(1, 2)) == ref.n_head_kv * 48).all(), "each layer keeps n_kv * budget (head, cell) pairs"
    assert len(np.unique(keep.sum(axis=-1))) > 1, "unequal shares, so the per-head mask matters"
    new = random_tokens(6, seed=22)
    got = np.stack([sess.decode([t]) for t in new])
    expected = ref.decode_with_cache(prefix, keep=keep, new_tokens=new)
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)
    # the oracle tells masked from unmasked: every head attending every kept cell gives other logits
    unmasked = ref.decode_with_cache(prefix, keep=keep.any(axis=1, keepdims=True).repeat(ref.n_head_kv, axis=1), new_tokens=new)
    assert np.abs(unmasked - expected).max() > 10 * atol


def test_ada_needs_head_granularity(llama_cpp, tiny_path):
    llm = _llama(llama_cpp, tiny_path)
    with pytest.raises(KVEvictError, match="use granularity head"):
        _lib.enable(llm, EvictConfig(budget=64, window=8, granularity="token", policy="criticalkv-ada"))


def test_disable_after_ada_eviction_drops_the_cells_a_head_lacks(llama_cpp, tiny_path):
    ref = TinyRef(tiny_path, kv_cache_dtype="f32")
    llm = _llama(llama_cpp, tiny_path)
    sess = Session(llm, EvictConfig(budget=40, window=8, granularity="head", policy="snapkv-ada"))
    prefix = random_tokens(100, seed=23)
    sess.decode(prefix)
    sess.evict()
    held = held_positions(llm, ref, _lib.stats(llm)["n_seq_cells"])
    full_cells = (held >= 0).all(axis=(0, 1))  # cells every head of every layer holds a token in
    pos = _lib.positions(llm)
    _lib.disable(llm)
    np.testing.assert_array_equal(_lib.positions(llm), pos[full_cells])
    # what is left is exact for plain llama.cpp: logits = the numpy forward on those cells, per head
    keep = keep_from_held(held[:, :, full_cells], len(prefix))
    got = sess.decode([5])
    np.testing.assert_allclose(got, ref.decode_with_cache(prefix, keep=keep, new_tokens=[5])[0], rtol=0, atol=5e-5)


@pytest.mark.parametrize("policy", ["criticalkv-ada", "snapkv-ada"])
def test_repeated_ada_evictions_stay_within_bound_smollm2(llama_cpp, smollm2_path, policy):
    budget, n_batch, window = 256, 128, 32
    config = EvictConfig(budget=budget, window=window, granularity="head", policy=policy)
    llm = _llama(llama_cpp, smollm2_path, "f16", n_ctx=config.cells + n_batch, n_batch=n_batch)
    sess = Session(llm, config)
    tokens = llm.tokenize(b"The committee met on Tuesday to review the budget of the harbour authority. " * 80)[:1500]
    seen = []
    logits = sess.decode(tokens, on_batch=lambda n, total: seen.append(_lib.stats(llm)["n_seq_cells"]))
    st = _lib.stats(llm)
    assert max(seen) <= config.cells + n_batch and st["n_evictions"] >= 4
    assert np.isfinite(logits).all()


def test_ada_eviction_after_a_reset_reuses_cells_cleanly(llama_cpp, tiny64_path):
    # the second conversation lands in the cells of the first, at the same positions: no head may keep the first
    # one's per-head mask
    ref = TinyRef(tiny64_path)
    llm = _llama(llama_cpp, tiny64_path)
    sess = Session(llm, EvictConfig(budget=48, window=8, granularity="head", policy="criticalkv-ada"))
    sess.decode(random_tokens(120, seed=24))
    sess.evict()
    sess.reset()
    prefix = random_tokens(120, seed=25)
    sess.decode(prefix)
    sess.evict()
    keep = keep_from_held(held_positions(llm, ref, _lib.stats(llm)["n_seq_cells"]), len(prefix))
    assert (keep.sum(axis=(1, 2)) == ref.n_head_kv * 48).all()
    new = random_tokens(4, seed=26)
    got = np.stack([sess.decode([t]) for t in new])
    np.testing.assert_allclose(got, ref.decode_with_cache(prefix, keep=keep, new_tokens=new), rtol=0, atol=5e-5)
