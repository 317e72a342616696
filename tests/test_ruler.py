"""bench's ruler suite: the task generators and the scorer on hand-written cases, the branching against a fresh
prefill + eviction + question (the same logits), and the suite's rows in the --tiny grid."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pyllmkv import EvictConfig, _lib, bench
from pyllmkv.bench import haystack, ruler
from pyllmkv.bench.report import bootstrap_ci, ruler_summary
from pyllmkv.session import Session, evict_to_fit, truncate
from test_bench import _no_progress

TEXT = haystack.text()[0]


def count(text: str) -> int:
    return len(text.split())  # words stand in for tokens: the generators only need a monotone count


@pytest.mark.parametrize("answer, expected, score", [
    (" 5114877.\nThe special", ["5114877"], 1.0),
    (" 511487.", ["5114877"], 0.0),
    ("The numbers are 1234567, 7654321 and 1111111.", ["1234567", "7654321", "2222222", "1111111"], 0.75),
    ("they are: ABCDE, fghij", ["ABCDE", "FGHIJ"], 1.0),  # case-insensitive, as RULER's string_match_all
    ("", ["x"], 0.0),
])
def test_string_match_all(answer, expected, score):
    assert ruler.string_match_all(answer, expected) == score


@pytest.mark.parametrize("task", ruler.TASKS)
def test_every_task_holds_its_answer_and_fills_the_context(task):
    sample, = ruler.samples(TEXT, count, [task], 2000, 1)
    assert sample.task == task and sample.expected and sample.n_answer > 0
    for value in sample.expected:
        assert value.lower() in sample.context.lower(), (task, value)
        assert value.lower() not in sample.question.lower() or task in ("niah_single", "niah_multikey")
    assert 0.8 * 2000 <= count(sample.context) <= 1.2 * 2000, count(sample.context)


def test_needles_and_chains_are_where_they_belong():
    s, = ruler.samples(TEXT, count, ["niah_multikey"], 1500, 1)
    # four needles, the asked key's value is one of them and the question names that key
    assert s.context.count("One of the special magic numbers for") == 4
    key = s.question.split("magic number for ")[1].split(" mentioned")[0]
    assert f"One of the special magic numbers for {key} is: {s.expected[0]}." in s.context
    s, = ruler.samples(TEXT, count, ["vt"], 1500, 1)
    names = s.expected
    value = s.question.split("the value ")[1].split(" ")[0]
    assert s.context.index(f"VAR {names[0]} = {value}.") < s.context.index(f"VAR {names[1]} = VAR {names[0]}.") \
        < s.context.index(f"VAR {names[3]} = VAR {names[2]}.")
    s, = ruler.samples(TEXT, count, ["cwe"], 1500, 1)
    listed = s.context.split("\n", 1)[1].split()[1::2]  # "1. word 2. word ...": every second item
    counts = {w: listed.count(w) for w in set(listed)}
    assert len({counts[w] for w in s.expected}) == 1  # the common words occur equally often
    assert min(counts[w] for w in s.expected) > max(c for w, c in counts.items() if w not in s.expected) == 3


def test_qa_asks_for_the_words_after_a_passage_quoted_once():
    for s in ruler.samples(TEXT, count, ["qa"], 1500, 3):
        quote = s.question.split('come right after "')[1].split('"?')[0]
        assert len(quote.split()) == ruler.QA_QUOTE_WORDS and len(s.expected[0].split()) == ruler.QA_ANSWER_WORDS
        assert s.context.count(quote) == 1
        assert f"{quote} {s.expected[0]}" in s.context
        assert s.question.endswith(f'"{quote}" is followed by "')
    with pytest.raises(ValueError, match="no passage of plain words"):
        ruler.Generator("1. 2. 3. " * 400, count, 0).qa(300)


def test_samples_are_deterministic():
    a = ruler.samples(TEXT, count, ruler.TASKS, 1000, 2)
    b = ruler.samples(TEXT, count, ruler.TASKS, 1000, 2)
    assert a == b
    assert ruler.samples(TEXT, count, ["niah_single"], 1000, 2) == a[:2]  # the same whatever else runs
    assert ruler.samples(TEXT, count, ["vt", "fwe"], 1000, 2) == a[8:10] + a[12:14]
    assert a[0] != a[1]
    other = ruler.samples(TEXT, count, ruler.TASKS, 1000, 2, seed=1)
    assert other == ruler.samples(TEXT, count, ruler.TASKS, 1000, 2, seed=1)
    assert not set(s.context for s in other) & set(s.context for s in a)  # another seed, other samples


def test_bootstrap_interval():
    lo, hi = bootstrap_ci([0.0, 1.0] * 50)
    assert lo < 0.5 < hi and hi - lo < 0.25
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)


@pytest.mark.parametrize("policy", ["criticalkv", "snapkv-ada"])
def test_branch_equals_a_fresh_prefill_eviction_and_question(llama_cpp, tiny_path, policy):
    """The first answer logits of each branch (a loaded state, one eviction) equal those of a context that read the
    prompt itself, with the hook enabled with that policy, and evicted once at the same point."""
    rng = np.random.default_rng(1)
    context, question = [int(t) for t in rng.integers(3, 250, 200)], [int(t) for t in rng.integers(3, 250, 12)]
    probe = [int(t) for t in rng.integers(3, 250, 5)] + context  # a prompt, then the context again
    window, kernel, budget = 8, 5, 48
    n_ctx = len(context) + len(probe) + len(question) + 4 + 32

    def llm():
        return llama_cpp.Llama(model_path=tiny_path, n_ctx=n_ctx, n_batch=32, n_ubatch=32, verbose=False)

    branched = {}
    branches = [("agnostic", policy, budget), ("aware", policy, budget), ("repeat", policy, budget),
                ("repeat", policy, budget + 16), ("chat", policy, budget), ("chat-repeat", policy, budget),
                ("chat-question", policy, budget), ("chat-facts", policy, budget), ("chat", "surprisal", budget),
                ("agnostic", ruler.FULL, 0)]
    answers = ruler.branch_answers(llm(), context, question, 4, branches, window, kernel, probe,
                                   on_first_logits=lambda b, logits: branched.__setitem__(b, logits.copy()))
    assert len(answers) == len(branches) and all(1 <= len(a) <= 4 for a in answers)

    for (setting, pol, b), answer in zip(branches, answers):
        fresh = llm()
        ctx = fresh._ctx.ctx
        hook = pol != ruler.FULL
        cells = EvictConfig.for_cells(b, policy=pol, window=window).cells if hook else n_ctx
        config = EvictConfig.for_cells(b, policy=pol, window=window, pool_kernel=kernel, prompt_tail=False) \
            if hook else None
        if setting.startswith("chat"):
            # read in batches inside the budget, as the chat reads a document
            s = Session(fresh, dataclasses.replace(config, prompt_tail=True, repeat_probe=setting != "chat"),
                        probe=ruler.chat_probe(setting, fresh, window, question))
        else:
            if config and setting != "repeat":
                _lib.enable(ctx, config)
            s = Session(fresh, None)
        s.decode(context)
        if setting == "repeat":
            # the probe's queries alone score the context; its cells and the context's last window are kept, the
            # per-head budget is the agnostic one's, then the probe leaves
            _lib.enable(ctx, dataclasses.replace(config, budget=config.budget + len(probe), window=window + len(probe)))
            s.decode(probe)
            _lib.evict(ctx)
            truncate(ctx, len(context))
            s.n_tokens = len(context)
            assert _lib.positions(ctx).max() == len(context) - 1
        if pol != ruler.FULL and setting == "agnostic":
            _lib.evict(ctx)
        if pol != ruler.FULL and setting in ("agnostic", "repeat"):
            assert _lib.stats(ctx)["n_seq_cells"] <= cells
        if setting.startswith("chat") and hook:
            assert _lib.stats(ctx)["n_evictions"] >= 4 and _lib.positions(ctx).max() == len(context) - 1
        logits = s.decode(question)
        np.testing.assert_allclose(branched[(setting, pol, b)], logits, rtol=1e-4, atol=1e-4)
        if pol != ruler.FULL and setting == "aware":
            _lib.evict(ctx)
            assert _lib.stats(ctx)["n_seq_cells"] <= cells
        out = [int(np.argmax(logits))]
        while len(out) < len(answer):
            out.append(int(np.argmax(s.decode([out[-1]]))))
        assert out == answer, (setting, pol)
    # the eviction mattered: the question-agnostic branch's logits differ from the full cache's, and the probe's
    # queries chose other cells than the context's own window did
    assert not np.allclose(branched[("agnostic", policy, budget)], branched[("agnostic", ruler.FULL, 0)], atol=1e-3)
    assert not np.allclose(branched[("agnostic", policy, budget)], branched[("repeat", policy, budget)], atol=1e-3)
    assert not np.allclose(branched[("chat", policy, budget)], branched[("chat-repeat", policy, budget)], atol=1e-3)
    assert not np.allclose(branched[("chat-repeat", policy, budget)], branched[("chat-question", policy, budget)],
                           atol=1e-3)
    assert not np.allclose(branched[("chat-question", policy, budget)], branched[("chat-facts", policy, budget)],
                           atol=1e-3)
    assert not np.allclose(branched[("chat", policy, budget)], branched[("chat", "surprisal", budget)], atol=1e-3)


def test_renumbered_branches_read_the_kept_cells_from_0(llama_cpp, tiny_path):
    """With renumber, each branch answers as if its kept cells were renumbered by hand (compact_positions) right after
    its eviction, and the renumbering changes what the question reads."""
    rng = np.random.default_rng(2)
    context, question = [int(t) for t in rng.integers(3, 250, 200)], [int(t) for t in rng.integers(3, 250, 12)]
    window, kernel, budget, n_answer = 8, 5, 48, 4
    n_ctx = len(context) + len(question) + n_answer + 32

    def llm():
        return llama_cpp.Llama(model_path=tiny_path, n_ctx=n_ctx, n_batch=32, n_ubatch=32, verbose=False)

    branches = [("agnostic", "snapkv", budget), ("aware", "snapkv", budget), ("chat", "criticalkv", budget)]
    logits = {True: {}, False: {}}
    answers = {renumber: ruler.branch_answers(llm(), context, question, n_answer, branches, window, kernel,
                                              renumber=renumber,
                                              on_first_logits=lambda b, x, r=renumber: logits[r].__setitem__(b, x.copy()))
               for renumber in (True, False)}

    for (setting, policy, b), answer in zip(branches, answers[True]):
        fresh = llm()
        ctx = fresh._ctx.ctx
        config = EvictConfig.for_cells(b, policy=policy, window=window, pool_kernel=kernel, prompt_tail=False)
        if setting == "chat":
            s = Session(fresh, dataclasses.replace(config, prompt_tail=True))
        else:
            _lib.enable(ctx, config)
            s = Session(fresh, None)
        s.decode(context)

        def renumber_by_hand():
            s.n_past = _lib.compact_positions(ctx)
            assert _lib.positions(ctx).max() == s.n_past - 1 < len(context) - 1

        if setting == "agnostic":
            _lib.evict(ctx)
        if setting != "aware":
            evict_to_fit(ctx, config.cells, 32, len(question))  # as the chat's Session does before the question
            renumber_by_hand()
        first = s.decode(question)
        np.testing.assert_allclose(logits[True][(setting, policy, b)], first, rtol=1e-4, atol=1e-4)
        if setting == "aware":
            _lib.evict(ctx)
            renumber_by_hand()
        else:
            assert not np.allclose(first, logits[False][(setting, policy, b)], atol=1e-3), setting
        assert ruler.greedy_answer(s, first, n_answer, fresh._model.token_eos()) == answer, setting


def test_suite_in_the_tiny_grid(tiny_path, tmp_path):
    grid = dataclasses.replace(bench.TINY, ruler_policies=["snapkv", "criticalkv-ada", "surprisal"],
                               ruler_settings=ruler.SETTINGS)
    opts = bench.Options(model=tiny_path, out=tmp_path, grid=grid, suites=["ruler"], threads=2, command="test")
    rows = bench.run(opts, _no_progress)["ruler"]
    budget = int(grid.ruler_budgets[0] * grid.ruler_contexts[0])
    want = {(t, s, p, b) for t in grid.ruler_tasks for s in ruler.SETTINGS
            for p, b in [(ruler.FULL, 0), ("snapkv", budget), ("criticalkv-ada", budget)]}
    want |= {(t, "chat", "surprisal", budget) for t in grid.ruler_tasks}  # the chat setting's alone
    assert {(r["task"], r["setting"], r["policy"], r["budget"]) for r in rows} == want
    assert all(0 <= r["score"] <= 1 and r["score"] == ruler.string_match_all(r["answer"], r["expected"]) for r in rows)
    summary = ruler_summary(rows)
    assert {(r["setting"], r["policy"]) for r in summary} == {(s, p) for s in ruler.SETTINGS
                                                            for p in (ruler.FULL, "snapkv", "criticalkv-ada")} \
        | {("chat", "surprisal")}
    md = (tmp_path / "results.md").read_text()
    assert "## Retention" in md and "question-agnostic" in md and "question-aware" in md
    assert (tmp_path / "ruler.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
