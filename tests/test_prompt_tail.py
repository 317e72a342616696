"""The prompt tail (EvictConfig.prompt_tail): a prompt longer than the cache is evicted with the queries of its last
`window` tokens, decoded alone at their positions first. Oracles: the tiny model's numpy forward pass (the tail's
queries, and the scores they give), the queries a plain decode captures, and on SmolLM2 the same prompt without it."""

from __future__ import annotations

import dataclasses
import gc
import math

import numpy as np
import pytest

import pyllmkv
from conftest import random_tokens
from pyllmkv import _lib, debug
from pyllmkv._lib import EvictConfig, KVEvictError
from pyllmkv.bench import haystack
from pyllmkv.session import PromptTail, Session
from pyllmkv.reference import head_scores, window_attention
from test_hook import SCORE_TOL, _llama
from tinymodel import TinyRef

WINDOW = 8


def _layer_queries(data: bytes, ref: TinyRef) -> np.ndarray:
    """window_queries' bytes as [n_layer, n, n_head, head_dim]."""
    return np.frombuffer(data, dtype=np.float32).reshape(ref.n_layer, -1, ref.n_head, ref.head_dim)


def test_tail_queries_equal_the_numpy_forward_of_the_tail_alone(llama_cpp, tiny_path):
    ref = TinyRef(tiny_path, kv_cache_dtype="f32")
    llm = _llama(llama_cpp, tiny_path, n_batch=32)
    sess = Session(llm, EvictConfig.for_cells(40, window=WINDOW))
    tokens = random_tokens(100, seed=40)
    n_past = 17  # as after an earlier turn: the tail sits at n_past + 92 .. n_past + 99
    data = PromptTail(llm).queries(sess.ctx, sess.config, tokens, n_past, 32)
    pos = np.arange(n_past + len(tokens) - WINDOW, n_past + len(tokens))
    trace = ref.trace(tokens[-WINDOW:], positions=pos)
    got = _layer_queries(data, ref)
    for il in range(ref.n_layer):
        np.testing.assert_allclose(got[il], trace.layers[il].q, rtol=0, atol=2e-5)
    # in the first layer a query is the token's and its position's alone: what the whole prompt gives it
    whole = ref.trace(tokens, positions=np.arange(n_past, n_past + len(tokens)))
    np.testing.assert_allclose(got[0], whole.layers[0].q[-WINDOW:], rtol=0, atol=2e-5)


def test_no_tail_for_a_prompt_that_fits_or_is_shorter_than_the_window(llama_cpp, tiny_path):
    llm = _llama(llama_cpp, tiny_path, n_batch=32)
    sess = Session(llm, EvictConfig.for_cells(40, window=WINDOW))
    tail, config = PromptTail(llm), sess.config
    assert tail.queries(sess.ctx, config, random_tokens(72), 0, 32) is None  # 72 <= budget + n_batch: no eviction
    sess.decode(random_tokens(70))
    assert tail.queries(sess.ctx, config, random_tokens(WINDOW - 1), 70, 32) is None
    assert tail.queries(sess.ctx, config, random_tokens(WINDOW), 70, 32) is not None
    off = EvictConfig.for_cells(40, window=WINDOW, prompt_tail=False)
    assert tail.queries(sess.ctx, off, random_tokens(100), 70, 32) is None
    assert tail.queries(sess.ctx, None, random_tokens(100), 70, 32) is None
    # another window on the same model: the tail's context is made again for it
    assert len(tail.queries(sess.ctx, EvictConfig(budget=40, window=4), random_tokens(100), 70, 32)) == \
        len(tail.queries(sess.ctx, config, random_tokens(100), 70, 32)) // 2
    # policies that rank by recency, key norms or the caller's scores read no query: no tail to decode for them
    for policy in ("streaming", "knorm", "surprisal"):
        assert tail.queries(sess.ctx, dataclasses.replace(config, policy=policy), random_tokens(100), 70, 32) is None
    assert tail.queries(sess.ctx, dataclasses.replace(config, policy="h2o"), random_tokens(100), 70, 32) is not None


def test_a_dropped_session_frees_its_tail_context(llama_cpp, tiny_path):
    llm = _llama(llama_cpp, tiny_path, n_batch=32)
    sess = Session(llm, EvictConfig.for_cells(40, window=WINDOW))
    sess.decode(random_tokens(100))
    tail = sess._tail
    assert tail._ctx is not None
    del sess
    gc.collect()
    assert tail._ctx is None and tail._batch is None
    again = Session(llm, EvictConfig.for_cells(40, window=WINDOW))
    again.reset()
    again.decode(random_tokens(100))  # the llm decodes on, with a tail of its own
    assert again._tail._ctx is not None


@pytest.mark.parametrize("policy", ["criticalkv", "snapkv", "h2o"])
def test_set_tail_queries_score_the_cache_as_numpy_does(llama_cpp, tiny_path, policy):
    llm = _llama(llama_cpp, tiny_path, n_batch=32)
    tail_scores_against_numpy(llm, tiny_path, policy, q_atol=2e-5, score_tol=SCORE_TOL["f32"])


def tail_scores_against_numpy(llm, path, policy, q_atol, score_tol):
    """Take a prompt's tail after a 60-token prefix, set it, and check the ring and the scores against numpy's forward
    pass: the tail's queries stand as the last `window` positions of the sequence until a decode captures new ones."""
    ref = TinyRef(path, kv_cache_dtype="f32")
    sess = Session(llm, EvictConfig.for_cells(40, window=WINDOW, policy=policy))
    prefix, prompt = random_tokens(60, seed=41), random_tokens(50, seed=42)
    sess.decode(prefix)
    data = PromptTail(llm).queries(sess.ctx, sess.config, prompt, len(prefix), 32)
    _lib.set_window_queries(llm, data)
    assert _lib.window_queries(llm) == data

    end = len(prefix) + len(prompt)
    q_tail = ref.trace(prompt[-WINDOW:], positions=np.arange(end - WINDOW, end))
    pos = np.arange(len(prefix))
    trace = ref.trace(prefix)
    for il in range(ref.n_layer):
        q_pos, q, _ = debug.queries(llm, il)
        np.testing.assert_array_equal(q_pos, pos[-WINDOW:])
        q = q.reshape(WINDOW, ref.n_head, ref.head_dim)
        np.testing.assert_allclose(q, q_tail.layers[il].q, rtol=0, atol=q_atol)
        a = window_attention(q, pos[-WINDOW:], trace.layers[il].k, pos, 1.0 / math.sqrt(ref.head_dim))
        got_pos, score, _ = _lib.scores(llm, il, ref.n_head_kv)
        np.testing.assert_array_equal(got_pos, pos[:-WINDOW])
        np.testing.assert_allclose(score, head_scores(a, WINDOW, ref.n_head_kv, policy), **score_tol)

    sess.decode(prompt[:3])
    q_pos, _, _ = debug.queries(llm, 0)
    assert q_pos[-1] == len(prefix) + 2


def test_wrong_queries_are_refused_clearly(llama_cpp, tiny_path):
    llm = _llama(llama_cpp, tiny_path, n_batch=32)
    sess = Session(llm, EvictConfig.for_cells(40, window=WINDOW))
    with pytest.raises(KVEvictError, match="fewer positions than the queries"):
        _lib.set_window_queries(llm, PromptTail(llm).queries(sess.ctx, sess.config, random_tokens(100), 0, 32))
    sess.decode(random_tokens(50))
    data = _lib.window_queries(llm)
    for bad in (data[:-4], data + data, b""):
        with pytest.raises(KVEvictError, match="not 1 to window queries of this model"):
            _lib.set_window_queries(llm, bad)


def _record_evictions(monkeypatch) -> list:
    """The layer-0 queries each eviction scores with, as the hook reports them just before it evicts."""
    seen = []
    evict = _lib.evict

    def recording(ctx, seq_id=0):
        seen.append(debug.queries(ctx, 0)[1].copy())
        return evict(ctx, seq_id)

    monkeypatch.setattr(_lib, "evict", recording)
    return seen


@pytest.mark.parametrize("api", ["session", "llama"])
def test_every_eviction_of_a_prompt_scores_with_its_tail(llama_cpp, tiny_path, monkeypatch, api):
    ref = TinyRef(tiny_path, kv_cache_dtype="f32")
    prompt = random_tokens(150, seed=43)
    seen = _record_evictions(monkeypatch)
    if api == "session":
        llm = _llama(llama_cpp, tiny_path, n_batch=32)
        sess = Session(llm, EvictConfig.for_cells(40, window=WINDOW))
        decode = sess.decode
    else:
        llm = pyllmkv.Llama(tiny_path, kv_budget=40, window=WINDOW, n_batch=32, n_threads=2, verbose=False)
        decode = llm.eval
    decode(prompt)
    tail_q = ref.trace(prompt[-WINDOW:], positions=np.arange(len(prompt) - WINDOW, len(prompt))).layers[0].q
    assert len(seen) == 3  # before the batches at 64, 96 and 128 (cells past budget + n_batch = 72)
    for q in seen:
        np.testing.assert_allclose(q.reshape(tail_q.shape), tail_q, rtol=0, atol=2e-5)
    # generated tokens, one per decode: evicted with the queries they captured
    n = len(seen)
    for t in random_tokens(40, seed=44):
        decode([t])
    assert len(seen) > n
    assert all(np.abs(q.reshape(tail_q.shape) - tail_q).max() > 1e-2 for q in seen[n:])


def test_a_renumbered_prompt_is_evicted_with_its_tail_at_the_positions_it_gets(llama_cpp, tiny_path, monkeypatch):
    # max_position 100: the batch at 96 renumbers the kept cells from 0, and the rest of the prompt follows them
    ref = TinyRef(tiny_path, kv_cache_dtype="f32")
    prompt = random_tokens(150, seed=45)
    seen = _record_evictions(monkeypatch)
    sess = Session(_llama(llama_cpp, tiny_path, n_batch=32), EvictConfig.for_cells(40, window=WINDOW), max_position=100)
    sess.decode(prompt)
    assert sess.n_tokens == 150 and sess.n_past < 100
    tail_q = lambda end: ref.trace(prompt[-WINDOW:], positions=np.arange(end - WINDOW, end)).layers[0].q  # noqa: E731
    # before the batches at 64 and 96 and in the renumbering: the tail at the prompt's own positions; before the
    # batch at 128: at those it ends at after the renumbering
    assert len(seen) == 4
    for q, end in zip(seen, [150, 150, 150, sess.n_past]):
        np.testing.assert_allclose(q.reshape(WINDOW, ref.n_head, ref.head_dim), tail_q(end), rtol=0, atol=2e-5)


def test_the_prompt_tail_keeps_a_needle_the_batches_would_evict(smollm2_path):
    # a pass key at the start of a 1,024-token prompt, budget 128: without the tail every eviction is scored by the
    # end of the batch before it, which has no reason to look at the key; with it, by the question
    vocab = pyllmkv.llama_cpp.Llama(model_path=smollm2_path, vocab_only=True, verbose=False)
    tok = lambda t, bos: vocab.tokenize(t.encode(), add_bos=bos, special=False)  # noqa: E731
    text, _ = haystack.text()
    key = "86556"
    prompt = haystack.needle_prompt(tok, tok(text[:8000], False), 1024, 0.0, key)  # ~1,800 tokens of it
    needle = tok(haystack.NEEDLE.format(key=key), False)
    start = next(i for i in range(len(prompt)) if prompt[i : i + len(needle)] == needle)
    held = {}
    for prompt_tail in (False, True):
        llm = pyllmkv.Llama(smollm2_path, kv_budget=128, n_batch=256, policy="criticalkv", prompt_tail=prompt_tail,
                                n_threads=2, verbose=False)
        llm.eval(prompt)
        n_layer = pyllmkv.llama_cpp.llama_model_n_layer(llm._model.model)
        n_head_kv = pyllmkv.llama_cpp.llama_model_n_head_kv(llm._model.model)
        rows = np.stack([debug.head_positions(llm, il, n_head_kv) for il in range(n_layer)])
        # rows of the needle's key digits, over every layer and KV head
        held[prompt_tail] = int(((rows >= start) & (rows < start + len(needle))).sum())
        llm.close()
    assert held[True] > 5 * held[False] and held[True] > 200, held  # measured: 392 against 28 of 1,800
