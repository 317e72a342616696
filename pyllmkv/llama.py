"""`pyllmkv.Llama`: llama-cpp-python's `Llama` with a KV cache of fixed size.

Everything llama-cpp-python offers (`__call__`, `create_completion`, `create_chat_completion`, streaming,
`tokenize`/`detokenize`, the OpenAI-shaped results) works unchanged. What differs:
- the cache holds `kv_budget + n_batch` cells (a sliding-window model's at least its window + n_batch); before a batch
  that would not fit, the sequence is evicted down to at most `kv_budget` cells by the chosen policy (with one that
  shares heads, each head keeps about (kv_budget + window) / 2 cells on average: EvictConfig.for_cells);
- `n_ctx` is the logical context (the tokens a conversation may hold, prompt and answer), by default the model's
  training context, no longer the cache size; a larger one goes past the training context as `pyllmkv chat` does:
  before a batch would pass it, the kept cells are renumbered from 0 (session.Positions), so positions stay within;
- where the model's cache can shift positions, a prompt or token that follows an eviction reads the kept cells
  renumbered from 0 too, as consecutive text (`renumber`);
- `input_ids[:n_tokens]` keeps every token the sequence has seen, evicted or not, so prompts that share a prefix with
  the conversation reuse the cache as before; a prompt that diverges where the cache no longer holds the preceding
  token is decoded again from the last kept token. What is reused is what the cache kept of the prefix, chosen with
  the tokens that came after it: once evicted, the answer can differ from that of the prompt decoded afresh.

Where there is nothing to evict the hook stays off and the object behaves as llama_cpp.Llama: `vocab_only=True` (a
tokenizer, no cache) and `embedding=True` (each input is encoded in one batch, the cache cleared after it). A recurrent
or hybrid model (Mamba, Jamba, ...) is refused: its state is not a KV cache the hook can evict.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np

from . import _lib, rpc
from ._lib import DEFAULT_POLICY, EvictConfig, llama_cpp
from .session import Positions, PromptTail, RepeatProbe, context_size, decode_in_batches, sliding_window
from .surprisal import WordSurprisal


class Llama(llama_cpp.Llama):
    def __init__(
        self,
        model_path: str,
        *,
        kv_budget: int = EvictConfig.budget,
        policy: str = DEFAULT_POLICY,
        granularity: str = EvictConfig.granularity,
        window: int = EvictConfig.window,
        pool_kernel: int = EvictConfig.pool_kernel,
        prompt_tail: bool = True,
        repeat_probe: bool = False,
        renumber: Optional[bool] = None,
        repack: bool = False,
        n_ctx: int = 0,
        n_batch: int = 512,
        rpc_servers: Optional[str] = None,
        **kwargs,
    ):
        """Loads `model_path` like `llama_cpp.Llama`, with eviction. `kv_budget`: most cells kept per sequence (the
        memory bound); `policy`: one of pyllmkv.POLICIES (the default, pyllmkv.DEFAULT_POLICY, and surprisal compute the
        logits of every token decoded, which score them: pyllmkv.surprisal); `granularity`: "head" (each KV head keeps
        its own cells) or "token"; `window`: recent queries that score the cache (always kept); `pool_kernel`: cells the
        window's scores are averaged over, and positions surprisal's are max-pooled over (odd; 1: none); `prompt_tail`:
        a prompt longer than the cache is evicted with the queries of its last `window` tokens
        (pyllmkv.session.PromptTail), else with those of each batch's end; `repeat_probe`: each eviction is scored by
        a request to repeat the text read since the last one (pyllmkv.session.RepeatProbe; an experiment,
        docs/results.md), at the cost of decoding the text twice; `renumber`: a prompt or token that follows an eviction
        reads the kept cells renumbered from 0 (None: where the model's cache can shift positions); `repack`: weights
        kept on the CPU are repacked for llama.cpp's matmul as llama.cpp does, all but W_O (pyllmkv._lib.cpu_weights:
        decodes faster and prefills slower on some CPUs, in more memory), else in ggml's row layout; `n_ctx`: logical
        context (0: the model's training context; may exceed it); `rpc_servers`: "HOST:PORT,..." of ggml-rpc-servers
        that the n_gpu_layers layers are split across (pyllmkv.rpc; llama-cpp-python 0.3.36 takes the argument and
        ignores it). Other arguments go to `llama_cpp.Llama`.

        With `vocab_only=True` or `embedding=True` eviction is off: the context (kv_budget + n_batch cells) is the
        logical context, and `kv_stats()` returns `{"enabled": False, "reason": ...}`. Raises KVEvictError for a
        model the hook cannot evict, naming its architecture."""
        # unknown policy or granularity, too small a budget: fail before loading the model
        self.evict_config = EvictConfig.for_cells(kv_budget, policy=policy, granularity=granularity, window=window,
                                                  pool_kernel=pool_kernel, prompt_tail=prompt_tail,
                                                  repeat_probe=repeat_probe, renumber=bool(renumber))
        self.kv_budget = kv_budget
        if rpc_servers:
            rpc.add_servers(rpc_servers)
        kwargs.setdefault("n_ubatch", n_batch)
        cells = context_size(sliding_window(model_path), self.evict_config.cells, n_batch, repeat_probe)
        with _lib.cpu_weights("repack" if repack else "plain"):
            super().__init__(model_path, n_ctx=cells, n_batch=n_batch, **kwargs)
        self._eviction_off_reason = self._why_no_eviction()
        if self._eviction_off_reason:
            return
        self.evict_config = _lib.renumber_where_it_can(self._ctx.ctx, self.evict_config, renumber)
        try:
            _lib.enable(self._ctx.ctx, self.evict_config)
        except _lib.KVEvictError as e:
            model = self._model.model
            if not (llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)):
                raise
            arch = self.metadata.get("general.architecture", "unknown")
            raise _lib.KVEvictError(e.code, (
                f"pyllmkv.Llama cannot bound the memory of architecture {arch}: a recurrent or hybrid model keeps a "
                "recurrent state, which the hook cannot evict; use llama_cpp.Llama (pyllmkv.llama_cpp.Llama), which "
                "has no kv_budget")) from e
        self._tail = PromptTail(self)
        self._probe = RepeatProbe(self, window) if repeat_probe else None
        self._positions = positions = Positions(self._ctx.ctx, self._model.n_ctx_train())
        # the surprisal policy scores each token read from the logits that predicted it: every token's are computed
        self._surprisal = WordSurprisal(self, window) if self.evict_config.token_scores else None
        every = self._surprisal is not None
        place = self._batch.set_batch
        # llama-cpp-python's eval places a batch at n_tokens; once the kept cells were renumbered, positions lag it
        self._batch.set_batch = lambda batch, n_past, logits_all: place(batch, positions.of(n_past), logits_all or every)

        self._n_ctx = n_ctx or self._model.n_ctx_train()
        self.input_ids = np.ndarray((self._n_ctx,), dtype=np.intc)
        if self._logits_all:
            self.scores = np.ndarray((self._n_ctx, self._n_vocab), dtype=np.single)

    def _why_no_eviction(self) -> str:
        """Why this object needs no eviction ("" if it does)."""
        if self.model_params.vocab_only:
            return "vocab_only=True: a tokenizer, with no KV cache"
        if self.context_params.embeddings:
            # llama-cpp-python encodes up to n_batch sequences in one batch (n_seq_max > 1) and clears the cache after
            return "embedding=True: each input is encoded whole in one batch, and the cache cleared after it"
        return ""

    def close(self) -> None:
        if hasattr(self, "_stack"):  # __init__ may have failed before llama_cpp.Llama set it up
            super().close()

    def n_ctx(self) -> int:
        """The logical context: the longest prompt + answer, independent of the cache size."""
        return getattr(self, "_n_ctx", None) or super().n_ctx()

    def kv_stats(self) -> dict:
        """Cells used and allocated, KV bytes, evictions, as llama.cpp counts them, with `enabled` True; where eviction
        is off (vocab_only=True, embedding=True) `{"enabled": False, "reason": why}`."""
        if self._eviction_off_reason:
            return {"enabled": False, "reason": self._eviction_off_reason}
        stats = _lib.stats(self._ctx.ctx)
        stats["budget"] = self.kv_budget
        stats["enabled"] = True
        return stats

    def save_state(self) -> "llama_cpp.LlamaState":
        """llama-cpp-python's save_state; the state also holds, as `kv_evict`, what llama.cpp's state leaves out: the
        position each KV head's row was given (head granularity moves rows between cells), the -ada policies'
        per-head mask, the window's queries and the H2O sums, so that a loaded sequence attends, truncates and evicts
        as the original. Read first: llama.cpp writes the state of an -ada cache only once they have been. Raises
        KVEvictError where llama.cpp cannot write the state (instead of returning an empty one)."""
        if self._eviction_off_reason:
            return super().save_state()
        kv_evict = _lib.seq_data(self._ctx.ctx)
        if llama_cpp.llama_state_get_size(self._ctx.ctx) == 0:
            raise _lib.KVEvictError(-2, _lib.last_error() or "llama.cpp could not save the state")
        state = super().save_state()
        state.kv_evict = kv_evict
        state.position_shift = self._positions.shift
        return state

    def load_state(self, state: "llama_cpp.LlamaState") -> None:
        """llama-cpp-python's load_state; a state saved by pyllmkv.Llama restores the hook's bookkeeping too (one
        saved by llama_cpp.Llama has none: its rows count as their cells' tokens, and the next eviction waits for
        queries of the tokens decoded after the load). A state of an -ada cache needs its `kv_evict` (the mask). With
        renumber on, the next token reads the loaded cells renumbered from 0, as the saved conversation's would."""
        super().load_state(state)
        if getattr(state, "kv_evict", None):
            _lib.set_seq_data(self._ctx.ctx, state.kv_evict)
        if not self._eviction_off_reason:
            self._positions.restore(getattr(state, "position_shift", 0))

    def _create_completion(self, *args, **kwargs):
        # llama-cpp-python refuses a prompt at the logical context (n_ctx) but names the context's cells in the
        # message, which its server turns into "maximum context length": say the logical context, and what the cache is
        try:
            yield from super()._create_completion(*args, **kwargs)
        except ValueError as e:
            m = re.match(r"Requested tokens \((\d+)\) exceed context window of \d+", str(e))
            if not m:
                raise
            raise ValueError(f"Requested tokens ({m[1]}) exceed context window of {self._n_ctx} (n_ctx, the logical "
                             f"context; the KV cache holds {llama_cpp.llama_n_ctx(self.ctx)} cells and evicts past them)") from None

    def eval(self, tokens: Sequence[int]):
        if self._eviction_off_reason:
            return super().eval(tokens)
        resume = self._positions.truncate(self.n_tokens)
        if resume < self.n_tokens:
            # the cell before n_tokens was evicted: decode again from the last kept cell
            tokens = [int(t) for t in self.input_ids[resume : self.n_tokens]] + list(tokens)
            self.n_tokens = resume
        eval_batch = super().eval

        def decode(start: int, batch: Sequence[int]) -> None:
            n_tokens, position = self.n_tokens, self._positions.of(self.n_tokens)
            eval_batch(batch)
            if self._surprisal is not None:
                self._surprisal.read(self.ctx, n_tokens, position, batch)

        decode_in_batches(self._ctx.ctx, self.evict_config, self._positions, self._tail, tokens, self.n_tokens, self.n_batch,
                          decode, self._probe)
