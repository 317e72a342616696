"""Several conversations in one llama.cpp context, each within its own budget.

llama.cpp decodes tokens of many sequences in one batch; with a cache per sequence (kv_unified = false, a stream of
cells each) the hook keeps each sequence's window, scores and evictions apart. Before a batch, each sequence that
its tokens would take past its cells is evicted alone; the others are left as they are.
"""

from __future__ import annotations

from typing import Dict, Mapping, Sequence

import numpy as np

from . import _lib
from ._lib import EvictConfig, llama_cpp
from .session import Positions, PromptTail, context_size, fill_batch, make_room


class Sequences:
    """`n_seq` sequences of `llm`'s model in a context of their own, each evicted down to `config.cells` cells (None:
    the full cache, for comparison). A batch holds at most n_batch tokens of any of them."""

    def __init__(self, llm: "llama_cpp.Llama", config: EvictConfig | None, n_seq: int, n_batch: int | None = None,
                 n_ctx_seq: int = 0):
        """`n_ctx_seq`: cells per sequence without a config (the full cache); with one they follow from its cells."""
        from llama_cpp._internals import LlamaContext

        if n_seq < 1:
            raise ValueError(f"n_seq must be at least 1 (got {n_seq})")
        if config is not None and config.token_scores:
            raise ValueError(f"policy {config.policy} ranks cells by each token's surprisal, from the logits of every token "
                             "decoded, which Sequences does not compute: use a Session or pyllmkv.Llama per conversation")
        if config is not None and config.repeat_probe:
            raise ValueError("repeat_probe decodes its probe after one sequence (Session, pyllmkv.Llama): Sequences "
                             "evicts several with their windows' queries; pass a config without it")
        if config is not None and config.renumber:
            raise ValueError("renumber is for one sequence (Session, pyllmkv.Llama): Sequences keeps each sequence's "
                             "positions until they would pass the training context; pass a config without it")
        self.config, self.n_seq = config, n_seq
        self.n_batch = n_batch or llm.n_batch
        self.n_vocab = llm.n_vocab()
        if config is not None:
            per_seq = context_size(int(llama_cpp.llama_model_n_swa(llm._model.model)), config.cells, self.n_batch)
        else:
            per_seq = n_ctx_seq or llm.n_ctx()
        params = type(llm.context_params).from_buffer_copy(llm.context_params)
        params.n_ctx, params.n_seq_max, params.kv_unified = per_seq * n_seq, n_seq, False
        params.n_batch = params.n_ubatch = self.n_batch
        self._context = LlamaContext(model=llm._model, params=params, verbose=False)
        self.ctx = self._context.ctx
        if config is not None:
            _lib.enable(self.ctx, config)
        self.positions = [Positions(self.ctx, llm._model.n_ctx_train(), s) for s in range(n_seq)]
        self.n_tokens = [0] * n_seq  # tokens decoded into each sequence
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._tail = PromptTail(llm)
        # freed before the model llama-cpp-python frees on close (its exit stack runs last-in first)
        llm._stack.callback(self.close)

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        self._tail.close()
        if self._context is not None:
            self._context.close()
            self._context = None

    def decode(self, tokens: Mapping[int, Sequence[int]]) -> Dict[int, np.ndarray]:
        """Decodes tokens[seq_id] after what each sequence holds, as few batches as n_batch allows (each batch takes
        the sequences in turn); returns the logits of each sequence's last token ([n_vocab] per seq_id). A sequence is
        evicted as Session evicts one: scored by its prompt's tail when the config says so (PromptTail)."""
        for seq_id in tokens:
            if not 0 <= seq_id < self.n_seq:
                raise ValueError(f"sequence id {seq_id} is out of range (0..{self.n_seq - 1})")
        todo = {s: list(t) for s, t in tokens.items() if len(t)}
        queries = {s: self._tail.queries(self.ctx, self.config, t, self.positions[s].of(self.n_tokens[s]), self.n_batch, s)
                   for s, t in todo.items()}
        out: Dict[int, np.ndarray] = {}
        while todo:
            # an equal share of the batch per sequence, the rest to the first ones: sequences advance together
            share, extra = divmod(self.n_batch, len(todo))
            parts = {s: t[: share + (i < extra)] for i, (s, t) in enumerate(todo.items())}
            for s, part in parts.items():
                if self.config is not None:
                    queries[s] = make_room(self.ctx, self.config, self.positions[s], self._tail, todo[s], len(part),
                                           self.n_tokens[s], self.n_batch, queries[s])
            self._decode_batch(parts, {s: len(todo[s]) == len(p) for s, p in parts.items()}, out)
            todo = {s: t[len(parts[s]):] for s, t in todo.items() if len(t) > len(parts[s])}
        return out

    def _decode_batch(self, parts: Mapping[int, Sequence[int]], last: Mapping[int, bool], out: Dict[int, np.ndarray]) -> None:
        b = self._batch
        rows, at = {}, 0
        for s, part in parts.items():
            fill_batch(b, part, self.positions[s].of(self.n_tokens[s]), lambda j: last[s] and j == len(part) - 1, s, at)
            at += len(part)
            if last[s]:
                rows[s] = at - 1
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")
        for s, part in parts.items():
            self.n_tokens[s] += len(part)
        for s, row in rows.items():
            out[s] = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,)).copy()

    def clear(self, seq_id: int) -> None:
        """Empties one sequence (a new conversation in its cells); the others are untouched."""
        self.n_tokens[seq_id] = self.positions[seq_id].truncate(0)

    def stats(self, seq_id: int) -> dict:
        return _lib.stats(self.ctx, seq_id)
