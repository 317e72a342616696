"""RULER-style retention tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?"), generated here from a seed over the bench's real English text, and the branching that evicts one prefilled
context with every policy.

Two settings, per sample:
- question-agnostic (a chat's everyday case, DefensiveKV's protocol): the context alone is prefilled and evicted to
  the budget with its own last `window` queries; then the question is decoded at the next positions and answered.
- question-aware (the CriticalKV paper's and kvpress's): context and question are prefilled, evicted once with the
  question in the window, then answered.
- repeat (question-agnostic, scored as KVzip does: Kim et al. 2025, arXiv 2505.23416): a request to repeat the context
  and the context itself are decoded after it; their queries score the context's cells, the eviction keeps the
  context's last `window` cells and the policy's choice among the rest, then the probe's cells are removed and the
  question is answered as in the agnostic setting, with the same cells. It costs a second prefill of the context.
- chat and chat-repeat (question-agnostic, as `pyllmkv chat` reads a document): the context is decoded through a
  Session in n_batch batches inside the budget, evicted before each batch that would not fit, scored by the prompt's
  tail (chat) or by the repeat probe (chat-repeat, session.RepeatProbe); then the question is answered. They cost a
  prefill per branch (chat-repeat two) and are not in the default settings.
- chat-question (an oracle no chat has, the bound of what a chat's evictions scored by attention can keep): read as
  in chat, each eviction scored by the question still to come, decoded after the sequence as the repeat probe is
  (session.QuestionProbe); not in the default settings either.
- chat-facts (question-agnostic): read as in chat, each eviction scored by one fixed question asking for the text's
  facts, decoded after the sequence as the oracle's question is (session.FactsProbe); not in the default settings.
Policy `surprisal` (pyllmkv.surprisal) scores cells by the logits of the tokens as they were read, so only the chat
setting, which reads the context through a Session, has it.
The context is prefilled once with the whole cache and saved; each (setting, policy, budget) of the first three loads
it, evicts once and answers, so a policy costs an eviction and a short decode, not a prefill.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

TASKS = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa"]
SETTINGS = ["agnostic", "aware", "repeat", "chat", "chat-repeat", "chat-question", "chat-facts"]
DEFAULT_SETTINGS = SETTINGS[:3]  # the chat settings prefill each branch
FULL = "full cache"
# tokens an answer may take: the multi-value tasks list several items
N_ANSWER = {"niah_single": 16, "niah_multikey": 16, "niah_multivalue": 48, "niah_multiquery": 48, "vt": 40, "cwe": 80,
            "fwe": 30, "qa": 16}

# qa: a quoted passage of the context and the words that follow it
QA_QUOTE_WORDS, QA_ANSWER_WORDS = 8, 4

NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.\n")
NIAH_NEEDLE = " One of the special magic numbers for {key} is: {value}. "


@dataclass
class Sample:
    """One context and its question; `expected`: the strings a right answer holds (scored by string_match_all)."""

    task: str
    context: str
    question: str
    expected: list[str]
    n_answer: int = field(default=0)

    def __post_init__(self):
        self.n_answer = self.n_answer or N_ANSWER[self.task]


def string_match_all(answer: str, expected: Sequence[str]) -> float:
    """RULER's score: the share of expected strings that occur in the answer, case-insensitive."""
    low = answer.lower()
    return sum(e.lower() in low for e in expected) / len(expected)


class Generator:
    """Samples of `context_tokens` tokens (approximately: the text is cut by a token count) from `text`.
    `count(text)` gives the number of tokens of a text."""

    def __init__(self, text: str, count: Callable[[str], int], seed: int):
        self.count = count
        self.rng = random.Random(seed)
        self.words = sorted({w.lower() for w in re.findall(r"\b[A-Za-z]{4,12}\b", text)})
        self.sentences = re.split(r"(?<=[.;:])\s+", re.sub(r"\s+", " ", text))

    # --- pieces ---

    def number(self) -> str:
        return str(self.rng.randint(1000000, 9999999))

    def key(self) -> str:
        return f"{self.rng.choice(self.words)}-{self.rng.choice(self.words)}"

    def haystack(self, n_tokens: int) -> list[str]:
        """Consecutive sentences of the text from a random start, about n_tokens long."""
        start = self.rng.randrange(len(self.sentences))
        out, n = [], 0
        while n < n_tokens:
            s = self.sentences[(start + len(out)) % len(self.sentences)]
            out.append(s)
            n += self.count(" " + s)
        return out

    def insert(self, hay: list[str], needles: list[str]) -> str:
        """The sentences with each needle at a random depth (needles in the given order)."""
        at = sorted(self.rng.randrange(len(hay) + 1) for _ in needles)
        out = list(hay)
        for i, (pos, needle) in enumerate(zip(at, needles)):
            out.insert(pos + i, needle.strip())
        return " ".join(out)

    def hidden(self, context_tokens: int, intro: str, needles: list[str], question: str, expected: list[str],
               task: str) -> Sample:
        """The intro, then text of the context's length with the needles hidden in it."""
        budget = context_tokens - self.count(intro) - sum(self.count(n) for n in needles)
        return Sample(task, intro + self.insert(self.haystack(budget), needles), question, expected)

    def niah(self, context_tokens: int, needles: list[str], question: str, expected: list[str], task: str) -> Sample:
        return self.hidden(context_tokens, NIAH_INTRO, needles, question, expected, task)

    # --- tasks ---

    def niah_single(self, n: int) -> Sample:
        key, value = self.key(), self.number()
        return self.niah(n, [NIAH_NEEDLE.format(key=key, value=value)],
                         f"\nWhat is the special magic number for {key} mentioned in the provided text? "
                         f"The special magic number for {key} mentioned in the provided text is", [value], "niah_single")

    def niah_multikey(self, n: int) -> Sample:
        keys = [self.key() for _ in range(4)]
        values = [self.number() for _ in keys]
        needles = [NIAH_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
        self.rng.shuffle(needles)
        return self.niah(n, needles, f"\nWhat is the special magic number for {keys[0]} mentioned in the provided text? "
                         f"The special magic number for {keys[0]} mentioned in the provided text is", [values[0]],
                         "niah_multikey")

    def niah_multivalue(self, n: int) -> Sample:
        key = self.key()
        values = [self.number() for _ in range(4)]
        return self.niah(n, [NIAH_NEEDLE.format(key=key, value=v) for v in values],
                         f"\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
                         f"The special magic numbers for {key} mentioned in the provided text are", values,
                         "niah_multivalue")

    def niah_multiquery(self, n: int) -> Sample:
        keys = [self.key() for _ in range(4)]
        values = [self.number() for _ in keys]
        needles = [NIAH_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
        self.rng.shuffle(needles)
        asked = ", ".join(keys[:-1]) + f", and {keys[-1]}"
        return self.niah(n, needles, f"\nWhat are all the special magic numbers for {asked} mentioned in the provided "
                         f"text? The special magic numbers for {asked} mentioned in the provided text are", values,
                         "niah_multiquery")

    def vt(self, n: int) -> Sample:
        """Variable tracking: a chain of 4 assignments from one number, spread through the text."""
        names = ["".join(self.rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(4)]
        value = str(self.rng.randint(10000, 99999))
        chain = [f" VAR {names[0]} = {value}. "] + [f" VAR {names[i]} = VAR {names[i - 1]}. " for i in range(1, 4)]
        intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        return self.hidden(n, intro, chain, f"\nQuestion: Find all variables that are assigned the value {value} in the "
                           f"text above. Answer: According to the chain(s) of variable assignment in the text above, 4 "
                           f"variables are assigned the value {value}, they are:", names, "vt")

    def cwe(self, n: int) -> Sample:
        """Common words: a numbered list where 10 words occur most often (30 times each where the context allows, as
        RULER's) and the others 3 times."""
        words = self.rng.sample(self.words, len(self.words))
        common, rare = words[:10], words[10:]
        intro = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n"
        trial = " ".join(f"{100 + i}. {w}" for i, w in enumerate(words[:50]))
        n_items = int((n - self.count(intro)) * 50 / self.count(trial))
        freq = max(4, min(30, n_items // 20))  # the common words take about half of the list
        items = [w for w in common for _ in range(freq)]
        items += [w for w in rare[: max(0, n_items - len(items)) // 3] for _ in range(3)]
        self.rng.shuffle(items)
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return Sample("cwe", intro + listing, "\nQuestion: What are the 10 most common words in the above list? "
                      "Answer: The top 10 words that appear most often in the list are:", common)

    def fwe(self, n: int) -> Sample:
        """Frequent words: coded words drawn from a Zipf distribution; the three most frequent are asked for."""
        vocab = ["".join(self.rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) for _ in range(200)]
        weights = [1 / (r + 1) ** 1.5 for r in range(len(vocab))]
        intro = "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words.\n"
        per_word = self.count(" abcdef")
        drawn = self.rng.choices(vocab, weights, k=max(1, (n - self.count(intro)) // per_word))
        top = [w for w, _ in Counter(drawn).most_common(3)]
        return Sample("fwe", intro + " ".join(drawn), "\nQuestion: Do not provide any explanation. Please ignore the "
                      "dots '....'. What are the three most frequently appeared words in the above coded text? "
                      "Answer: According to the coded text above, the three most frequently appeared words are:", top)

    def qa(self, n: int) -> Sample:
        """Questions over the real text itself (no QA dataset ships with Debian or the package index): which words
        follow a quoted passage of the context. The passage occurs once in the context and its answer is the next
        QA_ANSWER_WORDS words of the same sentence, so only the context's own cells answer it."""
        intro = "Read the following text carefully. I will ask you about its exact wording afterwards.\n\n"
        hay = self.haystack(n - self.count(intro))
        context = intro + " ".join(hay)
        runs = []  # (sentence, first word) of every quote + answer of plain words, where the quote occurs once
        n_words = QA_QUOTE_WORDS + QA_ANSWER_WORDS
        for si, sentence in enumerate(hay):
            words = sentence.split(" ")
            for k in range(len(words) - n_words + 1):
                run = words[k : k + n_words]
                if all(re.fullmatch(r"[A-Za-z]+", w) for w in run) and context.count(" ".join(run[:QA_QUOTE_WORDS])) == 1:
                    runs.append((si, k))
        if not runs:
            raise ValueError("the text has no passage of plain words to quote: pass a longer English text (--text)")
        si, k = self.rng.choice(runs)
        words = hay[si].split(" ")
        quote = " ".join(words[k : k + QA_QUOTE_WORDS])
        answer = " ".join(words[k + QA_QUOTE_WORDS : k + n_words])
        return Sample("qa", context, f'\nQuestion: In the text above, which words come right after "{quote}"? Answer: '
                      f'In the text above, "{quote}" is followed by "', [answer])

    def sample(self, task: str, context_tokens: int) -> Sample:
        return getattr(self, task)(context_tokens)


def samples(text: str, count: Callable[[str], int], tasks: Sequence[str], context_tokens: int, n: int,
            seed: int = 0) -> list[Sample]:
    """n samples of each task, the same for a given (text, task, context, seed) whatever else runs: a run of some of
    the tasks draws the samples a run of all of them does."""
    out = []
    for task in tasks:
        gen = Generator(text, count, seed * 1000 + context_tokens * 10 + TASKS.index(task))
        out += [gen.sample(task, context_tokens) for _ in range(n)]
    return out


# --- the branching, in a process that imported pyllmkv ---


def branch_answers(llm, context: list[int], question: list[int], n_answer: int, branches: list[tuple[str, str, int]],
                   window: int, pool_kernel: int, probe: Sequence[int] = (), renumber: bool = False,
                   on_first_logits: Callable | None = None) -> list[list[int]]:
    """Greedy answers of `question` after `context` for each (setting, policy, budget) in `branches` (policy FULL:
    no eviction). `llm` is a llama_cpp.Llama on the patched library whose context holds context + probe + question +
    n_answer + n_batch cells. The context is prefilled once (the hook enabled, so its last `window` queries are
    captured), saved, and loaded again for each branch; the repeat setting's `probe` (repeat_probe) is decoded after
    it once, saved too, and serves every repeat branch. With `renumber` (EvictConfig.renumber), what follows each
    branch's eviction reads the kept cells renumbered from 0. `on_first_logits(branch, logits)` sees the logits the
    answer's first token is drawn from (tests)."""
    import dataclasses

    from .. import _lib
    from .._lib import EvictConfig, llama_cpp
    from ..session import Session, truncate

    ctx = llm._ctx.ctx
    eog = llm._model.token_eos()

    def config(policy: str, budget: int) -> EvictConfig:
        return EvictConfig.for_cells(budget, policy=policy, window=window, pool_kernel=pool_kernel, prompt_tail=False,
                                     renumber=renumber)

    def close_gaps(plain: Session) -> None:
        # a chat's Session renumbers itself (config.renumber); the others evicted outside a Session's decode
        if renumber:
            plain.positions.close_gaps(plain.n_tokens)

    def session_after(state, kv: Optional[bytes], n_tokens: int) -> Session:
        llm.load_state(state)
        if kv is not None:  # the hook's side data, with a window of the same size as the one it was saved with
            _lib.set_seq_data(ctx, kv)
        plain = Session(llm, None)  # decodes without evicting to fit: the one eviction is the branch's
        plain.n_tokens = n_tokens  # the next position follows: nothing was renumbered
        return plain

    prefill = Session(llm, config("snapkv", llm.n_ctx() - llm.n_batch))  # a budget the prompt never reaches
    prefill.decode(context)
    kv = _lib.seq_data(ctx)
    state = llm.save_state()
    # the repeat setting's window: the context's last `window` cells, kept as in the agnostic setting, and the probe
    repeat_window = window + len(probe)
    repeated = None  # (state, seq data) after the probe
    answers = []
    for setting, policy, budget in branches:
        evicting = policy != FULL
        if chat_only(policy) and setting != "chat":
            raise ValueError(f"{policy} scores tokens as they are read: only the chat setting reads the context so")
        if setting.startswith("chat"):
            # a fresh sequence read as the chat reads it: batches, each eviction scored by the prompt's tail, a probe
            # or the tokens' surprisal (the hook stays enabled for the branches after, but nothing asks it to evict)
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            plain = Session(llm, dataclasses.replace(config(policy, budget), prompt_tail=True,
                                                     repeat_probe=setting != "chat"),
                            probe=chat_probe(setting, llm, window, question))
            plain.decode(context)
        elif setting == "repeat" and evicting:
            if repeated is None:
                # captures the probe's queries; nothing is evicted with this budget
                _lib.enable(ctx, EvictConfig(budget=2 * repeat_window, policy="snapkv", window=repeat_window, prompt_tail=False))
                session_after(state, None, len(context)).decode(probe)
                repeated = (llm.save_state(), _lib.seq_data(ctx))
            # the same per-head budget as the agnostic branch's once the probe's cells are gone
            c = config(policy, budget)
            _lib.enable(ctx, dataclasses.replace(c, budget=c.budget + len(probe), window=repeat_window))
            plain = session_after(*repeated, len(context))  # decodes after the probe has left
            _lib.evict(ctx)
            truncate(ctx, len(context))
        else:
            if evicting:
                _lib.enable(ctx, config(policy, budget))
            plain = session_after(state, kv, len(context))
            if evicting and setting == "agnostic":
                _lib.evict(ctx)
        if evicting and setting in ("agnostic", "repeat"):
            close_gaps(plain)
        logits = plain.decode(question)
        if evicting and setting == "aware":
            _lib.evict(ctx)
            close_gaps(plain)
        if on_first_logits:
            on_first_logits((setting, policy, budget), logits)
        answers.append(greedy_answer(plain, logits, n_answer, eog))
    return answers


def chat_only(policy: str) -> bool:
    """Whether the policy scores the tokens as they are read (surprisal), which only the chat setting does: the others
    evict a context prefilled once for every branch."""
    from .._lib import POLICY_INFO

    return policy in POLICY_INFO and POLICY_INFO[policy].token_scores


def chat_probe(setting: str, llm, window: int, question: Sequence[int]):
    """The probe that scores a chat setting's evictions (a pyllmkv.session.Probe), or None for the Session's own: the
    repeat probe with repeat_probe on (chat-repeat), the prompt tail without it (chat)."""
    from ..session import FactsProbe, QuestionProbe

    if setting == "chat-question":
        return QuestionProbe(llm, window, question)
    if setting == "chat-facts":
        return FactsProbe(llm, window)
    return None


def greedy_answer(session, logits, n_answer: int, eog: int) -> list[int]:
    """The greedy answer after `logits` (those of the question's last token), decoded by `session` (a
    pyllmkv.session.Session): at most n_answer tokens, ending at the end of generation `eog`."""
    import numpy as np

    out = [int(np.argmax(logits))]
    while len(out) < n_answer and out[-1] != eog:
        out.append(int(np.argmax(session.decode(out[-1:]))))
    return out


def repeat_probe(tokenize: Callable[[str], list[int]], context: Sequence[int]) -> list[int]:
    """The repeat setting's probe: the chat's (RepeatProbe.PROMPT, KVzip's wording; `tokenize` adds no BOS), then the
    context's tokens without BOS."""
    from ..session import RepeatProbe

    return tokenize(RepeatProbe.PROMPT) + list(context)
