"""Policy surprisal: the hook ranks cells by the scores the caller gives their tokens (llama_kv_evict_set_token_scores),
and pyllmkv.surprisal gives each token its word's summed -log p, checked against numpy and a full prefill."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import pyllmkv
from conftest import SUBPROCESS_CWD, free_port
from pyllmkv import _lib
from pyllmkv._lib import EvictConfig, KVEvictError
from pyllmkv.sequences import Sequences
from pyllmkv.session import Session, fill_batch, truncate
from pyllmkv.surprisal import begins_word, token_nll


def _llm(llama_cpp, path, n_ctx, n_batch=32):
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, verbose=False)


def _n_head_kv(llm) -> int:
    return int(pyllmkv.llama_cpp.llama_model_n_head_kv(llm._model.model))


def _words_text(seed: int, n_words: int) -> bytes:
    """Words of 1 to 6 letters between spaces (the tiny model's vocabulary spells them a byte per token)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))
    return " ".join("".join(rng.choice(letters, rng.integers(1, 7))) for _ in range(n_words)).encode()


def test_token_nll_is_minus_log_softmax():
    logits = np.array([[0.0, np.log(3.0), 0.0], [5.0, 5.0, 5.0 + np.log(2.0)]], dtype=np.float32)
    # p = (1/5, 3/5, 1/5) and (1/4, 1/4, 1/2)
    np.testing.assert_allclose(token_nll(logits, np.array([1, 2])), [np.log(5 / 3), np.log(2)], rtol=1e-6)
    # more rows than one chunk: the same as the whole at once
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 40)).astype(np.float32) * 4
    t = rng.integers(0, 40, 150)
    want = np.log(np.exp(x.astype(np.float64)).sum(axis=1)) - x[np.arange(150), t]
    np.testing.assert_allclose(token_nll(x, t), want, rtol=1e-6)
    # a vocabulary's worth of large logits: no overflow, and float64's answer within float32's rounding
    x = rng.normal(size=(3, 151936)).astype(np.float32) * 30
    t = rng.integers(0, 151936, 3)
    x64 = x.astype(np.float64)
    top = x64.max(axis=1)
    want = top + np.log(np.exp(x64 - top[:, None]).sum(axis=1)) - x64[np.arange(3), t]
    np.testing.assert_allclose(token_nll(x, t), want, rtol=1e-6)


def test_a_word_begins_at_a_space_or_after_one():
    pieces = [" The", " magic", " 9", "2", "6", ".", "\n", "Next", "", "x"]
    starts, prev = [], " "
    for p in pieces:
        starts.append(begins_word(p, prev))
        prev = p
    # a number and its full stop are one word; a line break is one, and the word after it; a special token (no text)
    # goes with the word before it and ends it
    assert starts == [True, True, True, False, False, False, True, True, False, True]


def _decode(ctx, batch, tokens, pos0):
    fill_batch(batch, tokens, pos0, lambda i: False)
    assert pyllmkv.llama_cpp.llama_decode(ctx, batch) == 0


def test_the_hook_keeps_the_sinks_the_window_and_the_best_given_scores(llama_cpp, tiny_path):
    llm = _llm(llama_cpp, tiny_path, 128)
    ctx, n_kv = llm._ctx.ctx, _n_head_kv(llm)
    # head granularity asked for: every head ranks alike, so whole tokens go; unpooled (pooling: the test below)
    config = EvictConfig(budget=40, window=8, pool_kernel=1, policy="surprisal", granularity="head")
    _lib.enable(ctx, config)
    batch = llama_cpp.llama_batch_init(32, 0, 1)
    rng = np.random.default_rng(1)
    for start in range(0, 80, 32):
        _decode(ctx, batch, [int(t) for t in rng.integers(3, 250, min(32, 80 - start))], start)
    with pytest.raises(KVEvictError, match="position 4 has none: call llama_kv_evict_set_token_scores"):
        _lib.evict(ctx)

    given = rng.normal(size=80).astype(np.float32)
    _lib.set_token_scores(ctx, np.arange(80), given)
    pos, score, _ = _lib.scores(ctx, 0, n_kv, value_norms=False)
    assert pos.tolist() == list(range(72)) and np.all(np.isinf(score[:, :4]))
    np.testing.assert_array_equal(score[:, 4:], np.broadcast_to(given[4:72], (n_kv, 68)))

    assert _lib.evict(ctx) == 40
    top = 4 + np.argsort(-given[4:72], kind="stable")[: 40 - 8 - 4]
    want = sorted([0, 1, 2, 3, *top.tolist(), *range(72, 80)])
    assert _lib.positions(ctx).tolist() == want
    from pyllmkv import debug

    for il in range(2):  # each head holds its cell's own token: nothing moved between cells
        np.testing.assert_array_equal(debug.head_positions(llm, il, n_kv), np.broadcast_to(want, (n_kv, 40)))

    # renumbering moves the scores with their cells
    assert _lib.compact_positions(ctx) == 40
    _decode(ctx, batch, [5], 40)  # applies the K-shift
    pos, score, _ = _lib.scores(ctx, 0, n_kv, value_norms=False)
    np.testing.assert_array_equal(score[0, 4:], given[want[4:33]])

    # a removed position's score goes with it: a token decoded there later has none
    truncate(ctx, 20)
    for start in range(20, 60, 20):
        _decode(ctx, batch, [7] * 20, start)
    _lib.set_token_scores(ctx, np.arange(21, 60), np.ones(39, dtype=np.float32))
    with pytest.raises(KVEvictError, match="position 20 has none"):
        _lib.evict(ctx)
    llama_cpp.llama_batch_free(batch)


def max_pool_by_position(given: np.ndarray, pos: np.ndarray, n_sink: int, kernel: int) -> np.ndarray:
    """Each held token's score: the largest given to a held token within kernel // 2 positions, the sinks at +inf."""
    pos = np.asarray(pos)
    out = np.array([given[pos[(np.abs(pos - p) <= kernel // 2) & (np.arange(len(pos)) >= n_sink)]].max(initial=-np.inf)
                    for p in pos])
    out[:n_sink] = np.inf
    return out.astype(np.float32)


@pytest.mark.parametrize("kernel", [5, 13])
def test_given_scores_are_max_pooled_over_the_positions_near_each_cell(llama_cpp, tiny_path, kernel):
    """A key and its number score high and the words joining them low: pooling keeps the sentence whole. Neighbours are
    by position, so a cell beside an evicted gap does not take the score of a token far away."""
    llm = _llm(llama_cpp, tiny_path, 160)
    ctx, n_kv = llm._ctx.ctx, _n_head_kv(llm)
    _lib.enable(ctx, EvictConfig(budget=48, window=8, pool_kernel=kernel, policy="surprisal"))
    batch = llama_cpp.llama_batch_init(32, 0, 1)
    rng = np.random.default_rng(7)
    given = rng.normal(size=128).astype(np.float32)
    for start in range(0, 80, 32):
        _decode(ctx, batch, [int(t) for t in rng.integers(3, 250, min(32, 80 - start))], start)
    _lib.set_token_scores(ctx, np.arange(80), given[:80])
    pos, score, _ = _lib.scores(ctx, 0, n_kv, value_norms=False)
    np.testing.assert_array_equal(score, np.broadcast_to(max_pool_by_position(given, pos, 4, kernel), score.shape))

    assert _lib.evict(ctx) == 80 - 48
    kept = _lib.positions(ctx)
    assert not np.array_equal(kept, np.arange(48))  # gaps to pool across
    for start in range(80, 128, 32):
        _decode(ctx, batch, [int(t) for t in rng.integers(3, 250, min(32, 128 - start))], start)
    _lib.set_token_scores(ctx, np.arange(80, 128), given[80:])
    pos, score, _ = _lib.scores(ctx, 0, n_kv, value_norms=False)
    assert pos.tolist() == [*kept.tolist(), *range(80, 120)]
    np.testing.assert_array_equal(score, np.broadcast_to(max_pool_by_position(given, pos, 4, kernel), score.shape))
    llama_cpp.llama_batch_free(batch)


def test_defensivekv_surprisal_keeps_the_best_given_half_then_defensivekvs_choice(llama_cpp, tiny_path):
    """Against defensivekv on the same tokens: the same scores but for the top half of the budget by the given scores
    (the sinks among them) at +inf in every layer and head; whole tokens evicted, by the mean over heads."""
    budget, window, n = 40, 8, 80
    rng = np.random.default_rng(4)
    tokens = [int(t) for t in rng.integers(3, 250, n)]
    given = rng.normal(size=n).astype(np.float32)
    ctxs = {}
    for policy in ("defensivekv-surprisal", "defensivekv"):
        llm = _llm(llama_cpp, tiny_path, 128)
        ctx = llm._ctx.ctx
        _lib.enable(ctx, EvictConfig(budget=budget, window=window, pool_kernel=1, policy=policy, granularity="head"))
        batch = llama_cpp.llama_batch_init(32, 0, 1)
        for start in range(0, n, 32):
            _decode(ctx, batch, tokens[start:start + 32], start)
        llama_cpp.llama_batch_free(batch)
        ctxs[policy] = (llm, ctx)
    llm, ctx = ctxs["defensivekv-surprisal"]
    n_kv, n_layer = _n_head_kv(llm), int(pyllmkv.llama_cpp.llama_model_n_layer(llm._model.model))
    with pytest.raises(KVEvictError, match="position 4 has none"):
        _lib.evict(ctx)
    _lib.set_token_scores(ctx, np.arange(n), given)

    n_guard = (budget - window) // 2
    guarded = [0, 1, 2, 3, *(4 + np.argsort(-given[4:n - window], kind="stable")[: n_guard - 4]).tolist()]
    mean = np.zeros(n - window, dtype=np.float32)
    for il in range(n_layer):
        pos, score, _ = _lib.scores(ctx, il, n_kv, value_norms=False)
        _, plain, _ = _lib.scores(ctxs["defensivekv"][1], il, n_kv, value_norms=False)
        assert pos.tolist() == list(range(n - window))
        assert np.all(np.isinf(score[:, guarded]))
        rest = np.setdiff1d(np.arange(n - window), guarded)
        np.testing.assert_array_equal(score[:, rest], plain[:, rest])
        for g in range(n_kv):
            mean += plain[g] / (n_layer * n_kv)

    assert _lib.evict(ctx) == n - budget
    kept = _lib.positions(ctx).tolist()
    assert len(kept) == budget and set(guarded) | set(range(n - window, n)) <= set(kept)
    # the rest of the budget: defensivekv's best by the mean over layers and heads
    chosen = [p for p in kept if p < n - window and p not in guarded]
    dropped = [p for p in range(n - window) if p not in kept]
    assert len(chosen) == budget - window - n_guard
    assert mean[chosen].min() >= mean[dropped].max() - 1e-6


def test_token_scores_are_for_a_policy_that_takes_them(llama_cpp, tiny_path):
    llm = _llm(llama_cpp, tiny_path, 64)
    ctx = llm._ctx.ctx
    _lib.enable(ctx, EvictConfig(budget=24, window=8, policy="snapkv"))
    with pytest.raises(KVEvictError, match="policy snapkv scores the cells itself"):
        _lib.set_token_scores(ctx, np.arange(2), np.ones(2))
    _lib.enable(ctx, EvictConfig(budget=24, window=8, policy="surprisal"))
    with pytest.raises(KVEvictError, match="scores not NaN"):
        _lib.set_token_scores(ctx, np.arange(2), np.array([1.0, np.nan]))
    with pytest.raises(KVEvictError, match="does not rank cells by a window's attention"):
        _lib.probe(ctx, 0)


def test_a_session_scores_each_word_by_its_summed_surprisal(llama_cpp, tiny_path, monkeypatch):
    cells, window, n_batch = 48, 8, 32
    llm = _llm(llama_cpp, tiny_path, cells + n_batch, n_batch)
    tokens = llm.tokenize(_words_text(2, 60), add_bos=False)
    assert len(tokens) > 5 * n_batch
    # unpooled: the hook's scores are then the words' sums (pooling: test_given_scores_are_max_pooled_...)
    session = Session(llm, EvictConfig(budget=cells, window=window, pool_kernel=1, policy="surprisal"))
    assert not session.config.prompt_tail or session._tail.queries(session.ctx, session.config, tokens, 0, n_batch) is None

    surprisal = []
    read = session._surprisal.read
    monkeypatch.setattr(session._surprisal, "read", lambda *a: surprisal.extend(read(*a)) or surprisal)
    evictions = []  # (positions, their scores, positions kept, tokens read)
    evict = _lib.evict

    def recording(ctx, seq_id=0):
        pos, score, _ = _lib.scores(ctx, 0, _n_head_kv(llm), seq_id, value_norms=False)
        before = _lib.positions(ctx, seq_id)
        n = evict(ctx, seq_id)
        evictions.append((before, dict(zip(pos.tolist(), score[0].tolist())), _lib.positions(ctx, seq_id), len(surprisal)))
        return n

    monkeypatch.setattr(_lib, "evict", recording)
    session.decode(tokens)

    # the first batch was read with the whole cache: its surprisal is a full prefill's; the first token's counts 0
    full = Session(_llm(llama_cpp, tiny_path, len(tokens) + n_batch, n_batch), None).decode(tokens, all_logits=True)
    x = full.astype(np.float64)
    lse = np.log(np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1)) + x.max(axis=1)
    want = np.concatenate([[0.0], lse[:-1] - x[np.arange(len(x) - 1), tokens[1:]]])
    assert surprisal[0] == 0.0
    np.testing.assert_allclose(surprisal[:n_batch], want[:n_batch], rtol=1e-4, atol=1e-4)
    assert not np.allclose(surprisal[-n_batch:], want[-n_batch:], atol=1e-3)  # later ones were read with fewer cells

    pieces = [llm.detokenize([t]).decode("utf-8", "replace") for t in tokens]
    assert len(evictions) >= 4
    for before, score, kept, n_read in evictions:
        # the oracle's words over the tokens read so far (nothing was renumbered: a position is its token's index)
        word, starts, prev = np.zeros(n_read, dtype=np.int64), 0, " "
        for i in range(n_read):
            starts += begins_word(pieces[i], prev)
            word[i], prev = starts, pieces[i]
        summed = np.bincount(word, weights=np.array(surprisal[:n_read]))[word]
        prefix = before[:-window].tolist()
        for p in prefix[4:]:
            assert score[p] == pytest.approx(summed[p], rel=1e-5, abs=1e-5)
        assert all(np.isinf(score[p]) for p in prefix[:4])
        # the sinks, the window, and among the rest the best scored
        rest = sorted(prefix[4:], key=lambda p: -score[p])
        room = cells - window - 4
        assert kept.tolist() == sorted(prefix[:4] + rest[:room] + before[-window:].tolist())
        assert score[rest[room - 1]] >= score[rest[room]]
    assert cells < _lib.stats(session.ctx)["n_seq_cells"] <= cells + n_batch


def test_defensivekv_surprisal_reads_with_the_prompt_tail_and_the_surprisal(llama_cpp, tiny_path):
    cells, window, n_batch = 48, 8, 32
    llm = _llm(llama_cpp, tiny_path, cells + n_batch, n_batch)
    tokens = llm.tokenize(_words_text(5, 60), add_bos=False)
    session = Session(llm, EvictConfig(budget=cells, window=window, policy="defensivekv-surprisal"))
    # DefensiveKV's half is scored by the prompt's last queries, as the default policy's whole budget is
    assert session._tail.queries(session.ctx, session.config, tokens, 0, n_batch) is not None
    session.decode(tokens)
    assert _lib.stats(session.ctx)["n_evictions"] >= 3
    pos, score, _ = _lib.scores(session.ctx, 0, _n_head_kv(llm), value_norms=False)
    assert len(pos) > (cells - window) // 2
    assert (np.isinf(score).sum(axis=1) == (cells - window) // 2).all()  # every head guards the same best half


def test_the_api_bounds_a_prompt_by_surprisal_and_saves_the_scores(llama_cpp, tiny_path):
    llm = pyllmkv.Llama(tiny_path, kv_budget=48, window=8, policy="surprisal", n_batch=32, verbose=False)
    prompt = _words_text(3, 80).decode()
    out = llm.create_completion(prompt, max_tokens=4, temperature=0.0)
    st = llm.kv_stats()
    assert out["usage"]["prompt_tokens"] > 150 and st["n_evictions"] >= 3 and st["n_seq_cells"] <= 48 + 32
    n_kv = _n_head_kv(llm)
    scored = _lib.scores(llm.ctx, 0, n_kv, value_norms=False)
    state = llm.save_state()

    other = pyllmkv.Llama(tiny_path, kv_budget=48, window=8, policy="surprisal", n_batch=32, verbose=False)
    other.load_state(state)
    loaded = _lib.scores(other.ctx, 0, n_kv, value_norms=False)
    np.testing.assert_array_equal(loaded[0], scored[0])
    np.testing.assert_array_equal(loaded[1], scored[1])
    # and it goes on: the next prompt is read and evicted with the loaded scores
    other.create_completion(prompt + " more words to read", max_tokens=2, temperature=0.0)


def test_what_cannot_score_surprisal_refuses_it(llama_cpp, tiny_path):
    for policy in ("surprisal", "defensivekv-surprisal"):
        with pytest.raises(ValueError, match="which a probe's queries do not give: leave repeat_probe off"):
            EvictConfig(policy=policy, repeat_probe=True)
    llm = _llm(llama_cpp, tiny_path, 64)
    for policy in ("surprisal", "defensivekv-surprisal"):
        with pytest.raises(ValueError, match="ranks cells by each token's surprisal.*Sequences does not compute"):
            Sequences(llm, EvictConfig(budget=40, window=8, policy=policy), 2)
    r = subprocess.run([sys.executable, "-m", "pyllmkv", "serve", tiny_path, "--parallel", "2", "--policy", "surprisal",
                        "--port", str(free_port())], capture_output=True, text=True, timeout=120, cwd=SUBPROCESS_CWD)
    assert r.returncode != 0 and "serve it without --parallel" in r.stderr
