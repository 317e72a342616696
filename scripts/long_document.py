"""Which model and sampling should `pyllmkv chat` default to (issue 24): each packaged chat model reads a long document
(Debian's Apache-2.0 text, about 2,300 tokens) and one question through `pyllmkv.chat.Chat`, with the chat's default
cache (--kv-budget 1024, the default policy) and with the whole document in the cache (the control), and answers it
greedily and at the chat's default sampling over several seeds (docs/bench/long-document-chat).

  python scripts/long_document.py [--models smollm2-135m,qwen2.5-coder-1.5b] [--seeds 3] [--budgets 1024,4096] [-o OUT.json]

Each answer is scored by string match of its expected values (case-insensitive unless a value has upper case: the
file named NOTICE, not the question's "notices") and checked for looping: a line or an 8-word run repeated three times,
or the token limit reached. Prints one JSON line per answer and a table per model, budget and sampling; -o writes every
answer.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import pyllmkv
from pyllmkv import models
from pyllmkv.chat import Chat, Sampler
from pyllmkv.session import Session, context_size, sliding_window

DOCUMENT = Path("/usr/share/common-licenses/Apache-2.0")
QUESTIONS = [  # (question, expected values, all of which the answer must hold; case-sensitive where upper case)
    ("In which month and year was this license published?", ["january", "2004"]),
    ("What is the name of the text file through which a Work may carry attribution notices?", ["NOTICE"]),
    ("Summarize this license in two sentences.", ["licen"]),
]
MAX_TOKENS = 200


def correct(answer: str, expected: list[str]) -> bool:
    return all(e in answer if e != e.lower() else e in answer.lower() for e in expected)


def looped(answer: str, n_tokens: int) -> bool:
    lines = [l.strip() for l in answer.splitlines() if l.strip()]
    if any(lines.count(l) >= 3 for l in lines):
        return True
    words = re.findall(r"\w+", answer.lower())
    runs = [" ".join(words[i:i + 8]) for i in range(len(words) - 7)]
    return any(runs.count(r) >= 3 for r in set(runs)) or n_tokens >= MAX_TOKENS


def ask(session: Session, question: str, temp: float, seed: int) -> dict:
    chat = Chat(session, Sampler(temp=temp, seed=seed))
    chat.reset()  # the cache and the hook's state as a new chat finds them
    evictions = pyllmkv._lib.stats(session.ctx)["n_evictions"]
    t0 = time.perf_counter()
    pieces = list(chat.send(DOCUMENT.read_text() + "\n\n" + question, max_tokens=MAX_TOKENS))
    answer = "".join(pieces)
    return {"answer": answer, "n_tokens": len(pieces), "seconds": time.perf_counter() - t0,
            "prompt_tokens": len(chat.history) - len(pieces), "n_evictions": pyllmkv._lib.stats(session.ctx)["n_evictions"] - evictions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-1.5b")
    ap.add_argument("--seeds", type=int, default=3, help="sampled answers per question at the chat's default --temp")
    ap.add_argument("--budgets", default="1024,4096", help="cells, comma-separated (4096 holds the whole document: the control)")
    ap.add_argument("--policy", default=pyllmkv.EvictConfig.policy, choices=list(pyllmkv.POLICIES))
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-o", "--out", type=Path, default=None)
    args = ap.parse_args()
    samplings = [(0.0, 0)] + [(0.8, seed) for seed in range(1, args.seeds + 1)]
    rows = []
    budgets = [int(b) for b in args.budgets.split(",")]
    for name in args.models.split(","):
        path = str(models.MODELS[name].path())
        for budget in budgets:
            config = pyllmkv.EvictConfig.for_cells(budget, policy=args.policy)
            llm = pyllmkv.llama_cpp.Llama(model_path=path, n_ctx=context_size(sliding_window(path), config.cells, 512),
                                          n_batch=512, n_ubatch=512, n_threads=args.threads,
                                          n_threads_batch=args.threads, verbose=False)
            session = Session(llm, config)
            for question, expected in QUESTIONS:
                for temp, seed in samplings:
                    r = ask(session, question, temp, seed)
                    r.update(model=name, budget=budget, question=question, temp=temp, seed=seed, policy=config.policy,
                             correct=correct(r["answer"], expected), looped=looped(r["answer"], r["n_tokens"]))
                    print(json.dumps(r), flush=True)
                    rows.append(r)
            llm.close()
    print("\n| model | cells | sampling | facts right | summary right | looped | tokens per answer (median) |\n"
          "|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for budget in budgets:
            for label, pick in (("greedy", lambda r: r["temp"] == 0), ("--temp 0.8", lambda r: r["temp"] > 0)):
                sel = [r for r in rows if r["model"] == name and r["budget"] == budget and pick(r)]
                facts = [r for r in sel if r["question"] != QUESTIONS[-1][0]]
                summary = [r for r in sel if r["question"] == QUESTIONS[-1][0]]
                tokens = sorted(r["n_tokens"] for r in sel)
                print(f"| {name} | {budget} | {label} | {sum(r['correct'] for r in facts)}/{len(facts)} "
                      f"| {sum(r['correct'] for r in summary)}/{len(summary)} | {sum(r['looped'] for r in sel)}/{len(sel)} "
                      f"| {tokens[len(tokens) // 2]} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
