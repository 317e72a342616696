"""`pyllmkv bench`: pyllmkv against stock llama.cpp, side by side."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import click

from . import options as o
from .. import models
from .._lib import POLICIES, EvictConfig
from ..bench import RULER_POLICIES, SUITES
from ..bench.ruler import SETTINGS as RULER_SETTINGS, TASKS as RULER_TASKS


@click.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--quick", is_flag=True, help="a reduced grid: under 10 minutes on 2 cores with SmolLM2-135M")
@click.option("--tiny", is_flag=True, help="the smallest grid, for the tiny test model (seconds)")
@click.option("--suite", "suites", multiple=True, type=click.Choice(SUITES),
              help="run only these suites (repeatable) [default: all]")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="output folder [default: bench-results/<timestamp>]")
@click.option("--text", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="English text for the needle haystack and perplexity [default: Debian's licence texts]")
@click.option("--contexts", callback=o.int_list, help="speed: prompt lengths, comma-separated [default: the grid's]")
@click.option("--speed-budgets", callback=o.int_list, help="speed: budgets [default: the grid's]")
@click.option("--speed-policies", callback=o.policy_list,
              help="speed: only these policies, comma-separated [default: criticalkv-ada,snapkv at every budget, the others at the largest]")
@click.option("--repeat", type=int, default=None, help="speed: interleaved repetitions [default: the grid's]")
@click.option("-n", "--n-predict", "n_decode", type=click.IntRange(min=1), default=None,
              help="speed: tokens decoded greedily after the prompt [default: the grid's, 64]")
@click.option("--needle-contexts", callback=o.int_list, help="needle: prompt lengths [default: the grid's]")
@click.option("--needle-budgets", callback=o.float_list, help="needle: budgets, in cells or below 1 a share of the context")
@click.option("--needle-policies", callback=o.policy_list,
              help="needle: only these policies, comma-separated, beside stock full and shift [default: all]")
@click.option("--needle-prefill", type=click.Choice(["chunked", "whole"]), default=None,
              help="needle: the prompt in batches of -b, evicting between them (chunked, as chat does), or in one batch "
                   "then one eviction with the question in the window (whole, the paper's setting) [default: chunked]")
@click.option("--needle-keys", type=click.IntRange(min=1), default=None,
              help="needle: pass keys per depth, the same at every context [default: 1]")
@click.option("--prompt-tail/--no-prompt-tail", default=None,
              help="pyllmkv jobs: evict a prompt longer than the cache with the queries of its last window tokens "
                   "(chat's default) or with those of each batch's end [default: --prompt-tail]")
@click.option("--ppl-tokens", type=int, default=None, help="perplexity: tokens of text streamed [default: the grid's]")
@click.option("--ppl-budgets", callback=o.int_list, help="perplexity: budgets [default: the grid's]")
@click.option("--ppl-policies", callback=o.policy_list,
              help="perplexity: only these policies, comma-separated, beside stock full and stock shift [default: all]")
@click.option("--ruler-contexts", callback=o.int_list, help="ruler: context lengths in tokens [default: the grid's]")
@click.option("--ruler-budgets", callback=o.float_list, help="ruler: budgets, in cells or below 1 a share of the context")
@click.option("--ruler-samples", type=click.IntRange(min=1), default=None, help="ruler: samples per task and context")
@click.option("--ruler-seed", type=click.IntRange(min=0), default=None,
              help="ruler: draw the samples from this seed; another seed gives other samples [default: 0]")
@click.option("--ruler-tasks", callback=o.choice_list(RULER_TASKS, "tasks"), help=f"ruler: only these tasks ({', '.join(RULER_TASKS)})")
@click.option("--ruler-policies", callback=o.choice_list(list(POLICIES), "policies"),
              help=f"ruler: only these policies, beside the full cache [default: {','.join(RULER_POLICIES)}]; "
                   "surprisal runs in the chat setting only (it scores tokens as they are read)")
@click.option("--ruler-settings", callback=o.choice_list(RULER_SETTINGS, "settings"),
              help="ruler: agnostic (the question after the eviction), aware (the question in the window), repeat "
                   "(agnostic, scored by a request to repeat the context, KVzip's), chat and chat-repeat (agnostic, "
                   "the context read in batches inside the budget as chat reads it, scored by its tail or by "
                   "a repeat of each batch's text, repeat_probe; a prefill per branch), chat-question (read as "
                   "chat reads it, scored by the question to come: an oracle), chat-facts (read as chat reads it, scored by "
                   "a fixed question asking for the text's facts) [default: the first three]")
@click.option("--window", type=click.IntRange(min=1), default=None,
              help="observation window of every pyllmkv job: recent queries that score the cache [default: 32, 8 with --tiny]")
@click.option("--pool-kernel", type=int, callback=o.odd, default=None,
              help=f"pooling kernel of the window's and surprisal's scores, odd (1: none) [default: {EvictConfig.pool_kernel}]")
@click.option("--renumber/--no-renumber", default=None,
              help="every pyllmkv job: what follows an eviction reads the kept cells renumbered from 0, as chat does "
                   "where the cache can shift positions [default: off, as the committed runs]")
@click.option("-t", "--threads", type=int, default=os.cpu_count() or 1, show_default=True)
@click.option("-b", "--batch-size", "n_batch", type=int, default=0, help="tokens per decode [default: 512, 32 with --tiny]")
@click.option("-ngl", "--n-gpu-layers", "n_gpu_layers", type=int, default=0, show_default=True)
@click.option("--rpc", "rpc_servers", type=str, default=None, metavar="HOST:PORT,...",
              help="ggml-rpc-servers to split the -ngl layers across, in every job, stock and pyllmkv alike")
def bench(model, quick, tiny, suites, out, text, threads, n_batch, n_gpu_layers, rpc_servers, **overrides):
    """pyllmkv against stock llama.cpp on MODEL (default: smollm2-135m, which the grids are sized for): speed and memory, needle retrieval, perplexity under a budget and
    per-head output perturbation, every policy; writes results.json, results.md and PNG plots."""
    from .. import bench as b

    if quick and tiny:
        raise click.BadParameter("choose one of --quick and --tiny", param_hint="--quick/--tiny")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.ClickException("pyllmkv bench draws its plots with matplotlib: pip install matplotlib (or \"pyllmkv[bench]\")")
    model = o.model_path(model, default=models.BENCH_DEFAULT)
    o.add_rpc_servers(rpc_servers, n_gpu_layers)  # checked here, before any job: each job registers them again
    try:
        if b.needs_stock(list(suites) or b.SUITES):
            b.stock_lib_dir(say=lambda msg: click.echo(msg, err=True))
    except (FileNotFoundError, RuntimeError) as e:
        raise click.ClickException(str(e))
    out = out or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    grid = b.TINY if tiny else b.QUICK if quick else b.FULL
    if overrides["speed_policies"]:
        overrides["other_policies"] = False
    grid = dataclasses.replace(grid, **{k: v for k, v in overrides.items() if v is not None})
    opts = b.Options(model=str(model), out=out, grid=grid, suites=list(suites) or list(SUITES),
                     threads=threads, n_batch=n_batch, n_gpu_layers=n_gpu_layers, rpc_servers=rpc_servers, text=text,
                     command="pyllmkv bench " + " ".join(sys.argv[2:]))

    def progress(label, n):
        return click.progressbar(length=n, label=f"{label:<13}", file=sys.stderr, show_pos=True, show_eta=True)

    try:
        results = b.run(opts, progress)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise click.ClickException(str(e))
    from ..bench.report import markdown

    click.echo(markdown(results))
    click.echo(f"\npyllmkv: results in {out}/ (results.json, results.md, *.png)", err=True)
