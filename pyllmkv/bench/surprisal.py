"""Surprisal retention, an experiment beside the hook's policies (the ruler's `surprisal` in the chat setting): a text
is read in n_batch batches within `cells` cells, at token granularity, keeping the first n_sink tokens, the last
`window` and, among the rest, the words the model predicted worst: a word's tokens (up to the next that begins with a
space) share its summed -log p(token | the cache it was read with), self-information over lexical units as Selective
Context scores them (Li et al. 2023, arXiv 2310.06201), so a number's digits go together. No query scores anything: it
needs the logits of every token read, and removes tokens with llama.cpp's own llama_memory_seq_rm."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .worker import token_nll


class SurprisalReader:
    """Decodes through `session` (a pyllmkv.session.Session without eviction) and, before each batch that would take
    the sequence past `cells` + n_batch cells, removes its tokens down to `cells` as the module says."""

    def __init__(self, session, cells: int, window: int, n_sink: int = 4):
        if cells < n_sink + window:
            raise ValueError(f"cells ({cells}) must hold the {n_sink} first tokens and the window ({window})")
        self.session = session
        self.cells, self.window, self.n_sink = cells, window, n_sink
        self.surprisal = np.empty(0)  # per position read; NaN where no logits predicted it (the first token, a sink)
        self.word = np.empty(0, dtype=np.int64)  # per position read, the index of its word
        self._pieces: dict[int, str] = {}  # token text, as the vocabulary gives it
        self._prev_piece = " "  # the last token read's text: the first token begins a word
        self.kept: list[int] = []  # positions in the cache, ascending
        self._last = None  # logits of the last token read: they predict the next

    def choose(self) -> list[int]:
        """The positions kept by an eviction now: the sinks, the window, the rest by their word's surprisal (later
        first among equals, so a word's tokens stay together)."""
        sinks, middle, window = self.kept[: self.n_sink], self.kept[self.n_sink : -self.window], self.kept[-self.window :]
        room = self.cells - len(sinks) - len(window)
        word = self.word_surprisal()
        best = sorted(middle, key=lambda p: (-word[p], -p))[:room]
        return sorted(sinks + best + window)

    def word_surprisal(self) -> np.ndarray:
        """Per position read, the summed surprisal of its word (the unknown, NaN, counts as 0)."""
        return np.bincount(self.word, weights=np.nan_to_num(self.surprisal, nan=0.0))[self.word]

    def _words(self, batch: Sequence[int]) -> np.ndarray:
        """The word index of each of `batch`'s tokens, after those read: a token that begins with a space, or follows
        one that ends with a space, begins a word."""
        llm = self.session.llm
        for t in set(batch) - self._pieces.keys():
            self._pieces[t] = llm.detokenize([t]).decode("utf-8", "replace")
        word = int(self.word[-1]) if len(self.word) else -1
        prev, out = self._prev_piece, []
        for t in batch:
            piece = self._pieces[t]
            word += piece[:1].isspace() or prev[-1:].isspace() or not prev
            out.append(word)
            prev = piece
        self._prev_piece = prev
        return np.array(out, dtype=np.int64)

    def evict(self) -> None:
        from .._lib import llama_cpp

        keep = set(self.choose())
        mem = llama_cpp.llama_get_memory(self.session.ctx)
        for p in self.kept:
            if p not in keep and not llama_cpp.llama_memory_seq_rm(mem, 0, p, p + 1):
                raise RuntimeError(f"llama_memory_seq_rm could not remove position {p}")
        self.kept = [p for p in self.kept if p in keep]

    def decode(self, tokens: Sequence[int]) -> np.ndarray:
        """Decodes `tokens` after what was read; returns the logits of the last."""
        n_batch = self.session.n_batch
        for start in range(0, len(tokens), n_batch):
            batch = list(tokens[start : start + n_batch])
            if len(self.kept) + len(batch) > self.cells + n_batch:
                self.evict()
            pos0 = self.session.n_past
            logits = self.session.decode(batch, all_logits=True)
            ids = np.asarray(batch, dtype=np.int64)
            first = [np.nan] if self._last is None else token_nll(self._last[None], ids[:1])
            rest = token_nll(logits[:-1], ids[1:])
            self.surprisal = np.concatenate([self.surprisal, first, rest])
            self.word = np.concatenate([self.word, self._words(batch)])
            self._last = logits[-1]
            self.kept += range(pos0, pos0 + len(batch))
        return self._last
