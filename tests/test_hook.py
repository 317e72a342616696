"""The eviction hook inside llama.cpp, checked against independent oracles:
1. scores equal the numpy reference computed from the tiny model's own Q/K/V/W_O (pyllmkv/reference.py);
2. within budget, logits are bit-identical to the same build with the hook disabled;
3. after an eviction, logits equal a numpy forward pass that attends only to the kept cells;
4. the cache never holds more than budget + n_batch cells (llama.cpp's own counts).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from conftest import random_tokens
from pyllmkv import _lib
from pyllmkv._lib import EvictConfig, KVEvictError
from pyllmkv.session import Session
from pyllmkv.reference import head_scores, key_norm_scores, select_token, value_norms, window_attention
from tinymodel import TinyRef

F32 = 0  # GGML_TYPE_F32

# Attention shares are O(1/n). The reference rounds cached K/V to f16 as llama.cpp stores them; llama.cpp also rounds
# Q to f16 for the product with an f16 K cache, which the reference does not: hence the looser f16 tolerance.
SCORE_TOL = {"f32": dict(rtol=0, atol=1e-6), "f16": dict(rtol=3e-3, atol=2e-5)}
NORM_RTOL = {"f32": 1e-5, "f16": 1e-3}


def _llama(llama_cpp, path, cache="f32", n_ctx=512, n_batch=256, flash_attn=False, **kw):
    types = dict(type_k=F32, type_v=F32) if cache == "f32" else {}
    return llama_cpp.Llama(
        model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, verbose=False, flash_attn=flash_attn,
        n_threads=2, n_threads_batch=2, **types, **kw,
    )


def _decode_in_parts(sess, tokens):
    # the window's queries come from two batches and single-token decodes, as in a chat
    sess.decode(tokens[:-3])
    for t in tokens[-3:]:
        sess.decode([t])


def _reference_scores(ref, tokens, window, policy):
    trace = ref.trace(tokens)
    pos = np.arange(len(tokens))
    scores, norms = [], []
    for il, layer in enumerate(trace.layers):
        a = window_attention(layer.q[-window:], pos[-window:], layer.k, pos, 1.0 / math.sqrt(ref.head_dim))
        if policy == "knorm":
            scores.append(key_norm_scores(layer.k, len(tokens) - window))
        else:
            scores.append(head_scores(a, window, ref.n_head_kv, policy))
        norms.append(value_norms(layer.v, ref.w_o(il), ref.n_head)[:, : len(tokens) - window])
    return np.stack(scores), np.stack(norms)


@pytest.mark.parametrize("cache", ["f32", "f16"])
@pytest.mark.parametrize("policy", ["criticalkv", "snapkv", "tova", "h2o", "knorm"])
def test_scores_match_numpy_reference(llama_cpp, tiny_path, cache, policy):
    ref = TinyRef(tiny_path, kv_cache_dtype=cache)
    llm = _llama(llama_cpp, tiny_path, cache)
    window = 8
    sess = Session(llm, EvictConfig(budget=40, window=window, policy=policy))
    tokens = random_tokens(100)
    _decode_in_parts(sess, tokens)

    exp_scores, exp_norms = _reference_scores(ref, tokens, window, policy)
    for il in range(ref.n_layer):
        pos, score, norm = _lib.scores(llm, il, ref.n_head_kv)
        np.testing.assert_array_equal(pos, np.arange(len(tokens) - window))
        # attention shares are O(1/n), key norms O(1)
        tol = dict(rtol=NORM_RTOL[cache], atol=0) if policy == "knorm" else SCORE_TOL[cache]
        np.testing.assert_allclose(score, exp_scores[il], **tol)
        np.testing.assert_allclose(norm, exp_norms[il], rtol=NORM_RTOL[cache])


@pytest.mark.parametrize("policy", ["criticalkv", "snapkv", "tova", "h2o", "streaming", "knorm"])
def test_eviction_keeps_the_cells_the_reference_selects(llama_cpp, tiny_path, policy):
    ref = TinyRef(tiny_path, kv_cache_dtype="f32")
    llm = _llama(llama_cpp, tiny_path)
    window, budget = 8, 40
    sess = Session(llm, EvictConfig(budget=budget, window=window, policy=policy, granularity="token"))
    tokens = random_tokens(100, seed=2)
    _decode_in_parts(sess, tokens)

    exp_scores, exp_norms = _reference_scores(ref, tokens, window, policy)
    keep = select_token(policy, exp_scores, exp_norms, budget, window)
    expected = np.concatenate([np.flatnonzero(keep), np.arange(len(tokens) - window, len(tokens))])

    assert sess.evict() == len(tokens) - budget
    np.testing.assert_array_equal(_lib.positions(llm), expected)


@pytest.mark.parametrize("policy", ["criticalkv", "streaming"])
def test_logits_after_eviction_match_numpy_forward_on_kept_cells(llama_cpp, tiny_path, policy):
    ref = TinyRef(tiny_path, kv_cache_dtype="f32")
    llm = _llama(llama_cpp, tiny_path)
    sess = Session(llm, EvictConfig(budget=48, window=8, policy=policy, granularity="token"))
    prefix = random_tokens(120, seed=3)
    sess.decode(prefix)
    sess.evict()
    kept = _lib.positions(llm)
    assert len(kept) == 48

    new = random_tokens(6, seed=4)
    got = np.stack([sess.decode([t]) for t in new])
    keep = np.zeros(len(prefix), dtype=bool)
    keep[kept] = True
    expected = ref.decode_with_cache(prefix, keep=keep, new_tokens=new)
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-5)


def _logits_run(llama_cpp, path, tokens, config, n_ctx, n_batch, **kw):
    llm = _llama(llama_cpp, path, "f16", n_ctx=n_ctx, n_batch=n_batch, **kw)
    sess = Session(llm, config)
    out = [sess.decode(tokens[:-8], all_logits=True)]
    out += [sess.decode([t])[None] for t in tokens[-8:]]
    if config is not None:
        assert _lib.stats(llm)["n_evictions"] == 0
    return np.concatenate(out)


@pytest.mark.parametrize("flash_attn", [False, True])
def test_logits_bit_identical_to_hook_disabled_within_budget_tiny(llama_cpp, tiny_path, flash_attn):
    tokens = random_tokens(200, seed=5)
    base = _logits_run(llama_cpp, tiny_path, tokens, None, 512, 64, flash_attn=flash_attn)
    hooked = _logits_run(llama_cpp, tiny_path, tokens, EvictConfig.for_cells(448, window=16), 512, 64, flash_attn=flash_attn)
    np.testing.assert_array_equal(hooked, base)


def test_logits_bit_identical_to_hook_disabled_within_budget_smollm2(llama_cpp, smollm2_path):
    llm = llama_cpp.Llama(model_path=smollm2_path, n_ctx=512, verbose=False, vocab_only=True)
    tokens = llm.tokenize(b"The KV cache of a transformer grows with every token it reads. " * 12)[:300]
    base = _logits_run(llama_cpp, smollm2_path, tokens, None, 1024, 128)
    hooked = _logits_run(llama_cpp, smollm2_path, tokens, EvictConfig.for_cells(512, window=32), 1024, 128)
    np.testing.assert_array_equal(hooked, base)


def _long_text(n_repeat=40):
    # real English, varied enough that attention is not uniform
    import this  # noqa: F401  (prints the Zen of Python to stdout once)
    import codecs

    zen = codecs.decode(this.s, "rot13")
    return (zen + "\n") * n_repeat


@pytest.mark.parametrize("policy", ["criticalkv", "snapkv", "h2o", "tova", "streaming", "knorm"])
def test_cells_stay_within_budget_plus_batch_smollm2(llama_cpp, smollm2_path, policy):
    budget, n_batch = 256, 128
    llm = _llama(llama_cpp, smollm2_path, "f16", n_ctx=budget + n_batch, n_batch=n_batch)
    sess = Session(llm, EvictConfig(budget=budget, window=32, policy=policy))
    tokens = llm.tokenize(_long_text().encode())[:1500]
    seen = []
    logits = sess.decode(tokens, on_batch=lambda n, total: seen.append(_lib.stats(llm)))
    for st in seen:
        assert st["n_seq_cells"] <= budget + n_batch
        assert st["n_cells_used"] <= budget + n_batch
    assert seen[-1]["n_evictions"] >= (len(tokens) - budget - n_batch) // n_batch
    assert np.isfinite(logits).all()
    # what stays: the window (the last 32 positions) in full
    kept = _lib.positions(llm)
    assert set(range(sess.n_past - 32, sess.n_past)) <= set(kept.tolist())


def test_gemma3_evicts_full_attention_cache_only(llama_cpp, gemma3_path):
    budget, n_batch = 256, 128
    # the sliding-window cache (window 512) is sized from n_ctx too and keeps its window: 512 + n_batch cells
    llm = _llama(llama_cpp, gemma3_path, "f16", n_ctx=512 + n_batch, n_batch=n_batch)
    sess = Session(llm, EvictConfig.for_cells(budget, window=32))
    tokens = llm.tokenize(_long_text().encode())[:1200]
    seen = []
    logits = sess.decode(tokens, on_batch=lambda n, total: seen.append(_lib.stats(llm)))
    assert all(st["n_seq_cells"] <= budget + n_batch for st in seen)
    assert seen[-1]["n_evicted"] > 0
    assert np.isfinite(logits).all()

    # Gemma 3: every 6th layer attends globally; the others are sliding-window layers llama.cpp bounds itself
    pos, score, norm = _lib.scores(llm, 5, 1)
    np.testing.assert_array_equal(pos, _lib.positions(llm)[:-32])
    assert np.isfinite(score).all() and (norm > 0).all()
    with pytest.raises(KVEvictError, match="not a layer of the evicted"):
        _lib.scores(llm, 0, 1)


# bad input: a clear error naming the problem, never a crash

def test_evict_config_defaults_are_the_hooks_as_written():
    # EvictConfig takes its defaults from llama_kv_evict_default_params: the values as C writes them, not float32's
    # nearest doubles (which --help would print)
    c = EvictConfig()
    assert (c.budget, c.policy, c.granularity, c.window, c.pool_kernel, c.n_sink) == (1024, "defensivekv-layer", "head", 32, 13, 4)
    assert (c.first_stage_ratio, c.epsilon, c.ada_alpha) == (0.5, 1e-4, 0.2)


def test_budget_not_larger_than_window_is_refused(llama_cpp, tiny_path):
    llm = _llama(llama_cpp, tiny_path)
    with pytest.raises(KVEvictError, match="larger than window"):
        _lib.enable(llm, EvictConfig(budget=32, window=32))
    with pytest.raises(KVEvictError, match="window must be at least 1"):
        _lib.enable(llm, EvictConfig(budget=32, window=0))


def test_budget_larger_than_cache_is_refused(llama_cpp, tiny_path):
    llm = _llama(llama_cpp, tiny_path, n_ctx=256)
    with pytest.raises(KVEvictError, match="exceeds the cache size"):
        _lib.enable(llm, EvictConfig(budget=1000, window=8))


def test_unknown_policy_is_refused(llama_cpp, tiny_path):
    llm = _llama(llama_cpp, tiny_path)
    with pytest.raises(ValueError, match="unknown policy 'lru'"):
        _lib.enable(llm, EvictConfig(budget=64, policy="lru"))
    params = EvictConfig(budget=64, window=8).to_c()
    params.policy = 99
    import ctypes

    rc = _lib._enable(_lib._ctx(llm), ctypes.byref(params))
    assert rc == -1 and "unknown policy 99" in _lib._last_error().decode()


def test_even_pool_kernel_is_refused(llama_cpp, tiny_path):
    llm = _llama(llama_cpp, tiny_path)
    with pytest.raises(KVEvictError, match="pool_kernel must be odd"):
        _lib.enable(llm, EvictConfig(budget=64, window=8, pool_kernel=4))


def test_recurrent_architecture_is_refused(llama_cpp, tmp_path):
    from tinymodel import write_tiny_mamba

    llm = llama_cpp.Llama(model_path=write_tiny_mamba(tmp_path / "mamba.gguf"), n_ctx=256, verbose=False)
    with pytest.raises(KVEvictError, match="recurrent"):
        _lib.enable(llm, EvictConfig(budget=64, window=8))


def test_evict_without_enable_is_an_error(llama_cpp, tiny_path):
    llm = _llama(llama_cpp, tiny_path)
    with pytest.raises(KVEvictError, match="not enabled"):
        _lib.evict(llm)


def test_evict_on_empty_sequence_removes_nothing(llama_cpp, tiny_path):
    llm = _llama(llama_cpp, tiny_path)
    _lib.enable(llm, EvictConfig(budget=64, window=8))
    assert _lib.evict(llm) == 0
    with pytest.raises(KVEvictError, match="out of range"):
        _lib.evict(llm, seq_id=3)


def test_evict_without_captured_queries_says_why(llama_cpp, tiny_path):
    llm = _llama(llama_cpp, tiny_path)
    sess = Session(llm)
    sess.decode(random_tokens(100))
    _lib.enable(llm, EvictConfig(budget=64, window=8))
    with pytest.raises(KVEvictError, match="no queries were captured"):
        _lib.evict(llm)


@pytest.mark.parametrize("policy", ["criticalkv", "criticalkv-ada"])
def test_positions_are_compacted_below_the_trained_context(llama_cpp, tmp_path, policy):
    # head-wise, each KV head keeps other tokens, and the tokens some head holds outnumber the trained positions:
    # each head's rows are numbered on their own
    from tinymodel import write_tiny_llama

    path = write_tiny_llama(tmp_path / "short.gguf", seed=1, n_ctx_train=256)
    config = EvictConfig(budget=64, window=8, policy=policy)
    llm = _llama(llama_cpp, path, n_ctx=config.cells + 32, n_batch=32)
    sess = Session(llm, config)
    assert sess.max_position == 256
    highest = []
    tokens = random_tokens(1500, seed=6)
    logits = sess.decode(tokens, on_batch=lambda n, total: highest.append(int(_lib.positions(llm)[-1])))
    for t in random_tokens(40, seed=7):  # single-token decodes after a compaction keep scoring and evicting
        logits = sess.decode([t])
        highest.append(int(_lib.positions(llm)[-1]))
    assert max(highest) < 256
    assert sess.n_past < 256 and _lib.stats(llm)["n_seq_cells"] <= config.cells + 32
    assert np.isfinite(logits).all()


def test_cells_past_max_position_are_renumbered_once_per_eviction(llama_cpp, tiny_path, monkeypatch):
    # a cache of more cells than max_position: a renumbering cannot bring the positions below it, and decoding must
    # not rescore and renumber at every token then
    config = EvictConfig(budget=64, window=8, policy="criticalkv-ada")
    llm = _llama(llama_cpp, tiny_path, n_ctx=config.cells + 32, n_batch=32)
    sess = Session(llm, config, max_position=64)
    renumbered = []
    compact = _lib.compact_positions
    monkeypatch.setattr(_lib, "compact_positions", lambda ctx, seq_id=0: renumbered.append(compact(ctx, seq_id)) or renumbered[-1])
    sess.decode(random_tokens(600, seed=9))
    assert renumbered[-1] > 64  # the case this guards: the cells kept outnumber the positions
    n_renumbered, n_evictions = len(renumbered), _lib.stats(llm)["n_evictions"]
    n_past = sess.n_past
    for t in random_tokens(100, seed=10):
        logits = sess.decode([t])
    n_new_evictions = _lib.stats(llm)["n_evictions"] - n_evictions
    assert 1 <= n_new_evictions <= 100 // 32 + 1  # evictions only when the cache is full, not one per token
    # renumbered after an eviction, and only then
    assert 1 <= len(renumbered) - n_renumbered <= n_new_evictions and sess.n_past < n_past + 100
    assert _lib.stats(llm)["n_seq_cells"] <= config.cells + 32 and np.isfinite(logits).all()


def test_renumber_reads_the_kept_cells_at_consecutive_positions_after_an_eviction(llama_cpp, tiny_path):
    # EvictConfig.renumber: within one decode the positions run on past the gaps its evictions leave; the next decode
    # reads the kept cells renumbered from 0, with the logits of the sequence renumbered by hand before it
    tokens, question = random_tokens(300, seed=11), random_tokens(5, seed=12)
    logits = {}
    for renumber in (False, True):
        config = EvictConfig(budget=64, window=8, policy="criticalkv", renumber=renumber)
        llm = _llama(llama_cpp, tiny_path, n_ctx=config.cells + 32, n_batch=32)
        sess = Session(llm, config)
        sess.decode(tokens)
        assert _lib.stats(llm)["n_evictions"] > 0 and _lib.positions(llm)[-1] == len(tokens) - 1
        n_cells = _lib.stats(llm)["n_seq_cells"]
        assert n_cells + len(question) <= config.cells + 32  # the question evicts nothing
        if not renumber:
            sess.n_past = _lib.compact_positions(llm)
        logits[renumber] = sess.decode(question)
        np.testing.assert_array_equal(_lib.positions(llm), np.arange(n_cells + len(question)))
        sess.decode(question)  # no eviction since the last renumbering: the positions run on
        np.testing.assert_array_equal(_lib.positions(llm), np.arange(n_cells + 2 * len(question)))
    np.testing.assert_array_equal(logits[True], logits[False])
    from pyllmkv.sequences import Sequences

    with pytest.raises(ValueError, match="renumber is for one sequence"):
        Sequences(_llama(llama_cpp, tiny_path, n_batch=32), config, n_seq=2)


def test_renumber_is_refused_where_the_cache_cannot_shift(llama_cpp, gemma3_path):
    # Gemma 3's sliding-window cache smaller than its full one (swa_full off): llama.cpp cannot shift positions there
    llm = _llama(llama_cpp, gemma3_path, "f16", n_ctx=2048, n_batch=128, swa_full=False)
    assert not llama_cpp.llama_memory_can_shift(llama_cpp.llama_get_memory(llm._ctx.ctx))
    config = EvictConfig.for_cells(256, window=32, renumber=True)
    with pytest.raises(ValueError, match="cannot shift them"):
        Session(llm, config)
    Session(llm, dataclasses.replace(config, renumber=False))  # evicting without renumbering is fine


def test_compacting_positions_keeps_order_and_cells(llama_cpp, tiny_path):
    llm = _llama(llama_cpp, tiny_path)
    sess = Session(llm, EvictConfig(budget=40, window=8, policy="criticalkv", granularity="token"))
    sess.decode(random_tokens(100, seed=8))
    sess.evict()
    before = _lib.positions(llm)
    assert _lib.compact_positions(llm) == len(before) == 40
    np.testing.assert_array_equal(_lib.positions(llm), np.arange(40))
    # the window's queries moved with their cells: scoring still sees all of them
    pos, score, _ = _lib.scores(llm, 0, 2)
    np.testing.assert_array_equal(pos, np.arange(32))
    assert np.isfinite(score).all() and score.sum() > 0


@pytest.mark.parametrize("policy, granularity", [("criticalkv", "head"), ("snapkv", "head"), ("criticalkv", "token")])
def test_profile_splits_the_eviction_time(llama_cpp, smollm2_path, policy, granularity):
    """llama_kv_evict_profile's phases add up to t_evict_us, and only a policy that weighs by value norms spends time
    on them."""
    from pyllmkv import debug

    budget, n_batch = 256, 128
    llm = _llama(llama_cpp, smollm2_path, "f16", n_ctx=budget + n_batch, n_batch=n_batch)
    sess = Session(llm, EvictConfig(budget=budget, window=32, policy=policy, granularity=granularity, prompt_tail=False))
    sess.decode(llm.tokenize(_long_text().encode())[:1500])
    st, phases = _lib.stats(llm), debug.profile(llm)
    assert st["n_evictions"] >= 5
    assert sum(phases.values()) == pytest.approx(st["t_evict_us"] / 1e6, rel=0.02, abs=1e-3)
    assert (phases["norms"] > 0) == (policy == "criticalkv")
    assert phases["score"] > 0 and phases["select"] > 0 and phases["compact"] > 0
