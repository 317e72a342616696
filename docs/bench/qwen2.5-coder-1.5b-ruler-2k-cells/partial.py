"""The ruler suite's table from the jobs a run finished (its job-N.json and job-N.json.out), for a run stopped before
its end: the same samples, answers and scoring as Bench.ruler, for the tasks whose jobs completed."""
import json, sys
from pathlib import Path
from pyllmkv.bench import haystack, ruler, report, needle_budget, budget_label
from pyllmkv._lib import llama_cpp

model, jobdir, n_samples = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
contexts, budgets = [2048], [0.1, 0.2]
vocab = llama_cpp.Llama(model_path=model, vocab_only=True, verbose=False)
tok = lambda t, bos: vocab.tokenize(t.encode(), add_bos=bos, special=False)
text, _ = haystack.text(None)
samples = ruler.samples(text, lambda t: len(tok(t, False)), ruler.TASKS, 2048, n_samples)
rows = []
jobs = sorted(jobdir.glob("job-*.json.out"), key=lambda p: int(p.name.split("-")[1].split(".")[0]))
for i, out in enumerate(jobs):
    job = json.loads(Path(str(out)[:-4]).read_text())
    res = json.loads(out.read_text())
    sample = samples[i]
    assert job["question"] == tok(sample.question, False), f"job {out.name} is not sample {i}"
    branches = [tuple(b) for b in job["branches"]]
    labels = {needle_budget(b, 2048): budget_label(b) for b in budgets}
    for (setting, policy, budget), tokens in zip(branches, res["answers"]):
        answer = vocab.detokenize(tokens).decode("utf-8", "replace")
        rows.append(dict(context=2048, task=sample.task, sample=i % n_samples, policy=policy, budget=budget,
                         budget_label=labels.get(budget, ""), answer=answer, expected=sample.expected,
                         score=ruler.string_match_all(answer, sample.expected), setting="agnostic"))
print(f"{len(jobs)} jobs of {len(samples)}")
print("\n".join(report.ruler_tables(rows)))
json.dump(rows, open(jobdir / "partial-rows.json", "w"))
