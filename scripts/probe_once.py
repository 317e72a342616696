#!/usr/bin/env python3
"""The ruler suite's samples with one eviction scored by the repeat probe as the chat runs it (session.RepeatProbe:
PIECE tokens at a time, folded every `window` tokens), after the whole context was prefilled: the probe of the
`repeat` setting cut into the chat's pieces, without the chat's evictions between batches. Prints each answer's
score and the mean.

    python scripts/probe_once.py MODEL --context 2048 --budget 0.2 [--policy defensivekv-layer] [-t 2]
"""

from __future__ import annotations

import argparse

import numpy as np

from pyllmkv import _lib, models
from pyllmkv._lib import EvictConfig, llama_cpp
from pyllmkv.bench import haystack, needle_budget, ruler
from pyllmkv.session import RepeatProbe, Session


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a GGUF path or a pyllmkv.models name")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--budget", type=float, default=0.2, help="share of the context kept, the window included")
    ap.add_argument("--policy", default="defensivekv-layer")
    ap.add_argument("--samples", type=int, default=1, help="samples per task")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()

    path = str(models.MODELS[args.model].path()) if args.model in models.MODELS else args.model
    vocab = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)

    def tokenize(text: str, bos: bool = False) -> list[int]:
        return vocab.tokenize(text.encode(), add_bos=bos, special=False)

    text, _ = haystack.text(None)
    samples = ruler.samples(text, lambda t: len(tokenize(t)), ruler.TASKS, args.context, args.samples)
    config = EvictConfig.for_cells(needle_budget(args.budget, args.context), policy=args.policy, prompt_tail=False)
    scores = []
    for s in samples:
        context, question = tokenize("", True) + tokenize(s.context), tokenize(s.question)
        llm = llama_cpp.Llama(model_path=path, n_ctx=len(context) + RepeatProbe.ROOM + len(question) + s.n_answer,
                              n_batch=512, n_ubatch=512, n_threads=args.threads, n_threads_batch=args.threads,
                              verbose=False)
        _lib.enable(llm._ctx.ctx, config)
        sess = Session(llm)
        sess.decode(context)
        probe = RepeatProbe(llm, config.window)
        probe.follow(1)  # the text after BOS
        probe.pending = context[1:]
        probe.score(sess.ctx, config.window, sess.positions, sess.n_tokens)
        _lib.evict(sess.ctx)
        answer = ruler.greedy_answer(sess, sess.decode(question), s.n_answer, llm.token_eos())
        scores.append(ruler.string_match_all(vocab.detokenize(answer).decode("utf-8", "replace"), s.expected))
        print(f"{s.task}: {100 * scores[-1]:.0f} %", flush=True)
        llm.close()
    print(f"mean {100 * np.mean(scores):.1f} % over {len(scores)} samples ({args.policy}, {config.cells} cells)")


if __name__ == "__main__":
    main()
