"""The ruler's surprisal experiment (pyllmkv/bench/surprisal.py) against numpy and llama.cpp's own cache."""

from __future__ import annotations

import numpy as np
import pytest

from pyllmkv import _lib
from pyllmkv.bench.surprisal import SurprisalReader
from pyllmkv.bench.worker import token_nll
from pyllmkv.session import Session


def test_token_nll_is_minus_log_softmax():
    logits = np.array([[0.0, np.log(3.0), 0.0], [5.0, 5.0, 5.0 + np.log(2.0)]], dtype=np.float32)
    # p = (1/5, 3/5, 1/5) and (1/4, 1/4, 1/2)
    np.testing.assert_allclose(token_nll(logits, np.array([1, 2])), [np.log(5 / 3), np.log(2)], rtol=1e-6)


class _Vocab:
    """The one thing the reader asks of the model to split words: a token's text."""

    PIECES = {1: " The", 2: " magic", 3: " 9", 4: "2", 5: "6", 6: ".", 7: "\n", 8: "Next"}

    def detokenize(self, tokens):
        return "".join(self.PIECES[t] for t in tokens).encode()


def test_a_words_tokens_share_its_summed_surprisal():
    session = type("S", (), {"llm": _Vocab()})()
    reader = SurprisalReader(session, 16, 4)
    for batch in ([1, 2, 3, 4], [5, 6, 7, 8]):  # a word goes on across batches
        reader.word = np.concatenate([reader.word, reader._words(batch)])
    assert reader.word.tolist() == [0, 1, 2, 2, 2, 2, 3, 4]  # a number and its full stop are one word
    reader.surprisal = np.array([np.nan, 1.0, 2.0, 2.5, 3.0, 0.5, 0.25, 4.0])
    np.testing.assert_allclose(reader.word_surprisal(), [0.0, 1.0, 8.0, 8.0, 8.0, 8.0, 0.25, 4.0])


def test_reader_keeps_the_sinks_the_window_and_the_most_surprising_tokens(llama_cpp, tiny_path):
    rng = np.random.default_rng(2)
    context = [int(t) for t in rng.integers(3, 250, 200)]
    cells, window, n_batch = 48, 8, 32

    def llm():
        return llama_cpp.Llama(model_path=tiny_path, n_ctx=len(context) + 64, n_batch=n_batch, n_ubatch=n_batch,
                               verbose=False)

    reader_llm = llm()
    ctx = reader_llm._ctx.ctx
    reader = SurprisalReader(Session(reader_llm, None), cells, window)
    chosen = []  # (kept, surprisal, chosen) at each eviction
    choose = reader.choose

    def recording():
        chosen.append((list(reader.kept), reader.word_surprisal(), choose()))
        return chosen[-1][2]

    reader.choose = recording
    reader.decode(context)

    # the first batch was read with the whole cache: its surprisal is the full prefill's, in float64
    full = Session(llm(), None).decode(context, all_logits=True).astype(np.float64)
    lse = np.log(np.exp(full - full.max(axis=1, keepdims=True)).sum(axis=1)) + full.max(axis=1)
    want = lse[:-1] - full[np.arange(len(context) - 1), context[1:]]
    assert np.isnan(reader.surprisal[0])
    np.testing.assert_allclose(reader.surprisal[1:n_batch], want[: n_batch - 1], rtol=1e-4, atol=1e-4)
    # later batches were read with fewer cells: what they paid differs
    assert not np.allclose(reader.surprisal[-n_batch:], want[-n_batch:], atol=1e-3)

    assert len(chosen) >= 4
    for kept, word, keep in chosen:
        assert len(keep) == cells and keep[:4] == kept[:4] and keep[-window:] == kept[-window:]
        middle = set(kept[4:-window])
        kept_middle, gone = middle & set(keep), middle - set(keep)
        assert min(word[p] for p in kept_middle) >= max(word[p] for p in gone)
    # llama.cpp's cache holds exactly the tokens the reader kept
    assert list(_lib.positions(ctx)) == reader.kept
    assert cells < len(reader.kept) <= cells + n_batch and reader.kept[-1] == len(context) - 1


def test_reader_needs_room_for_the_sinks_and_the_window(llama_cpp, tiny_path):
    llm = llama_cpp.Llama(model_path=tiny_path, n_ctx=64, n_batch=32, verbose=False)
    with pytest.raises(ValueError, match="must hold the 4 first tokens and the window"):
        SurprisalReader(Session(llm, None), 10, 8)
