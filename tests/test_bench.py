"""`pyllmkv bench` on the tiny model (--tiny grid): every row, valid plots, and its measurements against oracles
(numpy perplexity from the same logits, stock llama.cpp's logits, the tiny model's numpy forward pass)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SUBPROCESS_CWD
from pyllmkv import EvictConfig, _lib, bench, debug
from pyllmkv.bench import haystack, perturb
from pyllmkv.session import Session
from tinymodel import TinyRef


def _no_progress(label, n):
    class Bar:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def update(self, n):
            pass

    return Bar()


@pytest.fixture(scope="module")
def results(tiny_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    opts = bench.Options(model=tiny_path, out=out, grid=bench.TINY, threads=2, dump_logits=True, command="test")
    return bench.run(opts, _no_progress), out


def test_every_row(results):
    res, out = results
    g = bench.TINY
    speed = {(r["context"], r["engine"], r["policy"], r["budget"]) for r in res["speed"]}
    assert speed == {(c,) + cfg for c in g.contexts for cfg in bench.configs(g, g.speed_budgets, False)}
    # every policy at the largest budget, the chosen ones at every budget
    assert {r["policy"] for r in res["speed"]} == set(bench.POLICIES) | {bench.STOCK_FULL, bench.STOCK_SHIFT}
    needle = [(r["context"], r["depth"], r["engine"], r["policy"], r["budget"]) for r in res["needle"]]
    assert sorted(needle) == sorted((c, d, e, p, bench.needle_budget(b, c)) for c in g.needle_contexts
                                    for d in g.needle_depths for e, p, b in bench.configs(g, g.needle_budgets, True))
    assert {r["budget"] for r in res["needle"] if r["budget_label"] == "1/4"} == {c // 4 for c in g.needle_contexts}
    assert {(r["engine"], r["policy"], r["budget"]) for r in res["ppl"]} == set(bench.configs(g, g.ppl_budgets, True))
    p = res["perturb"]
    assert np.asarray(p["criticalkv"]).shape == np.asarray(p["snapkv"]).shape == (2, 4)  # tiny: 2 layers, 4 heads
    assert np.asarray(p["future"]["criticalkv"]).shape == (2, 4) and p["future_summary"]["n_heads"] == 8
    assert json.loads((out / "results.json").read_text())["speed"] == res["speed"]
    md = (out / "results.md").read_text()
    for title in ("## Speed and memory", "## Needle", "## Perplexity", "## Output perturbation"):
        assert title in md


def test_plots_are_png(results):
    import matplotlib.image

    _, out = results
    for name in ("speed.png", "needle.png", "perplexity.png", "perturbation.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(out / name)
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0  # drawn, not blank


def test_bounded_memory_and_stock_shift(results):
    res, _ = results
    n_batch = bench.TINY.n_batch
    for r in res["speed"]:
        if r["engine"] == "pyllmkv":
            cells = EvictConfig(budget=r["budget"], policy=r["policy"], window=bench.TINY.window).cells
            assert r["cells"] <= cells + n_batch, r
            assert r["n_evictions"] > 0 or r["context"] + bench.TINY.n_decode <= cells + n_batch, r
        elif r["engine"] == "stock-shift":
            assert r["cells"] <= r["budget"] + n_batch and r["n_shifts"] > 0, r
        else:
            assert r["cells"] == r["context"] + bench.TINY.n_decode
    # llama.cpp's allocation follows the cells asked for (budget + batch, padded as llama.cpp pads), not the context
    full = next(r for r in res["speed"] if r["policy"] == bench.STOCK_FULL)
    per_cell = full["kv_bytes"] / _padded(full["context"] + bench.TINY.n_decode + n_batch)
    for r in res["speed"]:
        if r["engine"] == "pyllmkv":
            cells = EvictConfig.for_cells(r["budget"], policy=r["policy"], window=bench.TINY.window).cells
            assert cells <= r["budget"] and r["kv_bytes"] == per_cell * _padded(cells + n_batch), r
        elif r["engine"] == "stock-shift":
            assert r["kv_bytes"] == per_cell * _padded(r["budget"] + n_batch), r


def test_needle_whole_prefill_evicts_once_after_the_prompt(tiny_path, tmp_path):
    """--needle-prefill whole: pyllmkv reads the whole prompt, then evicts once down to its cells; stock shift as in
    the chunked mode (its cache cannot hold the prompt)."""
    import dataclasses

    grid = dataclasses.replace(bench.TINY, needle_depths=[0.5], needle_budgets=[64], needle_prefill="whole")
    opts = bench.Options(model=tiny_path, out=tmp_path, grid=grid, suites=["needle"], threads=2, command="test")
    rows = bench.run(opts, _no_progress)["needle"]
    assert len(rows) == 2 + len(bench.POLICIES)
    for r in rows:
        if r["engine"] == "pyllmkv":
            cells = EvictConfig(budget=64, policy=r["policy"], window=grid.window).cells
            assert r["n_evictions"] == 1 and r["cells"] <= cells + grid.n_answer, r
        elif r["engine"] == "stock-shift":
            assert r["n_shifts"] > 0 and r["cells"] <= 64 + grid.n_batch, r
    assert "in one batch, then evicts once" in (tmp_path / "results.md").read_text()


def test_perplexity_and_needle_of_chosen_policies_beside_stock(tiny_path, tmp_path):
    import dataclasses

    grid = dataclasses.replace(bench.TINY, ppl_budgets=[64], ppl_policies=["criticalkv"], needle_budgets=[64],
                               needle_depths=[0.5], needle_policies=["snapkv", "tova"])
    opts = bench.Options(model=tiny_path, out=tmp_path, grid=grid, suites=["ppl", "needle"], threads=2, command="test")
    results = bench.run(opts, _no_progress)
    rows = results["ppl"]
    stock = [("stock", bench.STOCK_FULL, 0), ("stock-shift", bench.STOCK_SHIFT, 64)]
    assert [(r["engine"], r["policy"], r["budget"]) for r in rows] == stock + [("pyllmkv", "criticalkv", 64)]
    assert rows[0]["ppl_vs_full"] == 1.0 and np.isfinite(rows[2]["ppl_vs_full"])
    assert [(r["engine"], r["policy"], r["budget"]) for r in results["needle"]] == \
        stock + [("pyllmkv", "snapkv", 64), ("pyllmkv", "tova", 64)]


def test_needle_keys_are_the_same_at_every_context(tiny_path, tmp_path, results):
    """--needle-keys 2: two prompts per depth, whose keys do not depend on the contexts run beside them; the first
    key of each depth is the one a run with one key draws. The accuracy is over depths and keys."""
    import dataclasses

    from pyllmkv.bench.report import needle_accuracy

    grid = dataclasses.replace(bench.TINY, needle_contexts=[256, 320], needle_budgets=[64], needle_policies=["snapkv"],
                               needle_keys=2)
    opts = bench.Options(model=tiny_path, out=tmp_path, grid=grid, suites=["needle"], threads=2, command="test")
    rows = bench.run(opts, _no_progress)["needle"]
    assert len(rows) == 2 * len(grid.needle_depths) * 2 * 3  # contexts x depths x keys x (stock full, shift, snapkv)
    keys = {c: [(r["depth"], r["key"]) for r in rows if r["context"] == c and r["policy"] == "snapkv"]
            for c in grid.needle_contexts}
    assert keys[256] == keys[320] and len(set(keys[256])) == 2 * len(grid.needle_depths)
    one_key = {r["depth"]: r["key"] for r in results[0]["needle"]}
    assert [k for d, k in keys[256][::2]] == [one_key[d] for d in grid.needle_depths]
    mine = [r["correct"] for r in rows if r["context"] == 320 and r["policy"] == "snapkv"]
    assert needle_accuracy(rows)[("snapkv @64", 320)] == np.mean(mine)
    assert "2 pass keys per depth" in (tmp_path / "results.md").read_text()


def _padded(n_ctx: int) -> int:
    return -(-n_ctx // 256) * 256  # llama.cpp sizes the cache in multiples of 256 cells


def test_perplexity_equals_numpy(results):
    """The bench's perplexity equals one computed here from the logits its job saw, with plain softmax."""
    res, _ = results
    n = res["ppl"][0]["tokens"]
    tokens = None
    for r in res["ppl"]:
        logits = np.load(r["logits"]).astype(np.float64)
        assert logits.shape[0] == n - 1
        if tokens is None:
            # the text's tokens: recover them from the bench (the same tokenizer and text)
            with bench.Bench(bench.Options(model=res["meta"]["model"], out=Path("."), grid=bench.TINY), _no_progress) as b:
                tokens = np.asarray(b.text_tokens(n))
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        ppl = np.exp(-np.mean(np.log(p[np.arange(n - 1), tokens[1:]])))
        assert r["ppl"] == pytest.approx(ppl, rel=1e-7)  # token_nll exponentiates in float32


def test_stock_is_llama_cpp_unpatched_and_equal_without_eviction(results):
    """Stock runs the unpatched library; with a budget the text fits in, pyllmkv's perplexity is stock's, bit for bit."""
    res, _ = results
    lib = Path(res["meta"]["stock_lib"])
    assert not _lib.lib_dir().resolve() == lib.resolve()
    text = b"".join((lib / f).read_bytes() for f in os.listdir(lib) if f.startswith("libllama"))
    assert b"llama_kv_evict_enable" not in text and b"llama_decode" in text
    tokens = [int(t) for t in np.random.default_rng(3).integers(0, 256, 200)]
    with bench.Runner(bench.Options(model=res["meta"]["model"], out=Path("."), grid=bench.TINY, n_batch=32)) as runner:
        stock = runner.job("ppl", "stock", tokens, n_ctx=256)
        fits = runner.job("ppl", "pyllmkv", tokens, budget=256, policy="criticalkv")
        evicted = runner.job("ppl", "pyllmkv", tokens, budget=64, policy="criticalkv")
    assert fits["n_evictions"] == 0 and evicted["n_evictions"] > 0
    assert fits["nll"] == stock["nll"] and evicted["nll"] != stock["nll"]


def test_renumber_reaches_the_jobs(results):
    """--renumber: the batches after an eviction read the kept cells renumbered, so the same evictions score the text
    otherwise."""
    res, _ = results
    tokens = [int(t) for t in np.random.default_rng(3).integers(0, 256, 200)]
    out = {}
    for renumber in (False, True):
        grid = dataclasses.replace(bench.TINY, renumber=renumber)
        with bench.Runner(bench.Options(model=res["meta"]["model"], out=Path("."), grid=grid, n_batch=32)) as runner:
            out[renumber] = runner.job("ppl", "pyllmkv", tokens, budget=64, policy="snapkv")
    assert out[True]["n_evictions"] == out[False]["n_evictions"] > 0
    assert out[True]["nll"] != out[False]["nll"]


@pytest.mark.parametrize("answer,expected", [
    (" 68265. Remember it.", True), ("68265", True), (" is 68265", True), ("\n68265 is the pass key", True),
    (" 6826", False), (" 682655", False), (" 1. 68265", False), (" the key", False), ("", False), (" 68,265", False),
])
def test_needle_scorer(answer, expected):
    assert haystack.found(answer, "68265") is expected


@pytest.mark.parametrize("budget,label", [(0.1, "1/10"), (0.2, "1/5"), (0.25, "1/4"), (0.4, "2/5"), (0.5, "1/2"), (1024, "1024")])
def test_budget_label_is_the_share_given(budget, label):
    assert bench.budget_label(budget) == label


def test_needle_prompt(tiny_path):
    with bench.Bench(bench.Options(model=tiny_path, out=Path("."), grid=bench.TINY), _no_progress) as b:
        needle = b.tokenize(haystack.NEEDLE.format(key="12345"), False)
        for depth in (0, 0.5, 1.0):
            prompt = haystack.needle_prompt(b.tokenize, b.hay, 300, depth, "12345")
            assert len(prompt) == 300
            at = next(i for i in range(len(prompt)) if prompt[i : i + len(needle)] == needle)
            n_hay = 300 - len(needle) - len(b.tokenize(haystack.INTRO, True)) - len(b.tokenize(haystack.QUESTION, False))
            assert at == len(b.tokenize(haystack.INTRO, True)) + round(depth * n_hay)
        with pytest.raises(ValueError, match="needs"):
            haystack.needle_prompt(b.tokenize, b.hay[:10], 300, 0.5, "12345")


def test_captured_queries_equal_numpy(llama_cpp, tiny_path):
    """The queries the perturbation analysis reads (llama_kv_evict_queries) are the model's: the numpy forward pass
    of the tiny model gives the same post-RoPE queries and scale."""
    ref = TinyRef(tiny_path)
    tokens = [int(t) for t in np.random.default_rng(5).integers(0, 256, 100)]
    llm = llama_cpp.Llama(model_path=tiny_path, n_ctx=256, n_batch=64, n_ubatch=64, verbose=False)
    _lib.enable(llm, EvictConfig(budget=64, policy="snapkv", window=16))
    Session(llm, None).decode(tokens)
    trace = ref.trace(tokens)
    for il in range(ref.n_layer):
        pos, q, scale = debug.queries(llm, il)
        assert list(pos) == list(range(84, 100))
        np.testing.assert_allclose(q, trace.layers[il].q[84:].reshape(16, -1), rtol=1e-3, atol=1e-3)
        assert scale == pytest.approx(1 / np.sqrt(ref.head_dim))
    llm.close()


def test_perturbation_zero_when_all_kept_and_attention_reference():
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(3, 8)), rng.normal(size=(10, 8)), rng.normal(size=(10, 8))
    pos, q_pos = np.arange(10), np.array([7, 8, 9])
    out = perturb.attention(q, q_pos, k, v, pos, np.ones(10, bool), 0.5)
    for j in range(3):
        s = np.exp(0.5 * k[: q_pos[j] + 1] @ q[j])
        np.testing.assert_allclose(out[j], (s / s.sum()) @ v[: q_pos[j] + 1])
    keep = np.ones(10, bool)
    keep[[1, 4]] = False
    part = perturb.attention(q, q_pos, k, v, pos, keep, 0.5)
    s = np.exp(0.5 * k[keep] @ q[2])
    np.testing.assert_allclose(part[2], (s / s.sum()) @ v[keep])


def test_perturbation_on_the_next_tokens_equals_numpy(llama_cpp, tiny_path):
    """The next tokens' perturbation against the numpy forward pass of the whole text (its queries, K, V and W_O), the
    cells each head kept taken from an eviction of the context alone."""
    ref = TinyRef(tiny_path, kv_cache_dtype="f16")
    window, budget, n_context = 8, 48, 120
    tokens = [int(t) for t in np.random.default_rng(6).integers(0, 256, n_context + window)]
    res = perturb.perturbation(tiny_path, tokens, budget, window, n_batch=64, threads=1, policies=("criticalkv",))
    llm = llama_cpp.Llama(model_path=tiny_path, n_ctx=n_context + 64, n_batch=64, n_ubatch=64, verbose=False)
    _lib.enable(llm, EvictConfig(budget=budget, policy="criticalkv", window=window))
    Session(llm, None).decode(tokens[:n_context])
    _lib.evict(llm)
    trace = ref.trace(tokens)
    pos, q_pos = np.arange(len(tokens)), np.arange(n_context, len(tokens))
    group, hd = ref.n_head // ref.n_head_kv, ref.head_dim
    for il, layer in enumerate(trace.layers):
        kept = debug.head_positions(llm, il, ref.n_head_kv)
        for h in range(ref.n_head):
            g = h // group
            keep = np.isin(pos, kept[g][kept[g] >= 0]) | (pos >= n_context)
            assert keep[:n_context].sum() < n_context - window, "the eviction removed cells"
            args = (layer.q[n_context:, h], q_pos, layer.k[:, g], layer.v[:, g], pos)
            full = perturb.attention(*args, np.ones(len(pos), bool), 1 / np.sqrt(hd))
            part = perturb.attention(*args, keep, 1 / np.sqrt(hd))
            expected = np.abs((full - part) @ ref.w_o(il)[h * hd : (h + 1) * hd]).sum(axis=1).mean()
            assert res["future"]["criticalkv"][il][h] == pytest.approx(expected, rel=2e-2)
    llm.close()


def test_cli(tiny_path, tmp_path):
    """The command: prints the table, writes the files with the window, pooling kernel, renumbering and -n asked for; refuses --quick
    with --tiny and an even pooling kernel."""
    cmd = [sys.executable, "-m", "pyllmkv", "bench", tiny_path, "--tiny", "--suite", "perturb", "-o", str(tmp_path / "o")]
    proc = subprocess.run(cmd + ["--pool-kernel", "3", "--window", "6", "--renumber", "-n", "5"], cwd=SUBPROCESS_CWD,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "## Output perturbation per head" in proc.stdout
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"results.json", "results.md", "perturbation.png"}
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["perturb"]["pool_kernel"] == results["meta"]["grid"]["pool_kernel"] == 3
    assert results["perturb"]["window"] == results["meta"]["grid"]["window"] == 6
    assert results["meta"]["grid"]["renumber"] and "renumbered from 0 (--renumber)" in proc.stdout
    assert results["meta"]["grid"]["n_decode"] == 5
    proc = subprocess.run(cmd + ["--pool-kernel", "4"], cwd=SUBPROCESS_CWD, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "4 is not an odd number" in proc.stderr
    proc = subprocess.run(cmd + ["--quick"], cwd=SUBPROCESS_CWD, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "choose one of --quick and --tiny" in proc.stderr
    for option in ("--ppl-policies", "--needle-policies"):
        proc = subprocess.run(cmd + [option, "criticalkv,lru"], cwd=SUBPROCESS_CWD, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "unknown policies lru" in proc.stderr
    # without the stock build: the perturbation suite never loads it, the needle suite compares with it
    env = dict(os.environ, PYLLMKV_STOCK_LIB_DIR=str(tmp_path))
    proc = subprocess.run(cmd[:-1] + [str(tmp_path / "p")], cwd=SUBPROCESS_CWD, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    needle = [a if a != "perturb" else "needle" for a in cmd]
    proc = subprocess.run(needle, cwd=SUBPROCESS_CWD, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1 and "stock llama.cpp is not in" in proc.stderr
