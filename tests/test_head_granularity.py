"""Head granularity: every (layer, KV head) keeps its own cells, compacted into the sequence's first cells.
Checked against the rows as they were before (byte for byte) and against the numpy forward with per-head masks."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_tokens
from pyllmkv import _lib
from pyllmkv._lib import EvictConfig, KVEvictError
from pyllmkv.session import Session
from test_hook import _llama, _reference_scores
from tinymodel import TinyRef

TYPES = {"f32": 0, "f16": 1, "bf16": 30}  # GGML_TYPE_*


def _context(llama_cpp, path, cache, flash_attn):
    return llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=256, n_ubatch=256, verbose=False, flash_attn=flash_attn,
                           n_threads=2, n_threads_batch=2, type_k=TYPES[cache], type_v=TYPES[cache])


def _per_head_bytes(rows, n_kv):
    # [n_cells, n_kv * head bytes] -> [n_kv, n_cells, head bytes]
    return rows.reshape(rows.shape[0], n_kv, -1).transpose(1, 0, 2)


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("cache", ["f32", "f16", "bf16"])
def test_compacted_rows_equal_original_rows(llama_cpp, tiny_path, cache, flash_attn):
    ref = TinyRef(tiny_path)
    llm = _context(llama_cpp, tiny_path, cache, flash_attn)
    sess = Session(llm, EvictConfig(budget=40, window=8, granularity="head"))
    tokens = random_tokens(100, seed=9)
    sess.decode(tokens)
    before = {(il, v): _per_head_bytes(_lib.read_rows(llm, il, v, 100), ref.n_head_kv) for il in range(ref.n_layer) for v in (False, True)}
    assert sess.evict() == 60
    assert _lib.stats(llm)["n_seq_cells"] == 40
    for il in range(ref.n_layer):
        held = _lib.head_positions(llm, il, ref.n_head_kv)  # [n_kv, 40]: the token each head holds per cell
        assert (held[:, -8:] == np.arange(92, 100)).all()  # the window stays in every head
        assert not all((held[g] == held[0]).all() for g in range(ref.n_head_kv)), "heads should choose differently"
        for v in (False, True):
            after = _per_head_bytes(_lib.read_rows(llm, il, v, 40), ref.n_head_kv)
            for g in range(ref.n_head_kv):
                np.testing.assert_array_equal(after[g], before[(il, v)][g][held[g]])


def test_each_head_keeps_the_cells_its_own_scores_select(llama_cpp, tiny_path):
    ref = TinyRef(tiny_path, kv_cache_dtype="f32")
    llm = _llama(llama_cpp, tiny_path)
    window, budget = 8, 40
    sess = Session(llm, EvictConfig(budget=budget, window=window, granularity="head", policy="snapkv"))
    tokens = random_tokens(100, seed=10)
    sess.decode(tokens)
    scores, _ = _reference_scores(ref, tokens, window, "snapkv")
    sess.evict()
    for il in range(ref.n_layer):
        held = _lib.head_positions(llm, il, ref.n_head_kv)
        for g in range(ref.n_head_kv):
            expected = np.sort(np.argsort(-scores[il, g], kind="stable")[: budget - window])
            np.testing.assert_array_equal(held[g, : budget - window], expected)


@pytest.mark.parametrize("policy", ["criticalkv", "snapkv"])
@pytest.mark.parametrize("cache, flash_attn, atol", [("f32", False, 5e-5), ("f16", True, 1e-2)])
def test_logits_after_head_eviction_match_numpy_with_per_head_masks(llama_cpp, tiny_path, policy, cache, flash_attn, atol):
    ref = TinyRef(tiny_path, kv_cache_dtype=None if cache == "f32" else "f16")
    llm = _context(llama_cpp, tiny_path, cache, flash_attn)
    sess = Session(llm, EvictConfig(budget=48, window=8, granularity="head", policy=policy))
    prefix = random_tokens(120, seed=11)
    sess.decode(prefix)
    sess.evict()
    keep = np.zeros((ref.n_layer, ref.n_head_kv, len(prefix)), dtype=bool)
    for il in range(ref.n_layer):
        held = _lib.head_positions(llm, il, ref.n_head_kv)
        for g in range(ref.n_head_kv):
            keep[il, g, held[g]] = True
    assert (keep.sum(axis=-1) == 48).all()
    new = random_tokens(6, seed=12)
    got = np.stack([sess.decode([t]) for t in new])
    expected = ref.decode_with_cache(prefix, keep=keep, new_tokens=new)
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


def test_repeated_head_evictions_stay_within_budget_smollm2(llama_cpp, smollm2_path):
    budget, n_batch = 256, 128
    llm = _llama(llama_cpp, smollm2_path, "f16", n_ctx=budget + n_batch, n_batch=n_batch)
    sess = Session(llm, EvictConfig(budget=budget, window=32, granularity="head"))
    tokens = llm.tokenize(b"The committee met on Tuesday to review the budget of the harbour authority. " * 80)[:1500]
    seen = []
    logits = sess.decode(tokens, on_batch=lambda n, total: seen.append(_lib.stats(llm)["n_seq_cells"]))
    assert max(seen) <= budget + n_batch and _lib.stats(llm)["n_evictions"] >= 5
    assert np.isfinite(logits).all()


def test_quantized_cache_is_refused_for_head_granularity(llama_cpp, tiny_path):
    llm = llama_cpp.Llama(model_path=tiny_path, n_ctx=512, verbose=False, flash_attn=True, type_k=8, type_v=8)  # q8_0
    with pytest.raises(KVEvictError, match="head granularity needs an f32, f16 or bf16"):
        _lib.enable(llm, EvictConfig(budget=64, window=8, granularity="head"))
