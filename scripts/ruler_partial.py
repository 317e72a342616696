#!/usr/bin/env python3
"""The ruler suite's table from the jobs a run finished (its job-N.json and job-N.json.out), for a run stopped before
its end: the same samples, answers and scoring as Bench.ruler, for the samples whose jobs completed (every setting
the run had). Writes partial-rows.json beside the jobs.

    python scripts/ruler_partial.py MODEL JOB_DIR --context 2048 --samples 3 --budgets 0.1,0.2 [--tasks ...] [--seed N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pyllmkv._lib import llama_cpp
from pyllmkv.bench import budget_label, haystack, needle_budget, report, ruler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("jobs", type=Path)
    ap.add_argument("--context", type=int, required=True)
    ap.add_argument("--samples", type=int, required=True, help="samples per task of the run")
    ap.add_argument("--budgets", required=True)
    ap.add_argument("--tasks", default=",".join(ruler.TASKS))
    ap.add_argument("--seed", type=int, default=0, help="the run's --ruler-seed")
    args = ap.parse_args()

    budgets = [float(b) for b in args.budgets.split(",")]
    vocab = llama_cpp.Llama(model_path=args.model, vocab_only=True, verbose=False)
    tok = lambda t, bos: vocab.tokenize(t.encode(), add_bos=bos, special=False)  # noqa: E731
    text, _ = haystack.text(None)
    samples = ruler.samples(text, lambda t: len(tok(t, False)), args.tasks.split(","), args.context, args.samples, args.seed)
    labels = {needle_budget(b, args.context): budget_label(b) for b in budgets}
    rows = []
    jobs = sorted(args.jobs.glob("job-*.json.out"), key=lambda p: int(p.name.split("-")[1].split(".")[0]))
    for i, out in enumerate(jobs):
        job = json.loads(Path(str(out)[:-4]).read_text())
        sample = samples[i]
        assert job["question"] == tok(sample.question, False), f"job {out.name} is not sample {i}"
        settings = list(dict.fromkeys(b[0] for b in job["branches"] if b[1] != ruler.FULL))
        for (setting, policy, budget), tokens in zip(job["branches"], json.loads(out.read_text())["answers"]):
            answer = vocab.detokenize(tokens).decode("utf-8", "replace")
            row = dict(context=args.context, task=sample.task, sample=i % args.samples, policy=policy,
                       budget=budget, budget_label=labels.get(budget, ""), answer=answer, expected=sample.expected,
                       score=ruler.string_match_all(answer, sample.expected))
            # the full cache's one branch serves every setting, as in Bench.ruler
            rows += [dict(row, setting=s) for s in (settings if policy == ruler.FULL else [setting])]
    print(f"{len(jobs)} jobs of {len(samples)}")
    print("\n".join(report.ruler_tables(rows)))
    (args.jobs / "partial-rows.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
