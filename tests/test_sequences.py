"""Several sequences in one context (issue 26): each keeps its own budget, window and evictions, so a sequence decoded
beside others gives the logits and keeps the cells it does when decoded alone (the oracle: the single-sequence
Session, one context per sequence)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from conftest import random_tokens
from pyllmkv import _lib, debug
from pyllmkv._lib import EvictConfig, KVEvictError
from pyllmkv.sequences import Sequences
from pyllmkv.session import Session
from tinymodel import TinyRef

F32 = 0  # GGML_TYPE_F32
N_BATCH = 24


def _llama(llama_cpp, path, **kw):
    return llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=N_BATCH, n_ubatch=N_BATCH, verbose=False, n_threads=2,
                           n_threads_batch=2, type_k=F32, type_v=F32, **kw)


# every policy at each granularity it takes (the -ada policies share a layer's cells between heads: head only), but
# surprisal, which Sequences refuses (test_surprisal.py)
POLICY_GRANULARITIES = [(p, g) for p, info in sorted(_lib.POLICY_INFO.items()) if not info.token_scores
                        for g in (["head"] if info.shares_heads else ["token", "head"])]


def _held(ctx, ref, seq_id):
    return np.stack([debug.head_positions(ctx, il, ref.n_head_kv, seq_id) for il in range(ref.n_layer)])


def _chunks(n_seq, seed, steps=40):
    """Per step, the tokens each sequence gets (a few sequences sit out some steps): prompts, then single tokens."""
    rng = random.Random(seed)
    plan = []
    for step in range(steps):
        plan.append({s: random_tokens(rng.randint(1, N_BATCH // n_seq) if step % 3 else 1, seed=seed * 100 + step * 10 + s)
                     for s in range(n_seq) if rng.random() < 0.8})
    return plan


@pytest.mark.parametrize("policy,granularity", POLICY_GRANULARITIES)
def test_interleaved_sequences_match_each_alone(llama_cpp, tiny_path, policy, granularity):
    n_seq = 3
    ref = TinyRef(tiny_path, kv_cache_dtype="f32")
    llm = _llama(llama_cpp, tiny_path)
    config = EvictConfig(budget=40, window=8, policy=policy, granularity=granularity)
    together = Sequences(llm, config, n_seq)
    plan = _chunks(n_seq, seed=7)

    alone = []
    for s in range(n_seq):
        one = _llama(llama_cpp, tiny_path)
        alone.append((one, Session(one, config)))
    for step in plan:
        got = together.decode(step)
        for s, toks in step.items():
            want = alone[s][1].decode(toks)
            np.testing.assert_allclose(got[s], want, rtol=1e-5, atol=1e-5, err_msg=f"sequence {s}")
    for s in range(n_seq):
        one, sess = alone[s]
        np.testing.assert_array_equal(_lib.positions(together.ctx, s), _lib.positions(one, 0))
        np.testing.assert_array_equal(_held(together.ctx, ref, s), _held(one, ref, 0))
        assert together.stats(s)["n_evictions"] == _lib.stats(one)["n_evictions"] > 0
        assert together.stats(s)["n_seq_cells"] <= config.cells + N_BATCH


def test_eviction_of_one_sequence_leaves_the_others(llama_cpp, tiny_path):
    llm = _llama(llama_cpp, tiny_path)
    seqs = Sequences(llm, EvictConfig(budget=40, window=8, policy="criticalkv"), 2)
    seqs.decode({0: random_tokens(60, seed=1), 1: random_tokens(50, seed=2)})
    before = _lib.positions(seqs.ctx, 1)
    removed = _lib.evict(seqs.ctx, 0)
    assert removed > 0 and seqs.stats(0)["n_seq_cells"] == 40
    np.testing.assert_array_equal(_lib.positions(seqs.ctx, 1), before)
    assert seqs.stats(1)["n_evictions"] == 0
    # a batch that takes only sequence 1 past its cells evicts sequence 1 alone
    seqs.decode({1: random_tokens(N_BATCH, seed=3), 0: random_tokens(1, seed=4)})
    assert seqs.stats(1)["n_evictions"] == 1 and seqs.stats(0)["n_evictions"] == 1


def test_random_call_orders_across_sequences(llama_cpp, tiny_path):
    """Decodes, evictions, removals, copies and renumberings of 4 sequences in random order: every sequence stays
    within its cells and its logits match a replay of its own calls alone."""
    n_seq, config = 4, EvictConfig(budget=40, window=8, policy="snapkv", granularity="head")
    llm = _llama(llama_cpp, tiny_path)
    seqs = Sequences(llm, config, n_seq)
    rng = random.Random(11)
    calls = {s: [] for s in range(n_seq)}
    for i in range(60):
        s = rng.randrange(n_seq)
        op = rng.choice(["decode", "decode", "decode", "evict", "truncate", "renumber"])
        if op == "decode":
            toks = random_tokens(rng.randint(1, N_BATCH // 2), seed=i)
            other = (s + 1) % n_seq
            seqs.decode({s: toks, other: random_tokens(1, seed=1000 + i)})
            calls[s].append(("decode", toks))
            calls[other].append(("decode", random_tokens(1, seed=1000 + i)))
        elif op == "evict" and seqs.n_tokens[s] > config.window:
            _lib.evict(seqs.ctx, s)
            calls[s].append(("evict",))
        elif op == "truncate" and seqs.n_tokens[s] > 2:
            n = rng.randrange(1, seqs.n_tokens[s])
            seqs.n_tokens[s] = seqs.positions[s].truncate(n)
            calls[s].append(("truncate", n))
        elif op == "renumber" and seqs.n_tokens[s] > config.window:
            _lib.evict(seqs.ctx, s)
            seqs.positions[s].shift = seqs.n_tokens[s] - _lib.compact_positions(seqs.ctx, s)
            calls[s].append(("renumber",))
        for t in range(n_seq):
            assert seqs.stats(t)["n_seq_cells"] <= config.cells + N_BATCH

    for s in range(n_seq):
        one = _llama(llama_cpp, tiny_path)
        sess = Session(one, config)
        for call in calls[s]:
            if call[0] == "decode":
                sess.decode(call[1])
            elif call[0] == "evict":
                _lib.evict(one)
            elif call[0] == "truncate":
                sess.truncate(call[1])
            else:
                _lib.evict(one)
                sess.n_past = _lib.compact_positions(one)
        np.testing.assert_array_equal(_lib.positions(seqs.ctx, s), _lib.positions(one, 0))
        probe = random_tokens(3, seed=99 + s)
        np.testing.assert_allclose(seqs.decode({s: probe})[s], sess.decode(probe), rtol=1e-5, atol=1e-5)


def test_copied_sequence_goes_on_as_its_source(llama_cpp, tiny_path):
    """llama.cpp's seq_cp copies a sequence's cells into another's stream: the hook's bookkeeping goes with them, so
    the copy evicts and decodes as the source does."""
    llm = _llama(llama_cpp, tiny_path)
    config = EvictConfig(budget=40, window=8, policy="criticalkv-ada", granularity="head")
    seqs = Sequences(llm, config, 2)
    for i in range(6):
        seqs.decode({0: random_tokens(N_BATCH, seed=i)})
    assert seqs.stats(0)["n_evictions"] > 0
    mem = llama_cpp.llama_get_memory(seqs.ctx)
    llama_cpp.llama_memory_seq_cp(mem, 0, 1, -1, -1)
    seqs.n_tokens[1], seqs.positions[1].shift = seqs.n_tokens[0], seqs.positions[0].shift
    tail = random_tokens(N_BATCH // 2, seed=50)
    out = seqs.decode({0: tail, 1: tail})
    np.testing.assert_allclose(out[1], out[0], rtol=1e-5, atol=1e-5)
    _lib.evict(seqs.ctx, 0)
    _lib.evict(seqs.ctx, 1)
    np.testing.assert_array_equal(_lib.positions(seqs.ctx, 1), _lib.positions(seqs.ctx, 0))


def test_unified_cache_with_several_sequences_is_refused(llama_cpp, tiny_path):
    llm = _llama(llama_cpp, tiny_path, embedding=True)  # llama-cpp-python's way to n_seq_max > 1, unified
    with pytest.raises(KVEvictError, match="kv_unified = false"):
        _lib.enable(llm, EvictConfig(budget=40, window=8))
