"""A conversation in bounded memory: the model's own chat template, llama.cpp's samplers, and a Session that evicts."""

from __future__ import annotations

import codecs
from typing import Iterator, Optional

from ._lib import llama_cpp
from .session import Session


class Sampler:
    """llama.cpp's sampler chain (top-k, top-p, min-p, temperature, seeded draw), or greedy when temp <= 0."""

    def __init__(self, temp: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, seed: int = -1):
        lc = llama_cpp
        self.chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if temp <= 0:
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_greedy())
        else:
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_top_k(top_k))
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_top_p(top_p, 1))
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_min_p(min_p, 1))
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_temp(temp))
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def sample(self, ctx) -> int:
        return llama_cpp.llama_sampler_sample(self.chain, ctx, -1)

    def __del__(self):
        if getattr(self, "chain", None) is not None:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None


class ConversationFull(ValueError):
    """A message would take the conversation past its most tokens (n_ctx, the CLI's -c)."""


class Chat:
    """Turns of a conversation decoded into one sequence; only the new part of each prompt is decoded. `n_ctx`: most
    tokens the conversation may hold, prompts and answers (0: no limit; the cache holds its budget of them either way)."""

    def __init__(self, session: Session, sampler: Sampler, system: Optional[str] = None, n_ctx: int = 0):
        self.session = session
        self.n_ctx = n_ctx
        self.llm = session.llm
        self.sampler = sampler
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.history: list[int] = []  # every token decoded so far (Session.truncate counts them, not positions)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        self._formatter = self._make_formatter()

    def _make_formatter(self):
        from llama_cpp import llama_chat_format

        meta = self.llm.metadata
        template = meta.get("tokenizer.chat_template")
        if not template:
            raise ValueError("the model has no chat template in its GGUF metadata (tokenizer.chat_template): a base model "
                             "continues text and does not chat; choose an instruct model (`pyllmkv models`, column chat), "
                             "or use this one through bench or the completion API")

        def token_text(key):
            tid = meta.get(key)
            return self.llm._model.token_get_text(int(tid)) if tid is not None else ""

        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=token_text("tokenizer.ggml.eos_token_id"),
            bos_token=token_text("tokenizer.ggml.bos_token_id"),
        )

    @property
    def full(self) -> bool:
        """The conversation holds n_ctx tokens: the answer stops there."""
        return bool(self.n_ctx) and len(self.history) >= self.n_ctx

    def reset(self) -> None:
        system = [m for m in self.messages if m["role"] == "system"]
        self.messages = system
        self.history = []
        self.session.reset()

    def _feed(self, tokens: list[int], on_batch=None) -> None:
        """Makes the sequence hold `tokens`: keeps the common prefix with what was decoded, decodes the rest."""
        common = 0
        for a, b in zip(self.history, tokens):
            if a != b:
                break
            common += 1
        if common < len(self.history):
            common = self.session.truncate(common)
            self.history = self.history[:common]

        def progress(n_done: int, n_total: int) -> None:
            # the history follows every batch, so an interrupted prefill leaves it equal to what the cache holds
            self.history = list(tokens[: common + n_done])
            if on_batch:
                on_batch(n_done, n_total)

        self.session.decode(tokens[common:], on_batch=progress)
        self.history = list(tokens)

    def send(self, text: str, max_tokens: int = -1, on_prefill=None) -> Iterator[str]:
        """Adds a user turn and streams the answer's text. Stopping early (KeyboardInterrupt) keeps the partial
        answer in the conversation."""
        self.messages.append({"role": "user", "content": text})
        formatted = self._formatter(messages=self.messages)
        prompt = self.llm.tokenize(formatted.prompt.encode("utf-8"), add_bos=False, special=True)
        stops = formatted.stop if isinstance(formatted.stop, list) else [formatted.stop] if formatted.stop else []
        try:
            if self.n_ctx and len(prompt) > self.n_ctx:
                raise ConversationFull(f"with this message the conversation holds {len(prompt)} tokens, more than -c "
                                       f"{self.n_ctx}: /reset to start over, or raise -c (0: no limit)")
            self._feed(prompt, on_batch=on_prefill)
        except BaseException:
            self.messages.pop()  # a turn stopped before its answer began is not part of the conversation
            raise

        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        answer = ""
        n = 0
        try:
            while (max_tokens < 0 or n < max_tokens) and not self.full:
                tok = self.sampler.sample(self.session.ctx)
                if llama_cpp.llama_vocab_is_eog(self.vocab, tok):
                    break
                piece = decoder.decode(self.llm.detokenize([tok]))
                answer += piece
                n += 1
                if any(s and s in answer for s in stops):
                    answer = answer[: min(answer.index(s) for s in stops if s and s in answer)]
                    break
                yield piece
                self.history.append(tok)
                self.session.decode([tok])
        finally:
            self.messages.append({"role": "assistant", "content": answer})
