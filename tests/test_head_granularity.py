"""Head granularity: every (layer, KV head) keeps its own cells, compacted into the sequence's first cells.
Checked against the rows as they were before (byte for byte) and against the numpy forward with per-head masks."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import held_positions, keep_from_held, random_tokens
from pyllmkv import _lib, debug
from pyllmkv._lib import EvictConfig, KVEvictError
from pyllmkv.reference import key_norm_scores, select_head
from pyllmkv.session import Session
from test_hook import _llama, _reference_scores
from tinymodel import TinyRef, hadamard64

TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8}  # GGML_TYPE_*


def _context(llama_cpp, path, cache, flash_attn, n_gpu_layers=0):
    return llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=256, n_ubatch=256, verbose=False, flash_attn=flash_attn,
                           n_threads=2, n_threads_batch=2, type_k=TYPES[cache], type_v=TYPES[cache], n_gpu_layers=n_gpu_layers)


def _per_head_bytes(rows, n_kv):
    # [n_cells, n_kv * head bytes] -> [n_kv, n_cells, head bytes]
    return rows.reshape(rows.shape[0], n_kv, -1).transpose(1, 0, 2)


# quantized V needs flash attention in llama.cpp (V stored per cell); float V is stored transposed without it
CACHES = [(t, fa) for t in ("f32", "f16", "bf16") for fa in (False, True)] + [(t, True) for t in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")]


@pytest.mark.parametrize("cache, flash_attn", CACHES)
@pytest.mark.parametrize("policy", ["criticalkv", "criticalkv-ada"])
def test_compacted_rows_equal_original_rows(llama_cpp, tiny64_path, cache, flash_attn, policy):
    ref = TinyRef(tiny64_path)
    llm = _context(llama_cpp, tiny64_path, cache, flash_attn)
    sess = Session(llm, EvictConfig(budget=40, window=8, granularity="head", policy=policy))
    tokens = random_tokens(100, seed=9)
    sess.decode(tokens)
    before = {(il, v): _per_head_bytes(debug.read_rows(llm, il, v, 100), ref.n_head_kv) for il in range(ref.n_layer) for v in (False, True)}
    n_removed = sess.evict()
    n_cells = _lib.stats(llm)["n_seq_cells"]
    assert n_removed == 100 - n_cells and (n_cells == 40 or policy.endswith("-ada"))
    for il in range(ref.n_layer):
        held = debug.head_positions(llm, il, ref.n_head_kv)  # [n_kv, n_cells]: the token each head holds per cell
        assert (held[:, -8:] == np.arange(92, 100)).all()  # the window stays in every head
        assert not all((held[g] == held[0]).all() for g in range(ref.n_head_kv)), "heads should choose differently"
        for v in (False, True):
            after = _per_head_bytes(debug.read_rows(llm, il, v, n_cells), ref.n_head_kv)
            for g in range(ref.n_head_kv):
                kept = held[g] >= 0  # an -ada head whose share is shorter holds nothing in the last cells
                np.testing.assert_array_equal(after[g][kept], before[(il, v)][g][held[g][kept]])


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
        held = debug.head_positions(llm, il, ref.n_head_kv)
        for g in range(ref.n_head_kv):
            expected = np.sort(np.argsort(-scores[il, g], kind="stable")[: budget - window])
            np.testing.assert_array_equal(held[g, : budget - window], expected)


@pytest.mark.parametrize("cache", ["f16", "q8_0"])
def test_knorm_heads_keep_their_smallest_keys(llama_cpp, tiny64_path, cache):
    # llama.cpp stores a q8_0 K rotated by a Hadamard matrix: an orthonormal rotation, so the stored rows' norms are the
    # keys' (up to the quantization the reference models)
    ref = TinyRef(tiny64_path, kv_cache_dtype=cache)
    llm = _context(llama_cpp, tiny64_path, cache, flash_attn=True)
    budget, window = 40, 8
    sess = Session(llm, EvictConfig(budget=budget, window=window, granularity="head", policy="knorm"))
    tokens = random_tokens(100, seed=13)
    sess.decode(tokens)
    assert sess.evict() == 100 - budget
    for il, layer in enumerate(ref.trace(tokens).layers):
        scores = key_norm_scores(layer.k, len(tokens) - window)
        held = debug.head_positions(llm, il, ref.n_head_kv)
        for g in range(ref.n_head_kv):
            np.testing.assert_array_equal(held[g, : budget - window], select_head("knorm", scores[g], None, budget - window))


@pytest.mark.parametrize("policy", ["criticalkv", "snapkv"])
@pytest.mark.parametrize("cache, flash_attn, atol", [("f32", False, 5e-5), ("f16", True, 1e-2), ("f16", False, 1e-2), ("q8_0", True, 0.1)])
def test_logits_after_head_eviction_match_numpy_with_per_head_masks(llama_cpp, tiny64_path, policy, cache, flash_attn, atol):
    ref = TinyRef(tiny64_path, kv_cache_dtype=None if cache == "f32" else cache)
    llm = _context(llama_cpp, tiny64_path, cache, flash_attn)
    sess = Session(llm, EvictConfig(budget=48, window=8, granularity="head", policy=policy))
    prefix = random_tokens(120, seed=11)
    sess.decode(prefix)
    sess.evict()
    keep = keep_from_held(held_positions(llm, ref), len(prefix))
    assert (keep.sum(axis=-1) == 48).all()
    new = random_tokens(6, seed=12)
    got = np.stack([sess.decode([t]) for t in new])
    expected = ref.decode_with_cache(prefix, keep=keep, new_tokens=new)
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


def test_repeated_head_evictions_stay_within_budget_smollm2(llama_cpp, smollm2_path):
    budget, n_batch = 256, 128
    llm = _llama(llama_cpp, smollm2_path, "f16", n_ctx=budget + n_batch, n_batch=n_batch)
    sess = Session(llm, EvictConfig.for_cells(budget, window=32, granularity="head"))
    tokens = llm.tokenize(b"The committee met on Tuesday to review the budget of the harbour authority. " * 80)[:1500]
    seen = []
    logits = sess.decode(tokens, on_batch=lambda n, total: seen.append(_lib.stats(llm)["n_seq_cells"]))
    assert max(seen) <= budget + n_batch and _lib.stats(llm)["n_evictions"] >= 5
    assert np.isfinite(logits).all()


def test_quantized_head_slice_that_is_not_whole_words_is_refused(llama_cpp, tiny_path):
    # head_dim 32 in q8_0: one 34-byte block per head, not a whole number of 4-byte words
    llm = llama_cpp.Llama(model_path=tiny_path, n_ctx=512, verbose=False, flash_attn=True, type_k=8, type_v=8)
    with pytest.raises(KVEvictError, match="head granularity cannot move K rows of type q8_0.*use granularity token"):
        _lib.enable(llm, EvictConfig(budget=64, window=8, granularity="head"))
    _lib.enable(llm, EvictConfig(budget=64, window=8, policy="criticalkv", granularity="token"))


@pytest.mark.parametrize("cut", [95, 60])
@pytest.mark.parametrize("policy", ["criticalkv", "criticalkv-ada"])
def test_truncating_after_head_eviction_removes_moved_rows_of_later_tokens(llama_cpp, tiny_path, policy, cut):
    # compaction puts rows of late tokens into early cells: cutting the sequence at `cut` must drop those cells too,
    # or a chat that goes back to `cut` would still attend tokens it took back; and since the sequence continues
    # after its last cell, cells holding rows of tokens past that go as well
    ref = TinyRef(tiny_path, kv_cache_dtype="f32")
    llm = _llama(llama_cpp, tiny_path)
    sess = Session(llm, EvictConfig(budget=40, window=8, granularity="head", policy=policy))
    prefix = random_tokens(100, seed=13)
    sess.decode(prefix)
    sess.evict()
    before = held_positions(llm, ref)
    resume = sess.truncate(cut)
    pos = _lib.positions(llm)
    held = held_positions(llm, ref)
    assert resume == (pos.max() + 1 if len(pos) else 0) and held.max(initial=-1) < resume <= cut
    if cut == 95:  # inside the window: only the window's cells from 95 on go
        np.testing.assert_array_equal(held, before[:, :, : len(pos)])
        assert len(pos) == before.shape[-1] - 5
    keep = keep_from_held(held, cut)
    new = random_tokens(3, seed=14)
    got = np.stack([sess.decode([t]) for t in new])
    expected = ref.decode_with_cache(prefix[:cut], keep=keep, new_tokens=new, new_positions=resume + np.arange(3))
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-5)


@pytest.mark.parametrize("policy", ["criticalkv", "snapkv-ada"])
@pytest.mark.parametrize("cache, atol", [("f32", 5e-5), ("q8_0", 0.1)])
def test_compact_positions_numbers_each_heads_rows_on_their_own(llama_cpp, tiny64_path, policy, cache, atol):
    # head-wise eviction keeps different tokens per KV head: renumbering gives each head's rows, in order, the
    # positions that end at the last cell, so no head sees a token further back than the cells hold (one numbering of
    # every token some head holds would stretch past the trained positions on long streams)
    renumbering_against_numpy(_context(llama_cpp, tiny64_path, cache, flash_attn=cache != "f32"), tiny64_path, policy,
                              cache, atol, rope_atol=2e-5)


def renumbering_against_numpy(llm, path, policy, cache, atol, rope_atol):
    """Evicts head-wise and renumbers; each row turns by its own move, the window's queries by theirs (q8_0: K is
    stored Hadamard-rotated, and so are the captured queries; the K-shift requantizes the rows it turns), and the next
    tokens attend each head's rows where they now are."""
    ref = TinyRef(path, kv_cache_dtype=cache)
    sess = Session(llm, EvictConfig(budget=40, window=8, granularity="head", policy=policy))
    prefix = random_tokens(100, seed=15)
    sess.decode(prefix)
    sess.evict()
    n_cells = _lib.stats(llm)["n_seq_cells"]
    held = held_positions(llm, ref)
    rows = [debug.read_rows(llm, il, False, n_cells).view(np.float32).reshape(n_cells, ref.n_head_kv, ref.head_dim) for il in range(ref.n_layer if cache == "f32" else 0)]
    queries = [debug.queries(llm, il) for il in range(ref.n_layer)]
    assert held.max() >= _lib.positions(llm)[-9], "compaction moved rows of later tokens into earlier cells"
    assert len(np.union1d(held[held >= 0], _lib.positions(llm))) > n_cells, "the heads hold no more tokens than cells"
    target = np.full_like(held, -1)  # the oracle: each head's tokens in order, the newest at the last cell
    key_positions = np.zeros((ref.n_layer, ref.n_head_kv, len(prefix)), dtype=np.int64)
    for il in range(ref.n_layer):
        for g in range(ref.n_head_kv):
            kept = np.flatnonzero(held[il, g] >= 0)
            kept = kept[np.argsort(held[il, g][kept])]
            target[il, g, kept] = n_cells - len(kept) + np.arange(len(kept))
            key_positions[il, g, held[il, g][kept]] = target[il, g, kept]

    sess.n_past = _lib.compact_positions(llm)
    assert sess.n_past == n_cells
    np.testing.assert_array_equal(_lib.positions(llm), np.arange(n_cells))
    delta = n_cells - len(prefix)  # how far the window's cells moved
    for il, (pos, q, _) in enumerate(queries):
        pos_after, q_after, _ = debug.queries(llm, il)
        np.testing.assert_array_equal(pos_after, pos + delta)
        rotate = hadamard64 if cache == "q8_0" else (lambda x: x)
        turned = rotate(ref.rope(rotate(q.reshape(len(pos), ref.n_head, ref.head_dim).astype(np.float64)), np.full(len(pos), delta)))
        np.testing.assert_allclose(q_after, turned.reshape(len(pos), -1), rtol=0, atol=rope_atol)

    new = random_tokens(3, seed=16)
    got = np.stack([sess.decode([t]) for t in new])  # the first decode applies llama.cpp's K-shift
    np.testing.assert_array_equal(held_positions(llm, ref, n_cells), target)
    for il in range(len(rows)):  # f32: bit for bit up to RoPE's rounding
        after = debug.read_rows(llm, il, False, n_cells + 3)[:n_cells].view(np.float32).reshape(n_cells, ref.n_head_kv, ref.head_dim)
        for g in range(ref.n_head_kv):
            kept = held[il, g] >= 0
            expected = ref.rope(rows[il][kept, g][:, None, :].astype(np.float64), target[il, g][kept] - held[il, g][kept])
            np.testing.assert_allclose(after[kept, g], expected[:, 0], rtol=0, atol=rope_atol)
    expected = ref.decode_with_cache(prefix, keep=keep_from_held(held, len(prefix)), new_tokens=new,
                                     new_positions=n_cells + np.arange(3), key_positions=key_positions)
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)
    assert _lib.evict(llm) >= 0  # the window's queries, turned, still score

