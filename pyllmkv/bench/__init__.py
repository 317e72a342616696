"""`pyllmkv bench`: pyllmkv against stock llama.cpp on one model, side by side in one run.

Every measurement of the speed, needle and perplexity suites runs in a child process of its own (worker.py): stock
jobs load the unpatched build of the same pinned llama.cpp (built beside the patched one, same ggml options), pyllmkv
jobs the patched one, both through llama-cpp-python. Repetitions of the speed suite are interleaved (every
configuration once, then again), so drift on a shared machine falls on all alike. The perturbation suite runs here,
on the patched library's debug API. Results: results.json, results.md and PNG plots in the output folder.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .._lib import POLICIES as _POLICY_IDS
from ..session import gguf_model_int
from . import haystack, ruler
from .grid import FULL, QUICK, TINY, Grid  # noqa: F401  (the grids are bench.FULL, ...)
from .stock import lib_dir as stock_lib_dir

POLICIES = list(_POLICY_IDS)
# streaming (4 sinks + the most recent) is what stock context shift keeps when one eviction takes a cache to its budget
RULER_POLICIES = ["streaming", "knorm", "snapkv", "snapkv-ada", "criticalkv", "criticalkv-ada", "defensivekv", "defensivekv-layer",
                  "surprisal", "defensivekv-surprisal"]
STOCK_FULL, STOCK_SHIFT = "stock full", "stock shift"
SUITES = ["speed", "needle", "ppl", "perturb", "ruler"]
N_KEEP = 4  # stock context shift keeps the first tokens, as llama-cli's --keep
WORKER = Path(__file__).resolve().parent / "worker.py"


@dataclass
class Options:
    model: str
    out: Path
    grid: Grid
    suites: list = field(default_factory=lambda: list(SUITES))
    threads: int = 2
    n_batch: int = 0           # 0: the grid's
    n_gpu_layers: int = 0
    rpc_servers: Optional[str] = None  # HOST:PORT,... the -ngl layers are split across, in every job
    text: Optional[Path] = None
    command: str = ""
    dump_logits: bool = False  # perplexity: keep every job's logits (tests)


def needs_stock(suites) -> bool:
    """Whether these suites run stock llama.cpp beside pyllmkv."""
    return bool(set(suites) & {"speed", "needle", "ppl"})


class Runner:
    """Runs worker jobs in child processes."""

    def __init__(self, opts: Options):
        self.opts = opts
        # the ruler and perturbation suites run pyllmkv alone: only the suites that compare need the stock build
        self.stock_lib = str(stock_lib_dir()) if needs_stock(opts.suites) else None
        self.tmp = Path(tempfile.mkdtemp(prefix="pyllmkv-bench-"))
        self.env = dict(os.environ)
        # the child imports this same pyllmkv
        package_parent = str(Path(__file__).resolve().parent.parent.parent)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, self.env.get("PYTHONPATH")) if p)
        self.n = 0

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def job(self, suite: str, engine: str, tokens, budget: int = 0, policy: str = "", n_ctx: int = 0, **extra) -> dict:
        o = self.opts
        job = dict(suite=suite, engine=engine, tokens=[int(t) for t in tokens], budget=budget, policy=policy, n_ctx=n_ctx,
                   window=o.grid.window, pool_kernel=o.grid.pool_kernel, prompt_tail=o.grid.prompt_tail,
                   renumber=o.grid.renumber, n_batch=o.n_batch, threads=o.threads, n_gpu_layers=o.n_gpu_layers,
                   rpc_servers=o.rpc_servers, model=o.model, stock_lib=self.stock_lib, n_keep=N_KEEP, n_decode=o.grid.n_decode,
                   n_answer=o.grid.n_answer)
        job.update(extra)
        self.n += 1
        path = self.tmp / f"job-{self.n}.json"
        path.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, str(WORKER), str(path)], env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench job {suite}/{engine}/{policy or '-'}/budget {budget} failed "
                               f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(Path(str(path) + ".out").read_text())


def chosen(cfgs: list, policies: Optional[list]) -> list:
    """The configs of stock and of `policies` (None: all)."""
    return [c for c in cfgs if c[0] != "pyllmkv" or policies is None or c[1] in policies]


def configs(grid: Grid, budgets: list, every_policy: bool) -> list[tuple[str, str, int]]:
    """(engine, policy, budget) of a suite: stock full once, then per budget stock shift and the policies (with
    every_policy false: grid.speed_policies, and the others only at the largest budget if grid.other_policies)."""
    out = [("stock", STOCK_FULL, 0)]
    for b in budgets:
        out.append(("stock-shift", STOCK_SHIFT, b))
        for p in POLICIES:
            if every_policy or p in grid.speed_policies or (grid.other_policies and b == max(budgets)):
                out.append(("pyllmkv", p, b))
    return out


def needle_budget(budget: float, context: int) -> int:
    """A needle budget in cells: as given, or for a fraction below 1 that share of the context."""
    return int(budget) if budget >= 1 else int(budget * context)


def budget_label(budget: float) -> str:
    """Cells as given, or a share of the context as the fraction it was written as (0.4: "2/5")."""
    if budget >= 1:
        return str(int(budget))
    share = Fraction(budget).limit_denominator(100)
    return f"{share.numerator}/{share.denominator}"


class Bench:
    def __init__(self, opts: Options, progress: Callable):
        """`progress(label, n_steps)` returns a context manager whose object has update(n)."""
        from .._lib import llama_cpp

        opts.n_batch = opts.n_batch or opts.grid.n_batch
        self.opts, self.progress = opts, progress
        if opts.rpc_servers:  # in this process too, for the suites that run here (perturbation)
            from .. import rpc

            rpc.add_servers(opts.rpc_servers)
        self.runner = Runner(opts)
        self.vocab = llama_cpp.Llama(model_path=opts.model, vocab_only=True, verbose=False)
        self.llama_cpp_version = llama_cpp.__version__
        self.n_ctx_train = gguf_model_int(opts.model, "context_length")
        self.text, self.text_source = haystack.text(opts.text)
        self.hay = self.tokenize(self.text, False)
        self._kv_bytes: dict[int, int] = {}
        self.skipped: list[int] = []  # speed contexts whose full cache would not fit in memory

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.runner.close()

    def tokenize(self, text: str, bos: bool) -> list[int]:
        return self.vocab.tokenize(text.encode(), add_bos=bos, special=False)

    def text_tokens(self, n: int) -> list[int]:
        """n tokens of the text (repeated if it is shorter), after a BOS."""
        bos = self.tokenize("", True)
        reps = -(-(n - len(bos)) // len(self.hay))
        return (bos + self.hay * reps)[:n]

    def stock_kv_bytes(self, n_ctx: int) -> int:
        """KV bytes llama.cpp allocates for n_ctx cells (the patched library's count; allocation is unchanged)."""
        if n_ctx not in self._kv_bytes:
            from .. import _lib
            from .._lib import llama_cpp

            llm = llama_cpp.Llama(model_path=self.opts.model, n_ctx=n_ctx, n_batch=self.opts.n_batch,
                                  n_ubatch=self.opts.n_batch, n_gpu_layers=self.opts.n_gpu_layers, verbose=False)
            self._kv_bytes[n_ctx] = _lib.stats(llm._ctx.ctx)["kv_bytes"]
            llm.close()
        return self._kv_bytes[n_ctx]

    def run_configs(self, suite: str, tokens, cfgs, n_ctx_full: int, **extra) -> list[dict]:
        rows = []
        for engine, policy, budget in cfgs:
            n_ctx = n_ctx_full if engine == "stock" else budget + self.opts.n_batch if engine == "stock-shift" else 0
            r = self.runner.job(suite, engine, tokens, budget, policy, n_ctx, **extra)
            if engine != "pyllmkv":
                r["kv_bytes"] = self.stock_kv_bytes(n_ctx)
            rows.append(dict(engine=engine, policy=policy, budget=budget, **r))
        return rows

    # --- suites ---

    def fits_in_memory(self, n_ctx: int) -> bool:
        """Whether stock llama.cpp's cache of n_ctx cells takes at most half of this machine's memory (estimated from
        a small cache: the allocation grows linearly)."""
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return True
        return self.stock_kv_bytes(1024) * n_ctx / 1024 <= ram / 2

    def speed(self) -> list[dict]:
        g, o = self.opts.grid, self.opts
        cfgs = configs(g, g.speed_budgets, False)
        contexts = [c for c in g.contexts if self.fits_in_memory(c + g.n_decode + o.n_batch)]
        self.skipped = [c for c in g.contexts if c not in contexts]
        runs: dict = {}
        with self.progress("speed", g.repeat * len(contexts) * len(cfgs)) as bar:
            for rep in range(g.repeat):
                for context in contexts:
                    tokens = self.text_tokens(context)
                    for cfg in cfgs:
                        row = self.run_configs("speed", tokens, [cfg], context + g.n_decode + o.n_batch)[0]
                        runs.setdefault((context, cfg), []).append(row)
                        bar.update(1)
        rows = []
        for (context, (engine, policy, budget)), reps in runs.items():
            row = dict(engine=engine, policy=policy, budget=budget, context=context, repeat=len(reps))
            if reps[0].get("n_evictions"):
                for r in reps:
                    r["evict_s"] = r["t_evict_s"] / r["n_evictions"]
            for key in ("prefill_tps", "decode_tps", "peak_rss_mib") + (("evict_s",) if "evict_s" in reps[0] else ()):
                vals = [r[key] for r in reps]
                row[key] = statistics.median(vals)
                row[key + "_min"], row[key + "_max"] = min(vals), max(vals)
            for key in ("kv_bytes", "cells", "n_evictions", "n_shifts", "value_norm_kernel", "window_attn_kernel", "vram_mib"):
                if key in reps[0]:
                    row[key] = reps[0][key]
            rows.append(row)
        full = {r["context"]: r for r in rows if r["policy"] == STOCK_FULL}
        for r in rows:
            r["decode_vs_stock"] = r["decode_tps"] / full[r["context"]]["decode_tps"]
            r["prefill_vs_stock"] = r["prefill_tps"] / full[r["context"]]["prefill_tps"]
            r["kv_vs_stock"] = r["kv_bytes"] / full[r["context"]]["kv_bytes"]
        # eviction's own price: against the bounded cache stock llama.cpp offers at the same budget
        shift = {(r["context"], r["budget"]): r for r in rows if r["policy"] == STOCK_SHIFT}
        for r in rows:
            if r["engine"] == "pyllmkv" and (r["context"], r["budget"]) in shift:
                s = shift[(r["context"], r["budget"])]
                r["decode_vs_shift"] = r["decode_tps"] / s["decode_tps"]
                r["prefill_vs_shift"] = r["prefill_tps"] / s["prefill_tps"]
        return rows

    def needle(self) -> list[dict]:
        g = self.opts.grid
        rng = np.random.default_rng(0)
        # drawn in this order, the first key of each depth is the same whatever the number of keys or contexts
        keys = [[str(rng.integers(10000, 100000)) for _ in g.needle_depths] for _ in range(g.needle_keys)]
        cells = [(c, d, k[i]) for c in g.needle_contexts for i, d in enumerate(g.needle_depths) for k in keys]
        cfgs = chosen(configs(g, g.needle_budgets, True), g.needle_policies)
        rows = []
        with self.progress("needle", len(cells) * len(cfgs)) as bar:
            for context, depth, key in cells:
                prompt = haystack.needle_prompt(self.tokenize, self.hay, context, depth, key)
                for engine, policy, b in cfgs:
                    cfg = (engine, policy, needle_budget(b, context) if b else 0)
                    whole = engine == "pyllmkv" and g.needle_prefill == "whole"
                    extra = {"n_batch": len(prompt), "settle_prompt": True} if whole else {"settle_prompt": False}
                    r = self.run_configs("needle", prompt, [cfg], context + g.n_answer + self.opts.n_batch, **extra)[0]
                    answer = self.vocab.detokenize(r.pop("answer_tokens")).decode("utf-8", "replace")
                    rows.append(dict(r, context=context, depth=depth, key=key, answer=answer, budget_label=budget_label(b) if b else "",
                                     correct=haystack.found(answer, key)))
                    bar.update(1)
        return rows

    def ppl(self) -> list[dict]:
        g, o = self.opts.grid, self.opts
        tokens = self.text_tokens(g.ppl_tokens)
        cfgs = chosen(configs(g, g.ppl_budgets, True), g.ppl_policies)
        rows = []
        with self.progress("perplexity", len(cfgs)) as bar:
            for i, cfg in enumerate(cfgs):
                extra = {"dump_logits": str(o.out / f"ppl-logits-{i}.npy")} if o.dump_logits else {}
                # no prompt tail: each batch's logits would depend on evictions its own later tokens chose
                r = self.run_configs("ppl", tokens, [cfg], len(tokens) + o.n_batch, prompt_tail=False, **extra)[0]
                rows.append(dict(r, tokens=len(tokens), **({"logits": extra["dump_logits"]} if extra else {})))
                bar.update(1)
        full = next(r["ppl"] for r in rows if r["policy"] == STOCK_FULL)
        for r in rows:
            r["ppl_vs_full"] = r["ppl"] / full
        return rows

    def ruler(self) -> list[dict]:
        g = self.opts.grid
        tasks = g.ruler_tasks or ruler.TASKS
        policies = g.ruler_policies or RULER_POLICIES
        count = lambda text: len(self.tokenize(text, False))  # noqa: E731
        bos = self.tokenize("", True)
        rows = []
        per_context = {c: ruler.samples(self.text, count, tasks, c, g.ruler_samples, g.ruler_seed) for c in g.ruler_contexts}
        with self.progress("ruler", sum(len(s) for s in per_context.values())) as bar:
            for context, samples in per_context.items():
                # the full cache evicts nothing: one branch serves both settings
                branches = [("agnostic", ruler.FULL, 0)] + [(s, p, needle_budget(b, context)) for s in g.ruler_settings
                                                             for p in policies for b in g.ruler_budgets
                                                             if s == "chat" or not ruler.chat_only(p)]
                labels = {needle_budget(b, context): budget_label(b) for b in g.ruler_budgets}
                for i, sample in enumerate(samples):
                    tokens = self.tokenize(sample.context, False)
                    probe = ruler.repeat_probe(lambda t: self.tokenize(t, False), tokens) \
                        if "repeat" in g.ruler_settings else []
                    r = self.runner.job("ruler", "pyllmkv", bos + tokens,
                                        question=self.tokenize(sample.question, False), n_answer=sample.n_answer,
                                        branches=branches, probe=probe)
                    for (setting, policy, budget), tokens in zip(branches, r["answers"]):
                        answer = self.vocab.detokenize(tokens).decode("utf-8", "replace")
                        row = dict(context=context, task=sample.task, sample=i, policy=policy, budget=budget,
                                   budget_label=labels.get(budget, ""), answer=answer, expected=sample.expected,
                                   score=ruler.string_match_all(answer, sample.expected))
                        for s in (g.ruler_settings if policy == ruler.FULL else [setting]):
                            rows.append(dict(row, setting=s))
                    bar.update(1)
        return rows

    def perturb(self) -> dict:
        from .perturb import perturbation, summary

        g, o = self.opts.grid, self.opts
        tokens = self.text_tokens(g.perturb_context + g.window)  # the context, then the tokens that follow it
        with self.progress("perturbation", 2) as bar:
            result = perturbation(o.model, tokens, g.perturb_budget, g.window, o.n_batch, o.threads, o.n_gpu_layers,
                                  progress=bar.update, pool_kernel=g.pool_kernel)
        result["summary"] = summary(result)
        result["future_summary"] = summary(result["future"])
        return result


def run(opts: Options, progress: Callable) -> dict:
    """Runs the suites in opts.suites; writes results.json, results.md and the plots into opts.out."""
    opts.out.mkdir(parents=True, exist_ok=True)
    with Bench(opts, progress) as bench:
        return _run(opts, bench)


def _run(opts: Options, bench: Bench) -> dict:
    from . import report

    results = {"meta": {"model": str(opts.model), "command": opts.command, "threads": opts.threads,
                        "n_batch": opts.n_batch, "n_gpu_layers": opts.n_gpu_layers, "rpc_servers": opts.rpc_servers, "grid": asdict(opts.grid),
                        "text": bench.text_source, "n_ctx_train": bench.n_ctx_train, "stock_lib": bench.runner.stock_lib,
                        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "platform": sys.platform,
                        "llama_cpp_python": bench.llama_cpp_version}}
    for suite in opts.suites:
        t0 = time.perf_counter()
        results[suite] = getattr(bench, suite)()
        results["meta"][f"{suite}_seconds"] = time.perf_counter() - t0
    results["meta"]["speed_contexts_skipped"] = bench.skipped
    (opts.out / "results.json").write_text(json.dumps(results, indent=1))
    report.write(results, opts.out)
    return results
