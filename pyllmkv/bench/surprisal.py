"""Surprisal retention, an experiment beside the hook's policies (the ruler's `surprisal` in the chat setting): a text
is read in n_batch batches within `cells` cells, at token granularity, keeping the first n_sink tokens, the last
`window` and, among the rest, the tokens the model predicted worst: -log p(token | the cache it was read with), Selective
Context's self-information (Li et al. 2023, arXiv 2310.06201). No query scores anything: it needs the logits of every
token read, and removes tokens with llama.cpp's own llama_memory_seq_rm."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def token_surprisal(logits: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    """-log softmax(logits[i])[tokens[i]] per row: what the model paid for each token given the row before it."""
    m = logits.max(axis=1)
    lse = np.log(np.exp(logits - m[:, None]).sum(axis=1)) + m
    return lse - logits[np.arange(len(tokens)), np.asarray(tokens)]


class SurprisalReader:
    """Decodes through `session` (a pyllmkv.session.Session without eviction) and, before each batch that would take
    the sequence past `cells` + n_batch cells, removes its tokens down to `cells` as the module says."""

    def __init__(self, session, cells: int, window: int, n_sink: int = 4):
        if cells < n_sink + window:
            raise ValueError(f"cells ({cells}) must hold the {n_sink} first tokens and the window ({window})")
        self.session = session
        self.cells, self.window, self.n_sink = cells, window, n_sink
        self.surprisal = np.empty(0)  # per position read; NaN where no logits predicted it (the first token, a sink)
        self.kept: list[int] = []  # positions in the cache, ascending
        self._last = None  # logits of the last token read: they predict the next

    def choose(self) -> list[int]:
        """The positions kept by an eviction now: the sinks, the window, the rest by surprisal (later first among
        equals)."""
        sinks, middle, window = self.kept[: self.n_sink], self.kept[self.n_sink : -self.window], self.kept[-self.window :]
        room = self.cells - len(sinks) - len(window)
        best = sorted(middle, key=lambda p: (-self.surprisal[p], -p))[:room]
        return sorted(sinks + best + window)

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
            rows = logits[:-1] if self._last is None else np.concatenate([self._last[None], logits[:-1]])
            s = token_surprisal(rows, batch[1:] if self._last is None else batch)
            self.surprisal = np.concatenate([self.surprisal, [np.nan] * (self._last is None), s])
            self._last = logits[-1]
            self.kept += range(pos0, pos0 + len(batch))
        return self._last
