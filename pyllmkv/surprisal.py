"""Policy `surprisal`: the cache keeps the words the model predicted worst as it read them.

A word's tokens (up to the next that begins with a space, so a number's digits and a hyphenated key go together) share
its summed surprisal, -log p(token | the cache it was read with): self-information over lexical units as Selective
Context scores them (Li et al. 2023, arXiv 2310.06201). No query takes part, so what a chat keeps of a document does not
hang on what the text's own end was asking when the eviction came. It needs the logits of every token read, which live
with whoever decodes: WordSurprisal turns them into the scores the hook ranks cells by (scorer "given").

It imports nothing of pyllmkv at load, so the bench's stock worker can take token_nll without the patched library.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

# rows of logits exponentiated at once: [rows, n_vocab] floats (64 x 151,936 x 4 B = 39 MB for Qwen2.5)
_NLL_ROWS = 64


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) under each row of logits: log-sum-exp shifted by the row maximum, the exponentials in float32
    (within 1e-7 of float64's once shifted, and 3-4x faster over a vocabulary) summed in float64."""
    out = np.empty(len(targets))
    for i in range(0, len(targets), _NLL_ROWS):
        x = np.asarray(logits[i : i + _NLL_ROWS], dtype=np.float32)
        top = x.max(axis=1)
        lse = top + np.log(np.exp(x - top[:, None]).sum(axis=1, dtype=np.float64))
        out[i : i + _NLL_ROWS] = lse - x[np.arange(len(x)), targets[i : i + _NLL_ROWS]]
    return out


def begins_word(piece: str, prev: str) -> bool:
    """Whether a token of text `piece`, after one of text `prev`, begins a word: it begins with a space, or follows one
    that ends with a space or has no text (a special token)."""
    return piece[:1].isspace() or prev[-1:].isspace() or not prev


class WordSurprisal:
    """The word surprisal of the tokens of one sequence, given to the hook as each batch is decoded (read()).

    A word still open at a batch's end gets its partial sum, and its tokens are scored again when the next batch
    adds to it, those among the last `window` read (the window's cells, always kept and never renumbered apart)."""

    def __init__(self, llm, window: int, seq_id: int = 0):
        self.llm, self.window, self.seq_id = llm, window, seq_id
        self.n_vocab = llm.n_vocab()
        self.n_read = 0  # tokens of the sequence read so far, as read() was told
        self._pieces: dict[int, str] = {}
        self._last: Optional[np.ndarray] = None  # logits of the last token read: they predict the next
        self._prev = " "  # text of the last token read: the first token begins a word
        self._word = (0, 0.0)  # (first token, summed surprisal) of the word read last

    def _piece(self, token: int) -> str:
        if token not in self._pieces:
            self._pieces[token] = self.llm.detokenize([token]).decode("utf-8", "replace")
        return self._pieces[token]

    def read(self, ctx, n_tokens: int, position: int, batch: Sequence[int]) -> np.ndarray:
        """Right after llama_decode of `batch` with every token's logits, as tokens n_tokens.. of the sequence, the
        first at `position`: gives the hook its tokens' scores and returns their surprisal. A token read after a
        truncation, or first, has no logits predicting it: it counts 0."""
        from . import _lib
        from ._lib import llama_cpp

        # row i predicts the token after batch[i]
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(batch), self.n_vocab))
        ids = np.asarray(batch, dtype=np.int64)
        if n_tokens != self.n_read:  # truncated: the logits and the open word belong to tokens dropped
            self._last, self._prev, self._word = None, " ", (n_tokens, 0.0)
        first = token_nll(self._last[None], ids[:1]) if self._last is not None else np.zeros(1)
        surprisal = np.concatenate([first, token_nll(logits[:-1], ids[1:])])

        start, total = self._word
        sums = {}
        word_of = np.empty(len(ids), dtype=np.int64)
        for i, t in enumerate(batch):
            piece = self._piece(int(t))
            if begins_word(piece, self._prev):
                sums[start] = total
                start, total = n_tokens + i, 0.0
            total += surprisal[i]
            word_of[i] = start
            self._prev = piece
        sums[start] = total
        self._word = (start, total)

        # the batch's tokens, and those read before of the word it continues that the window still holds
        earlier = max(int(word_of[0]), n_tokens - self.window, 0)
        index = np.concatenate([np.full(n_tokens - earlier, word_of[0]), word_of])
        score = np.array([sums[w] for w in index], dtype=np.float32)
        _lib.set_token_scores(ctx, np.arange(position - (n_tokens - earlier), position + len(ids)), score, self.seq_id)
        self._last = np.array(logits[-1], dtype=np.float32)
        self.n_read = n_tokens + len(ids)
        return surprisal
