"""One sequence decoded through llama.cpp with a bounded KV cache.

llama-cpp-python's `Llama.eval` numbers positions by its own token count and stores every token in an array of
n_ctx entries, which no longer holds once cells are evicted: the session numbers positions itself, keeps the
cache within budget + n_batch cells by evicting before a batch that would not fit, and keeps positions within the
model's trained context by renumbering the kept cells when they would pass it.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from . import _lib
from ._lib import EvictConfig, llama_cpp
from .surprisal import WordSurprisal


def context_size(n_swa: int, cells: int, n_batch: int, repeat_probe: bool = False) -> int:
    """Cells a context needs: the cells a sequence keeps after an eviction (EvictConfig.cells) + n_batch, and for a
    sliding-window model (Gemma 3, window n_swa) at least n_swa + n_batch, since its sliding-window cache keeps the
    whole window as llama.cpp manages it (eviction acts on the full-attention cache only) and llama.cpp sizes both
    caches from n_ctx; with `repeat_probe`, room for a probe beside them (Probe.ROOM)."""
    return max(cells + n_batch, n_swa + n_batch if n_swa > 0 else 0) + (Probe.ROOM if repeat_probe else 0)


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_metadata(model_path: str) -> dict:
    """The GGUF header's scalar and string values by key (arrays, such as the vocabulary, are skipped), read from the
    header alone: gguf-py's reader also maps every tensor, which takes seconds on a large model."""
    import mmap
    import struct

    with open(model_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{model_path} is not a GGUF file (no GGUF magic at its start)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    off = 4

    # a read past the end raises struct.error, turned into one message below
    def read(fmt: str):
        nonlocal off
        value = struct.unpack_from(fmt, buf, off)[0]
        off += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal off
        n = read("<Q")
        if off + n > len(buf):
            raise struct.error("string past the end")
        off += n
        return buf[off - n : off].decode("utf-8", "replace")

    def skip_array() -> None:
        nonlocal off
        etype, n = read("<I"), read("<Q")
        if etype in _GGUF_SCALARS:
            off += n * struct.calcsize(_GGUF_SCALARS[etype])
        elif etype == _GGUF_STRING:
            unpack = struct.Struct("<Q").unpack_from
            for _ in range(n):  # the vocabulary: a tight loop, tens of milliseconds for 150k strings
                off += 8 + unpack(buf, off)[0]
        else:
            for _ in range(n):
                skip_array()

    try:
        version, _, n_kv = read("<I"), read("<Q"), read("<Q")
        if version not in (2, 3):
            raise ValueError(f"{model_path}: GGUF version {version} is not one llama.cpp reads (2 or 3)")
        out = {}
        for _ in range(n_kv):
            key, vtype = string(), read("<I")
            if vtype in _GGUF_SCALARS:
                out[key] = read(_GGUF_SCALARS[vtype])
            elif vtype == _GGUF_STRING:
                out[key] = string()
            elif vtype == _GGUF_ARRAY:
                skip_array()
            else:
                raise ValueError(f"{model_path}: unknown GGUF value type {vtype} for {key}")
        return out
    except struct.error:
        raise ValueError(f"{model_path}: the GGUF header ends early (a truncated file?)") from None
    finally:
        buf.close()


def gguf_model_int(model_path: str, key: str) -> int:
    """An integer of the model's architecture from its GGUF metadata ({arch}.{key}; 0 if absent), read without
    loading the model."""
    meta = gguf_metadata(model_path)
    return int(meta.get(f"{meta.get('general.architecture', '')}.{key}", 0))


def sliding_window(model_path: str) -> int:
    """The model's attention sliding window (0 if none)."""
    return gguf_model_int(model_path, "attention.sliding_window")


def truncate(ctx, n: int, seq_id: int = 0) -> int:
    """Drops positions >= n of the sequence (with the hook, also the cells holding moved rows of those tokens) and
    returns the position decoding resumes at: n, or less if the cell before n was evicted (llama.cpp continues a
    sequence only at its highest position + 1)."""
    mem = llama_cpp.llama_get_memory(ctx)
    llama_cpp.llama_memory_seq_rm(mem, seq_id, n, -1)
    return int(llama_cpp.llama_memory_seq_pos_max(mem, seq_id)) + 1


class Positions:
    """Where a sequence's tokens sit when it may go on past `max_position` (0: never renumbered): before a batch would
    pass it, the kept cells are evicted and renumbered from 0 (StreamingLLM keeps positions within its cache the same
    way), so positions lag the tokens seen by `shift`. Session, Sequences and pyllmkv.Llama decode through it."""

    def __init__(self, ctx, max_position: int, seq_id: int = 0):
        self.ctx, self.max_position, self.seq_id = ctx, max_position, seq_id
        self.shift = 0  # tokens seen - next position
        self._renumbered_at = -1  # the hook's eviction count at the last renumbering
        self._restored = False  # a saved state was loaded since: whether an eviction left gaps is not known

    def of(self, n_tokens: int) -> int:
        """The position of the n_tokens-th token seen."""
        return n_tokens - self.shift

    def truncate(self, n_tokens: int) -> int:
        """Drops the tokens seen from the n-th on; returns how many it keeps: n, or fewer if the cell before was
        evicted (see truncate). A token from before a renumbering counts as at its shifted position."""
        kept = truncate(self.ctx, max(self.of(n_tokens), 0), self.seq_id)
        if kept == 0:
            self.shift = 0
        self._renumbered_at = -1  # fewer tokens held: a renumbering may now bring positions lower
        return kept + self.shift

    def renumber_before(self, n_tokens: int, n_new: int, queries: Optional[bytes]) -> bool:
        """Evicts (scored with `queries` when given) and renumbers the kept cells from 0 (each KV head's rows on their
        own, ending at the last cell) if `n_new` more tokens would pass max_position; returns whether it did. A
        max_position below the cells kept cannot be met: renumbering again before the next eviction would give the
        same numbers at the cost of a scoring pass and a K shift per decoded token, so until then positions go on."""
        if not self.max_position or self.of(n_tokens) + n_new <= self.max_position:
            return False
        seq_id = self.seq_id
        if _lib.stats(self.ctx, seq_id)["n_evictions"] == self._renumbered_at:
            return False
        if queries:
            _lib.set_window_queries(self.ctx, queries, seq_id)
        _lib.evict(self.ctx, seq_id)
        self._renumber(n_tokens)
        return True

    def restore(self, shift: int) -> None:
        """After a saved state was loaded: positions lag the tokens seen by `shift`. The eviction count is not in the
        state, so the next close_gaps renumbers (consecutive cells keep their positions)."""
        self.shift = shift
        self._restored = True

    def close_gaps(self, n_tokens: int) -> bool:
        """Renumbers the kept cells from 0 if an eviction came, or a state was loaded, since the last renumbering
        (EvictConfig.renumber); returns whether it did."""
        if not self._restored and _lib.stats(self.ctx, self.seq_id)["n_evictions"] in (0, self._renumbered_at):
            return False
        self._renumber(n_tokens)
        return True

    def _renumber(self, n_tokens: int) -> None:
        self._restored = False
        self.shift = n_tokens - _lib.compact_positions(self.ctx, self.seq_id)
        self._renumbered_at = _lib.stats(self.ctx, self.seq_id)["n_evictions"]


def will_evict(ctx, cells: int, n_batch: int, n_new: int, seq_id: int = 0) -> bool:
    """Whether `n_new` more tokens would take the sequence past `cells` + n_batch cells (evict_to_fit evicts then)."""
    return _lib.stats(ctx, seq_id)["n_seq_cells"] + n_new > cells + n_batch


def evict_to_fit(ctx, cells: int, n_batch: int, n_new: int, queries: Optional[bytes] = None, seq_id: int = 0) -> None:
    """Evicts the sequence down to its budget if `n_new` more tokens would take it past `cells` + n_batch cells; scored
    with `queries` (PromptTail's) when given, else with those the last decode captured."""
    if will_evict(ctx, cells, n_batch, n_new, seq_id):
        try:
            if queries:
                _lib.set_window_queries(ctx, queries, seq_id)
            _lib.evict(ctx, seq_id)
        except _lib.KVEvictError as e:
            # enabled on a sequence decoded before: nothing scores it until this batch captured queries, so let the
            # batch in if the cache has room (the next batch evicts)
            st = _lib.stats(ctx, seq_id)
            if e.code != _lib.ERR_NO_QUERIES or st["n_seq_cells"] + n_new > st["kv_size"]:
                raise


def decode_in_batches(ctx, config: Optional[EvictConfig], positions: Positions, tail: "PromptTail", tokens: Sequence[int],
                      n_tokens: int, n_batch: int, decode: Callable[[int, Sequence[int]], None],
                      probe: Optional["Probe"] = None) -> None:
    """The one decode loop of a sequence that evicts (Session for chat and the bench, pyllmkv.Llama for the API and the
    server): `tokens` follow the n_tokens seen, in batches of n_batch; before each, the sequence is evicted to fit
    (scored by the probe, or the prompt tail's queries when it has them) and renumbered if it would pass the
    positions' maximum; `decode(start, batch)` then decodes tokens[start:start + len(batch)] at
    positions.of(n_tokens + start). With config.renumber, the first batch reads the kept cells renumbered from 0 if an
    eviction left gaps since the last renumbering."""
    queries = tail.queries(ctx, config, tokens, positions.of(n_tokens), n_batch, positions.seq_id)
    if probe is not None:
        probe.follow(n_tokens)
    for start in range(0, len(tokens), n_batch):
        batch = tokens[start : start + n_batch]
        if config is not None:
            queries = make_room(ctx, config, positions, tail, tokens[start:], len(batch), n_tokens + start, n_batch, queries,
                                probe, renumber=config.renumber and start == 0)
        decode(start, batch)
        if probe is not None:
            probe.pending.extend(batch)


def make_room(ctx, config: EvictConfig, positions: Positions, tail: "PromptTail", rest: Sequence[int], n_new: int,
              n_tokens: int, n_batch: int, queries: Optional[bytes], probe: Optional["Probe"] = None,
              renumber: bool = False) -> Optional[bytes]:
    """Before decoding the first n_new of `rest` (the tokens that follow the n_tokens seen) into positions.seq_id:
    evicts the sequence to fit, scored by the `probe` when given, else by `queries` (the prompt tail's) when
    given, and renumbers it if they would pass the positions' maximum, or with `renumber` if an eviction left gaps.
    Returns the queries for the rest's later batches: after a renumbering, the rest's tail again, at the positions it
    will have."""
    if probe is not None and will_evict(ctx, config.cells, n_batch, n_new, positions.seq_id):
        probe.score(ctx, config.window, positions, n_tokens)
    evict_to_fit(ctx, config.cells, n_batch, n_new, queries, positions.seq_id)
    if positions.renumber_before(n_tokens, n_new, queries) or (renumber and positions.close_gaps(n_tokens)):
        return tail.queries(ctx, config, rest, positions.of(n_tokens), n_batch, positions.seq_id)
    return queries


def fill_batch(batch, tokens: Sequence[int], pos0: int, logits: Callable[[int], bool], seq_id: int = 0, at: int = 0) -> None:
    """Sets entries at, at + 1, ... of `batch` to `tokens` of seq_id at positions pos0, pos0 + 1, ... (the batch then
    ends there); logits(i): whether token i's are wanted."""
    batch.n_tokens = at + len(tokens)
    for i, tok in enumerate(tokens):
        batch.token[at + i] = tok
        batch.pos[at + i] = pos0 + i
        batch.n_seq_id[at + i] = 1
        batch.seq_id[at + i][0] = seq_id
        batch.logits[at + i] = logits(i)


class PromptTail:
    """The queries of a long prompt's last `window` tokens, for the evictions made while the prompt is decoded.

    A prompt longer than the cache is decoded and evicted batch by batch, each eviction scored by the last queries of
    the batch before it: text that only the prompt's end (the question) will ask for has been evicted by the time
    the end is read. Decoding the end alone first, at its own positions, in a small context of the same model, gives
    queries close to those the whole prompt will give it (exact in the first layer, where a query depends only on the
    token and its position), and every eviction of the prompt scores with them (EvictConfig.prompt_tail)."""

    def __init__(self, llm: "llama_cpp.Llama"):
        self.llm = llm
        self._ctx = None
        self._batch = None
        self._window = 0
        # freed before the model and the context llama-cpp-python frees on close (its exit stack runs last-in first)
        llm._stack.callback(self.close)

    def _open(self, window: int) -> None:
        from llama_cpp._internals import LlamaContext

        self.close()
        params = type(self.llm.context_params).from_buffer_copy(self.llm.context_params)
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = window + 1, window, window, 1
        self._ctx = LlamaContext(model=self.llm._model, params=params, verbose=False)
        # the hook only captures the queries here (budget and policy unused: nothing is evicted)
        _lib.enable(self._ctx.ctx, EvictConfig(budget=window + 1, window=window, n_sink=0, policy="snapkv", granularity="token"))
        self._batch = llama_cpp.llama_batch_init(window, 0, 1)
        self._window = window

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None

    def queries(self, ctx, config: Optional[EvictConfig], tokens: Sequence[int], n_past: int, n_batch: int,
                seq_id: int = 0) -> Optional[bytes]:
        """For decoding `tokens` from position n_past into sequence seq_id of `ctx` evicted by `config`: the queries of
        their last window tokens, or None when there is no config, no prompt tail, a policy that reads no query
        (streaming, knorm, surprisal), or the tokens fit in the cache without an eviction or are fewer than the window."""
        if config is None or not config.prompt_tail or config.repeat_probe or len(tokens) < config.window or \
                not _lib.POLICY_INFO[config.policy].reads_queries or not will_evict(ctx, config.cells, n_batch, len(tokens), seq_id):
            return None
        w = config.window
        if self._window != w:
            self._open(w)
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx.ctx), 0, -1, -1)
        fill_batch(self._batch, tokens[-w:], n_past + len(tokens) - w, lambda i: i == w - 1)
        if llama_cpp.llama_decode(self._ctx.ctx, self._batch) != 0:
            raise RuntimeError("llama_decode failed on the prompt's tail")
        return _lib.window_queries(self._ctx.ctx)


class Probe:
    """What scores each eviction instead of the window's queries (EvictConfig.repeat_probe): before an eviction its
    pieces() are decoded after the sequence; every `window` tokens their queries are folded into each cell's score
    (the maximum any probe gave it, kept across evictions; for DefensiveKV what ranks as one window of all the probes'
    queries: _lib.probe), and the probe's cells are removed. A piece takes at most ROOM cells beside the budget
    (context_size). A subclass says what it decodes: pieces()."""

    ROOM = 288  # cells a piece may take beside the budget: a repeat probe's piece of text and its prompt

    def __init__(self, llm: "llama_cpp.Llama", window: int):
        self.pending: list[int] = []  # tokens decoded since the last probe, the last ones the sequence holds
        self._start = 0  # tokens seen before pending[0]
        self._batch = llama_cpp.llama_batch_init(window, 0, 1)
        llm._stack.callback(self.close)

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None

    def follow(self, n_tokens: int) -> None:
        """The sequence holds n_tokens tokens seen: forgets pending ones it was truncated before."""
        keep = n_tokens - self._start
        if not 0 <= keep <= len(self.pending):
            self._start, self.pending = n_tokens, []
        else:
            del self.pending[keep:]

    def pieces(self) -> Iterator[list[int]]:
        """What is decoded after the sequence to score it, a piece (at most ROOM tokens) at a time."""
        raise NotImplementedError

    def score(self, ctx, window: int, positions: Positions, n_tokens: int) -> None:
        """Scores the cells of positions.seq_id, which holds n_tokens tokens seen, for its next eviction."""
        p_end, seq_id = positions.of(n_tokens), positions.seq_id
        for probe in self.pieces():
            for j in range(0, len(probe), window):
                fill_batch(self._batch, probe[j : j + window], p_end + j, lambda k: False, seq_id)
                if llama_cpp.llama_decode(ctx, self._batch) != 0:
                    raise RuntimeError("llama_decode failed on the probe")
                _lib.probe(ctx, p_end, seq_id)
            truncate(ctx, p_end, seq_id)
        self._start, self.pending = n_tokens, []


class RepeatProbe(Probe):
    """Scores each eviction by a request to repeat the text read since the last one (KVzip's probe, Kim et al. 2025,
    arXiv 2505.23416), not by the window's queries: those keep what the end of a document looks at, these what
    reproducing it needs. An experiment, off by default: read in the chat's batches it kept fewer of a document's facts
    than the window did, where one eviction of the whole document scored this way keeps most (docs/results.md).
    Its pieces: PROMPT and PIECE tokens of the pending text (the tokens decoded since the last probe), so the text is
    decoded twice."""

    PROMPT = "\n\nRepeat the previous context:\n"
    PIECE = Probe.ROOM - 32  # text tokens repeated at once, beside the prompt: fewer cost the prompt's tokens more often

    def __init__(self, llm: "llama_cpp.Llama", window: int):
        super().__init__(llm, window)
        self.prompt = llm.tokenize(self.PROMPT.encode(), add_bos=False, special=False)
        assert len(self.prompt) <= self.ROOM - self.PIECE, "the probe's prompt outgrows its room"

    def pieces(self) -> Iterator[list[int]]:
        for i in range(0, len(self.pending), self.PIECE):
            yield self.prompt + self.pending[i : i + self.PIECE]


class QuestionProbe(Probe):
    """Scores each eviction by a question known before the text is read, decoded after the sequence as the repeat
    probe is. The bench's chat-question setting: an oracle no chat has, it bounds what evictions scored by attention
    can keep of a text read in batches."""

    def __init__(self, llm: "llama_cpp.Llama", window: int, question: Sequence[int]):
        if not 0 < len(question) <= self.ROOM:
            raise ValueError(f"the question must take 1 to {self.ROOM} tokens (the probe's room), not {len(question)}")
        super().__init__(llm, window)
        self.question = list(question)

    def pieces(self) -> Iterator[list[int]]:
        yield self.question


class FactsProbe(QuestionProbe):
    """Scores each eviction by one fixed question that asks for the text's facts, decoded after the sequence as the
    repeat probe is: question-agnostic, it stands in for whatever will be asked about a document (the bench's chat-facts
    setting). It costs a decode of QUESTION's few tokens per eviction, not the text's. An experiment: read in the chat's
    batches it kept other facts than the prompt tail's scoring, not more (docs/results.md)."""

    QUESTION = "\n\nQuestion: What are the key facts of the text above (its names, numbers and values)? Answer:"

    def __init__(self, llm: "llama_cpp.Llama", window: int):
        super().__init__(llm, window, llm.tokenize(self.QUESTION.encode(), add_bos=False, special=False))


class Session:
    """Decodes tokens of sequence 0 of `llm`'s context; with `config`, evicts down to `config.cells` cells."""

    def __init__(self, llm: "llama_cpp.Llama", config: Optional[EvictConfig] = None, max_position: int = 0,
                 probe: Optional[Probe] = None):
        """`max_position`: positions stay below it (default: the model's training context); when a batch would
        pass it, the kept cells are renumbered from 0 (StreamingLLM keeps positions within its cache the same way),
        so a conversation can go on past the context the model was trained for. `probe`: what scores each eviction
        when config.repeat_probe is on (default: a RepeatProbe)."""
        self.llm = llm
        self.ctx = llm._ctx.ctx
        self.config = config
        self.n_batch = llm.n_batch
        self.n_vocab = llm.n_vocab()
        self.n_tokens = 0  # tokens decoded into the sequence
        self.positions = Positions(self.ctx, max_position or llm._model.n_ctx_train())
        if config is not None:
            need = context_size(int(llama_cpp.llama_model_n_swa(llm._model.model)), config.cells, self.n_batch,
                                config.repeat_probe)
            if llm.n_ctx() < need:
                raise ValueError(
                    f"n_ctx ({llm.n_ctx()}) must be at least {need}: the cells kept (budget) + n_batch, and for a sliding-window "
                    "model its window + n_batch, + the repeat probe's room if it is on (see pyllmkv.session.context_size)"
                )
            _lib.enable(self.ctx, config)
        self._tail = PromptTail(llm)
        if probe is not None and (config is None or not config.repeat_probe):
            raise ValueError("a probe scores evictions only with repeat_probe on: pass EvictConfig(repeat_probe=True)")
        self._probe = (probe or RepeatProbe(llm, config.window)) if config is not None and config.repeat_probe else None
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        # a policy ranking cells by their tokens' surprisal needs the logits of every token decoded
        self._surprisal = WordSurprisal(llm, config.window) if config is not None and config.token_scores else None

    def __del__(self):
        tail = getattr(self, "_tail", None)
        if tail is not None:
            tail.close()  # its context, now: else it lives as long as the llm (whose exit stack holds it)
        batch = getattr(self, "_batch", None)
        if batch is not None:
            llama_cpp.llama_batch_free(batch)
            self._batch = None

    @property
    def max_position(self) -> int:
        """Positions stay below it: the kept cells are renumbered before a batch would pass it."""
        return self.positions.max_position

    @property
    def n_past(self) -> int:
        """Position of the next token: n_tokens until positions are renumbered."""
        return self.positions.of(self.n_tokens)

    @n_past.setter
    def n_past(self, position: int) -> None:
        """Where decoding goes on, as after loading a state or renumbering outside the session."""
        self.positions.shift = self.n_tokens - position

    def reset(self) -> None:
        """Empties the sequence; the hook stays enabled."""
        self.n_tokens = self.positions.truncate(0)

    def truncate(self, n: int) -> int:
        """Drops the tokens decoded from the n-th on, so decoding can resume there; returns the number of tokens it
        keeps: n, or fewer if the cell before was evicted (Positions.truncate)."""
        self.n_tokens = self.positions.truncate(n)
        return self.n_tokens

    def evict(self) -> int:
        return _lib.evict(self.ctx) if self.config is not None else 0

    def decode(
        self,
        tokens: Sequence[int],
        all_logits: bool = False,
        on_batch: Optional[Callable[[int, int], None]] = None,
    ) -> np.ndarray:
        """Decodes `tokens` in batches of n_batch; returns the logits of the last token ([n_vocab]) or of all
        tokens ([len(tokens), n_vocab]). `on_batch(n_done, n_total)` is called after each batch."""
        out = np.empty((len(tokens) if all_logits else 1, self.n_vocab), dtype=np.float32)

        def decode(start: int, chunk: Sequence[int]) -> None:
            b, position = self._batch, self.n_past
            every = all_logits or self._surprisal is not None
            fill_batch(b, chunk, position, lambda i: every or start + i == len(tokens) - 1)
            rc = llama_cpp.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}")
            if self._surprisal is not None:
                self._surprisal.read(self.ctx, self.n_tokens, position, chunk)
            self.n_tokens += len(chunk)
            for i in range(len(chunk)):
                if all_logits or start + i == len(tokens) - 1:
                    row = start + i if all_logits else 0
                    ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
                    out[row] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
            if on_batch:
                on_batch(start + len(chunk), len(tokens))

        decode_in_batches(self.ctx, self.config, self.positions, self._tail, tokens, self.n_tokens, self.n_batch, decode,
                          self._probe)
        return out if all_logits else out[0]
