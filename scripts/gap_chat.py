"""The chat's gap, as a user meets it: a long document holding several facts is read in one turn, the next turn asks
something unrelated, and the third asks for the facts. With the whole document in the cache the model gives them; the
question is how many each policy keeps at --kv-budget cells, about 1/13 of the document by default.

  python scripts/gap_chat.py [--model qwen2.5-coder-1.5b] [--tokens 13000] [--kv-budget 1024] [--facts 6]
                             [--policies full,defensivekv-layer,surprisal,defensivekv-surprisal] [--seeds 1]
                             [--first-seed 0] [--renumber] [-o OUT.json]
  python scripts/gap_chat.py --from OUT.json [OUT2.json ...]

The document is Debian's licence texts (the bench's text) cut to --tokens, with --facts sentences "The special magic
number for KEY is N." (N of 7 digits) at even depths; the third turn names every key and is scored by how many keys
the greedy answer gives their own number (the first 7-digit number after the key's name, or in the key's place when
the answer names every key before the numbers). The policy `full` reads the same turns with no eviction (the
control). The policy `oracle` is defensivekv-surprisal told the facts before the question: each fact's sentence is
scored above every other token, so it is held whole in every head (what keeping the facts can give at this budget).
Prints one JSON line per run and a table; -o writes every answer, and what the cache holds of each fact's sentence
when the facts are asked for; --from prints the table of such files. The table tells the keys lost with their sentence
evicted in part from those lost with it held whole in every head: what the model read differently.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np

import pyllmkv
from pyllmkv import debug, models
from pyllmkv.bench import haystack
from pyllmkv.chat import Chat, Sampler
from pyllmkv.session import Session, context_size, sliding_window
from pyllmkv.surprisal import WordSurprisal

KEYS = ["lighthouse", "copper", "meadow", "harbor", "violin", "glacier", "lantern", "orchard", "falcon", "marble"]
FACT = "The special magic number for {key} is {value}"  # a full stop ends it in the document
UNRELATED = "Unrelated question: what is a good name for a pet turtle? Answer in one line."
ASK = "Now back to the document. What are the special magic numbers it gives for {keys}? List each key with its number."


def document(tokenize, n_tokens: int, n_facts: int, seed: int) -> tuple[str, dict]:
    """The first n_tokens of the licence texts, from a seed-chosen start, with n_facts sentences at even depths."""
    rng = random.Random(seed)
    text, _ = haystack.text(None)
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    start = rng.randrange(len(paragraphs) // 2)
    facts = {k: str(rng.randrange(10**6, 10**7)) for k in rng.sample(KEYS, n_facts)}
    body, n = [], 0
    for p in paragraphs[start:] + paragraphs[:start]:
        body.append(p)
        n += len(tokenize(p + "\n\n"))
        if n >= n_tokens:
            break
    at = [round((i + 1) * len(body) / (n_facts + 1)) for i in range(n_facts)]
    for i, (key, value) in reversed(list(zip(at, facts.items()))):
        body.insert(i, FACT.format(key=key, value=value) + ".")
    return "\n\n".join(body), facts


class FactsFirst(WordSurprisal):
    """Word surprisal, with the tokens of each fact's sentence (and the one after it, which holds the full stop)
    scored above every other: the oracle, while the sentences fit in the policy's given share. A sentence split between
    two batches is found whole with the second, while its first part is still among the window's cells, which every
    eviction keeps."""

    def __init__(self, llm, window: int, sentences: list):
        super().__init__(llm, window)
        self.sentences = sentences  # token runs
        self.tokens: list = []
        self.positions: list = []

    def read(self, ctx, n_tokens: int, position: int, batch) -> np.ndarray:
        surprisal = super().read(ctx, n_tokens, position, batch)
        del self.tokens[n_tokens:], self.positions[n_tokens:]
        self.tokens += list(batch)
        self.positions += range(position, position + len(batch))
        first = max(n_tokens - self.window - max(map(len, self.sentences)), 0)
        facts = [p for run in self.sentences for i in range(first, len(self.tokens) - len(run) + 1)
                 if self.tokens[i : i + len(run)] == run for p in self.positions[i : i + len(run) + 1]]
        if facts:
            pyllmkv._lib.set_token_scores(ctx, np.array(facts), np.full(len(facts), 1e9, dtype=np.float32), self.seq_id)
        return surprisal


def oracle(session: Session, facts: dict, tokenize) -> Session:
    """session, its surprisal reader replaced by FactsFirst over the facts' sentences (the policy `oracle`)."""
    sentences = [tokenize(FACT.format(key=k, value=v)) for k, v in facts.items()]
    session._surprisal = FactsFirst(session.llm, session.config.window, sentences)
    return session


def find(history: list, run: list) -> int:
    """Where the token run first occurs in history."""
    return next(i for i in range(len(history)) if history[i : i + len(run)] == run)


def paired(answer: str, facts: dict) -> list:
    """The keys the answer gives their own number: the first 7-digit number after the key's name, or, when the keys are
    all named before the numbers ("A, B and C are 1, 2 and 3 respectively"), the number in the key's place."""
    at = {k: m.start() for k in facts if (m := re.search(re.escape(k), answer, flags=re.I))}
    numbers = [(m.start(), m.group()) for m in re.finditer(r"(?<!\d)\d{7}(?!\d)", answer)]
    if len(at) > 1 and len(numbers) > 1 and max(at.values()) < numbers[0][0]:
        given = dict(zip(sorted(at, key=at.get), (n for _, n in numbers)))
    else:
        given = {k: next((n for p, n in numbers if p > a), None) for k, a in at.items()}
    return [k for k, v in facts.items() if given.get(k) == v]


def holders(ctx) -> tuple[Counter, int]:
    """How many KV heads, over all layers, hold each position; and how many there are."""
    model = pyllmkv.llama_cpp.llama_get_model(ctx)
    n_layer, n_kv = pyllmkv.llama_cpp.llama_model_n_layer(model), pyllmkv.llama_cpp.llama_model_n_head_kv(model)
    rows = (row for il in range(n_layer) for row in debug.head_positions(ctx, il, n_kv))
    count = Counter(p for row in rows for p in set(row.tolist()))
    return count, n_layer * n_kv


def held(count: Counter, n_heads: int, history: list, facts: dict, tokenize, detokenize) -> dict:
    """Each fact's sentence as the cache holds it (count, n_heads: holders()): [token] held by every layer's KV heads,
    {token} by some, _ by none. Tells a fact evicted from one held whose key and number the model no longer pairs."""
    out = {}
    for key in facts:
        run = tokenize(f" {key}")
        at = find(history, run)
        marks = []
        for p in range(max(at - 6, 0), min(at + len(run) + 12, len(history))):
            piece = detokenize([history[p]]).decode("utf-8", "replace").replace("\n", "\\n")
            marks.append(f"[{piece}]" if count[p] == n_heads else f"{{{piece}}}" if count[p] else "_")
        out[key] = "".join(marks)
    return out


def whole(count: Counter, n_heads: int, history: list, facts: dict, tokenize) -> dict:
    """Whether each fact's sentence, and the token after it (its full stop), is held by every layer's KV heads."""
    out = {}
    for key, value in facts.items():
        run = tokenize(FACT.format(key=key, value=value))
        at = find(history, run)
        out[key] = all(count[p] == n_heads for p in range(at, at + len(run) + 1))
    return out


def converse(session: Session, doc: str, facts: dict, tokenize, detokenize) -> dict:
    """The three turns. A session that renumbers (EvictConfig.renumber) does so as the first answer begins, after which
    positions no longer say which token a cell holds: what its cache holds of each fact is read before that."""
    chat = Chat(session, Sampler(temp=0))
    chat.reset()
    renumber = session.config is not None and session.config.renumber
    t0 = time.perf_counter()
    turns = []
    for text, max_tokens in ((f"Read this document.\n\n{doc}", 48), (UNRELATED, 48),
                             (ASK.format(keys=", ".join(facts)), 160)):
        answer = chat.send(text, max_tokens=max_tokens)
        first = next(answer, "")  # the prompt is decoded, the first answer token not yet
        if renumber and not turns:
            count, n_heads = holders(session.ctx)
            history = list(chat.history)
        turns.append(first + "".join(answer))
    seconds = time.perf_counter() - t0
    row = {"turns": turns, "paired": paired(turns[-1], facts), "n_facts": len(facts),
           "tokens": len(chat.history), "seconds": seconds}
    if session.config is None:
        return dict(row, held=None, evictions=0, cells=len(chat.history))
    if not renumber:
        count, n_heads = holders(session.ctx)
        history = chat.history
    stats = pyllmkv._lib.stats(session.ctx)
    return dict(row, held=held(count, n_heads, history, facts, tokenize, detokenize),
                whole=whole(count, n_heads, history, facts, tokenize), evictions=stats["n_evictions"],
                cells=stats["n_seq_cells"], renumbered=renumber)


def table(rows: list) -> str:
    """Per policy: keys paired, fact sentences held whole, and the keys lost although their sentence was held whole
    (what the model read differently, not what the cache evicted); '-' where a run predates the whole-sentence count."""
    lines = ["| policy | cells | documents | keys given their own number | fact sentences held whole "
             "| keys lost with their sentence held whole |", "|---|---|---|---|---|---|"]
    for policy in dict.fromkeys(r["policy"] for r in rows):
        sel = [r for r in rows if r["policy"] == policy]
        n_facts = sum(len(r["facts"]) for r in sel)
        keys = [set(paired(r["turns"][-1], r["facts"])) for r in sel]
        wholes = [r.get("whole") or (dict.fromkeys(r["facts"], True) if policy == "full" else None) for r in sel]
        if None not in wholes:
            sentences = f"{sum(sum(w.values()) for w in wholes)}/{n_facts}"
            lost = str(sum(w and k not in p for ws, p in zip(wholes, keys) for k, w in ws.items()))
        else:
            sentences = lost = "-"
        cells = sel[0]["cells"] if policy == "full" else sel[0]["kv_budget"]
        lines.append(f"| {policy} | {cells} | {len(sel)} | {sum(map(len, keys))}/{n_facts} | {sentences} | {lost} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--tokens", type=int, default=13000, help="tokens of the document")
    ap.add_argument("--kv-budget", type=int, default=1024, help="cells each policy keeps")
    ap.add_argument("--facts", type=int, default=6)
    ap.add_argument("--policies", default="full,defensivekv-layer,surprisal,defensivekv-surprisal",
                    help="full: the whole conversation cached, no eviction (the control); oracle: the facts first")
    ap.add_argument("--seeds", type=int, default=1, help="documents (start and facts drawn from seeds --first-seed..)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--renumber", action="store_true",
                    help="EvictConfig.renumber: a turn that follows an eviction first renumbers the kept cells from 0")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-o", "--out", type=Path, default=None)
    ap.add_argument("--from", dest="runs", type=Path, nargs="+",
                    help="print the table of these -o files instead of running")
    args = ap.parse_args()
    if args.runs:
        print(table([r for f in args.runs for r in json.loads(f.read_text())]))
        return
    path = str(models.MODELS[args.model].path()) if args.model in models.MODELS else args.model
    vocab = pyllmkv.llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    tokenize = lambda t: vocab.tokenize(t.encode(), add_bos=False, special=False)  # noqa: E731
    rows = []
    policies = args.policies.split(",")
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        doc, facts = document(tokenize, args.tokens, args.facts, seed)
        for policy in policies:
            base = "defensivekv-surprisal" if policy == "oracle" else policy
            config = None if policy == "full" else pyllmkv.EvictConfig.for_cells(args.kv_budget, policy=base,
                                                                                  renumber=args.renumber)
            cells = args.tokens + 1024 if config is None else config.cells
            llm = pyllmkv.llama_cpp.Llama(model_path=path, n_ctx=context_size(sliding_window(path), cells, 512),
                                          n_batch=512, n_ubatch=512, n_threads=args.threads,
                                          n_threads_batch=args.threads, verbose=False)
            session = oracle(Session(llm, config), facts, tokenize) if policy == "oracle" else Session(llm, config)
            r = converse(session, doc, facts, tokenize, vocab.detokenize)
            r.update(seed=seed, policy=policy, kv_budget=None if config is None else args.kv_budget, facts=facts)
            print(json.dumps(r), flush=True)
            rows.append(r)
            llm.close()
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
