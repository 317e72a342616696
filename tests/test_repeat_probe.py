"""The repeat probe (EvictConfig.repeat_probe, session.RepeatProbe): each eviction is scored by the queries of a
request to repeat the text read since the last one, decoded after it and removed. Oracles: the tiny model's numpy
forward pass (the probe's queries and the scores they give the cells), the same sequence without the probe (what it
leaves behind), and on SmolLM2 the same document scored by the window (other rows kept, the same bounds)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import pyllmkv
from conftest import random_tokens
from pyllmkv import _lib, debug
from pyllmkv._lib import EvictConfig, KVEvictError
from pyllmkv.bench import haystack
from pyllmkv.reference import defensive_select, group_mean, head_scores, pooled_maxima, value_norms, window_attention
from pyllmkv.session import FactsProbe, Probe, QuestionProbe, RepeatProbe, Session, context_size
from test_hook import SCORE_TOL, _llama
from tinymodel import TinyRef

WINDOW = 8


def _probed_session(llama_cpp, path, policy="snapkv", n_batch=32):
    config = EvictConfig.for_cells(40, window=WINDOW, policy=policy, repeat_probe=True)
    llm = _llama(llama_cpp, path, n_ctx=context_size(0, config.cells, n_batch, True), n_batch=n_batch)
    return Session(llm, config)


def test_probe_scores_are_the_maximum_over_its_windows_as_numpy_gives_them(llama_cpp, tiny_path):
    # 60 tokens, then the probe (prompt + those 60) decoded WINDOW at a time: each decode's queries score the 60 cells
    # (the probe's own stand as the window, pooled over by none), and a cell keeps the largest score any gave it
    ref = TinyRef(tiny_path, kv_cache_dtype="f32")
    sess = _probed_session(llama_cpp, tiny_path)
    context = random_tokens(60, seed=50)
    sess.decode(context)
    probe = sess._probe
    assert probe.pending == context
    probe.score(sess.ctx, WINDOW, sess.positions, sess.n_tokens)
    assert probe.pending == [] and list(_lib.positions(sess.ctx)) == list(range(60))

    seq = context + probe.prompt + context
    trace = ref.trace(seq)
    scale = 1.0 / math.sqrt(ref.head_dim)
    n_prefix = 60 - WINDOW  # after the probe, the eviction keeps the context's last WINDOW cells and ranks the rest
    for il in range(ref.n_layer):
        best = np.zeros((ref.n_head_kv, 60), dtype=np.float32)
        for end in range(60 + WINDOW, len(seq) + WINDOW, WINDOW):
            end = min(end, len(seq))
            q_pos = np.arange(end - WINDOW, end)
            q = trace.layers[il].q[q_pos]
            a = window_attention(q, q_pos, trace.layers[il].k[:end], np.arange(end), scale)
            best = np.maximum(best, head_scores(a, end - 60, ref.n_head_kv, "snapkv"))
        pos, score, _ = _lib.scores(sess.ctx, il, ref.n_head_kv)
        np.testing.assert_array_equal(pos, np.arange(n_prefix))
        np.testing.assert_allclose(score, best[:, :n_prefix], **SCORE_TOL["f32"])


def test_a_defensive_probe_ranks_as_one_window_of_all_its_queries(llama_cpp, tiny_path):
    # defensivekv: the eviction after a probe ranks the cells as DefensiveKV would with every probe query in one
    # window (maximum, floor, stage 1 over all of them), though they were decoded and folded WINDOW at a time (numpy)
    ref = TinyRef(tiny_path, kv_cache_dtype="f32")
    sess = _probed_session(llama_cpp, tiny_path, policy="defensivekv")
    config = sess.config
    context = random_tokens(60, seed=57)
    sess.decode(context)
    sess._probe.score(sess.ctx, WINDOW, sess.positions, sess.n_tokens)

    seq = context + sess._probe.prompt + context
    trace = ref.trace(seq)
    scale = 1.0 / math.sqrt(ref.head_dim)
    n_prefix = 60 - WINDOW
    n_protected = 0
    for il in range(ref.n_layer):
        q_pos = np.arange(60, len(seq))  # every probe query, as one window: its rows do not depend on the batches
        a = window_attention(trace.layers[il].q[q_pos], q_pos, trace.layers[il].k, np.arange(len(seq)), scale)
        prefix = a[:, :, :60].astype(np.float64)
        maxima = pooled_maxima(prefix, config.pool_kernel).reshape(ref.n_head_kv, -1, 60).max(axis=1)
        sums = group_mean(prefix.sum(axis=1), ref.n_head_kv)
        norms = value_norms(trace.layers[il].v, ref.w_o(il), ref.n_head)[:, :n_prefix]
        expected = defensive_select(maxima[:, :n_prefix], sums[:, :n_prefix], a[:, :, 60:].sum(-1).mean(), norms,
                                    config.budget - WINDOW)
        n_protected += (expected == expected.max()).sum()
        pos, score, _ = _lib.scores(sess.ctx, il, ref.n_head_kv)
        np.testing.assert_array_equal(pos, np.arange(n_prefix))
        np.testing.assert_allclose(score, expected, rtol=1e-4, atol=1e-7)
    # stage 1 protected some rows, not all
    assert ref.n_layer < n_protected < ref.n_layer * ref.n_head_kv * n_prefix


def test_the_probe_leaves_the_sequence_as_it_was(llama_cpp, tiny_path):
    # without an eviction in between, the next token's logits are those of the same sequence never probed
    context, more = random_tokens(60, seed=51), random_tokens(3, seed=52)
    logits = []
    for probed in (False, True):
        sess = _probed_session(llama_cpp, tiny_path)
        sess.decode(context)
        if probed:
            sess._probe.score(sess.ctx, WINDOW, sess.positions, sess.n_tokens)
        logits.append(sess.decode(more))
    np.testing.assert_array_equal(logits[0], logits[1])


def test_every_eviction_of_a_probed_session_is_scored_by_its_probe(llama_cpp, tiny_path, monkeypatch):
    sess = _probed_session(llama_cpp, tiny_path)
    probed_at = []
    score = RepeatProbe.score

    def recording(self, ctx, window, positions, n_tokens):
        probed_at.append((n_tokens, len(self.pending)))
        return score(self, ctx, window, positions, n_tokens)

    monkeypatch.setattr(RepeatProbe, "score", recording)
    tokens = random_tokens(150, seed=53)
    sess.decode(tokens)
    # before the batches at 64, 96 and 128 (past budget + n_batch = 72): the text read since the probe before
    assert probed_at == [(64, 64), (96, 32), (128, 32)]
    assert _lib.stats(sess.ctx)["n_evictions"] == 3
    pos = _lib.positions(sess.ctx)
    assert pos.max() == 149 and len(pos) <= sess.config.cells + sess.n_batch
    # a truncated turn is not probed again: what the sequence no longer holds leaves the pending text
    assert sess.truncate(140) == 140
    sess.decode(random_tokens(40, seed=54))
    # 12 of the 22 tokens read since the probe at 128 remain; then the batch at 172 after the one at 140
    assert probed_at[3:] == [(140, 12), (172, 32)]


def test_a_question_probe_scores_every_eviction_by_its_question(llama_cpp, tiny_path, monkeypatch):
    """The bench's chat-question oracle: before each eviction the question alone is decoded after the sequence, and
    its queries give the cells numpy's scores, whatever text was read."""
    ref = TinyRef(tiny_path, kv_cache_dtype="f32")
    config = EvictConfig.for_cells(40, window=WINDOW, policy="snapkv", repeat_probe=True)
    question = random_tokens(WINDOW, seed=57)

    def session():
        llm = _llama(llama_cpp, tiny_path, n_ctx=context_size(0, config.cells, 32, True), n_batch=32)
        return Session(llm, config, probe=QuestionProbe(llm, WINDOW, question))

    sess = session()
    context = random_tokens(60, seed=58)
    sess.decode(context)
    sess._probe.score(sess.ctx, WINDOW, sess.positions, sess.n_tokens)
    trace = ref.trace(context + question)
    q_pos = np.arange(60, 60 + WINDOW)
    for il in range(ref.n_layer):
        a = window_attention(trace.layers[il].q[q_pos], q_pos, trace.layers[il].k, np.arange(60 + WINDOW),
                             1.0 / math.sqrt(ref.head_dim))
        pos, score, _ = _lib.scores(sess.ctx, il, ref.n_head_kv)
        np.testing.assert_array_equal(pos, np.arange(60 - WINDOW))
        np.testing.assert_allclose(score, head_scores(a, WINDOW, ref.n_head_kv, "snapkv")[:, : 60 - WINDOW],
                                   **SCORE_TOL["f32"])

    sess, decoded = session(), []
    fill = pyllmkv.session.fill_batch
    monkeypatch.setattr(pyllmkv.session, "fill_batch",
                        lambda b, tokens, *a, **k: (decoded.append(list(tokens)), fill(b, tokens, *a, **k)))
    sess.decode(random_tokens(150, seed=59))
    assert _lib.stats(sess.ctx)["n_evictions"] == 3
    assert [t for t in decoded if len(t) == WINDOW] == [question] * 3  # the document's batches take 32 tokens
    with pytest.raises(ValueError, match="must take 1 to"):
        QuestionProbe(sess.llm, WINDOW, [])
    with pytest.raises(ValueError, match="only with repeat_probe on"):
        Session(sess.llm, EvictConfig.for_cells(40, window=WINDOW), probe=QuestionProbe(sess.llm, WINDOW, question))


def test_a_facts_probe_scores_every_eviction_by_its_fixed_question(llama_cpp, tiny_path, monkeypatch):
    """The bench's chat-facts setting: before each eviction the one fixed question, tokenized without BOS, is decoded
    after the sequence, whatever text was read."""
    config = EvictConfig.for_cells(40, window=WINDOW, policy="defensivekv-layer", repeat_probe=True)
    llm = _llama(llama_cpp, tiny_path, n_ctx=context_size(0, config.cells, 32, True), n_batch=32)
    question = llm.tokenize(FactsProbe.QUESTION.encode(), add_bos=False, special=False)
    assert 0 < len(question) <= Probe.ROOM
    sess, decoded = Session(llm, config, probe=FactsProbe(llm, WINDOW)), []
    fill = pyllmkv.session.fill_batch
    monkeypatch.setattr(pyllmkv.session, "fill_batch",
                        lambda b, tokens, *a, **k: (decoded.append(list(tokens)), fill(b, tokens, *a, **k)))
    sess.decode(random_tokens(150, seed=60))
    assert _lib.stats(sess.ctx)["n_evictions"] == 3
    # the document's batches take 32 tokens (the last 22); the question, WINDOW at a time
    probes = [t for t in decoded if len(t) <= WINDOW]
    assert probes == [question[j : j + WINDOW] for j in range(0, len(question), WINDOW)] * 3
    pos = _lib.positions(sess.ctx)
    assert pos.max() == 149 and len(pos) <= config.cells + sess.n_batch


def test_a_probed_eviction_differs_from_the_windows(llama_cpp, tiny_path):
    held = []
    for repeat_probe in (False, True):
        config = EvictConfig.for_cells(40, window=WINDOW, policy="criticalkv", repeat_probe=repeat_probe)
        llm = _llama(llama_cpp, tiny_path, n_ctx=context_size(0, config.cells, 32, True), n_batch=32)
        sess = Session(llm, config)
        sess.decode(random_tokens(150, seed=55))
        held.append(debug.head_positions(sess.ctx, 0, TinyRef(tiny_path).n_head_kv))
    assert held[0].shape == held[1].shape and not np.array_equal(held[0], held[1])


def test_the_probe_is_refused_clearly(llama_cpp, tiny_path):
    sess = _probed_session(llama_cpp, tiny_path)
    sess.decode(random_tokens(20, seed=56))
    with pytest.raises(KVEvictError, match="must lie in the sequence's positions"):
        _lib.probe(sess.ctx, 20)
    for policy in ("streaming", "knorm", "h2o"):
        _lib.enable(sess.ctx, EvictConfig(budget=40, window=WINDOW, policy=policy))
        with pytest.raises(KVEvictError, match=f"policy {policy} does not rank cells by a window's attention"):
            _lib.probe(sess.ctx, 10)
    # too small a context for the probe's room, and several sequences
    config = EvictConfig.for_cells(40, window=WINDOW, repeat_probe=True)
    with pytest.raises(ValueError, match="repeat probe's room"):
        Session(_llama(llama_cpp, tiny_path, n_ctx=context_size(0, config.cells, 32), n_batch=32), config)
    from pyllmkv.sequences import Sequences

    with pytest.raises(ValueError, match="repeat_probe decodes its probe after one sequence"):
        Sequences(_llama(llama_cpp, tiny_path, n_batch=32), config, n_seq=2)


def test_a_probed_document_on_a_real_model_stays_in_budget_and_leaves_no_probe(smollm2_path):
    # ~1,000 tokens of text through pyllmkv.Llama at 128 cells, then a completion: every eviction was probed, the
    # cache stays within its cells + n_batch, no probe position is left, and the kept rows are others than the
    # window's (its own last queries)
    vocab = pyllmkv.llama_cpp.Llama(model_path=smollm2_path, vocab_only=True, verbose=False)
    text, _ = haystack.text()
    document = vocab.tokenize(text[:6000].encode(), add_bos=True, special=False)[:1000]
    held = {}
    for repeat_probe in (False, True):
        llm = pyllmkv.Llama(smollm2_path, kv_budget=128, n_batch=128, policy="defensivekv-layer", repeat_probe=repeat_probe,
                            n_threads=2, verbose=False)
        assert llm.kv_stats()["kv_size"] >= context_size(0, llm.evict_config.cells, 128, repeat_probe)
        llm.eval(document)
        stats = llm.kv_stats()
        assert stats["n_evictions"] == 6 and stats["n_seq_cells"] <= llm.evict_config.cells + 128
        n_layer = pyllmkv.llama_cpp.llama_model_n_layer(llm._model.model)
        n_head_kv = pyllmkv.llama_cpp.llama_model_n_head_kv(llm._model.model)
        rows = np.stack([debug.head_positions(llm, il, n_head_kv) for il in range(n_layer)])
        assert rows.max() == len(document) - 1 and _lib.positions(llm._ctx.ctx).max() == len(document) - 1
        held[repeat_probe] = rows
        out = llm.create_completion(vocab.detokenize(document).decode("utf-8", "replace") + " In short,", max_tokens=8)
        assert out["choices"][0]["text"]
    assert held[False].shape == held[True].shape and (held[False] != held[True]).mean() > 0.2
