"""What the commands share: the model argument, the budget and policy, llama.cpp's flags, their checks, and loading
a Session for chat."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from .. import models
from .._lib import DEFAULT_POLICY, GRANULARITIES, POLICIES, EvictConfig

CACHE_TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]


def ggml_type(name: str) -> int:
    from .._lib import llama_cpp

    return getattr(llama_cpp, f"GGML_TYPE_{name.upper()}")


def check_gguf(path: Path) -> None:
    if not path.exists():
        raise click.BadParameter(f"{path} does not exist: pass the path of a .gguf model file, or a model name "
                                 f"({', '.join(models.MODELS)}; `pyllmkv models` lists them)", param_hint="MODEL")
    if path.is_dir():
        raise click.BadParameter(f"{path} is a folder: pass the path of a .gguf model file", param_hint="MODEL")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise click.BadParameter(f"{path} is not a GGUF file (it does not start with 'GGUF'): convert it with llama.cpp's convert_hf_to_gguf.py", param_hint="MODEL")


def model_path(model: Optional[Path], default: str = models.DEFAULT) -> Path:
    """MODEL's path, or the model of that name, or the default model (fetched once) when none is given; checked to be
    a GGUF file. A file of that name in the working folder wins over the name."""
    if model is None:
        model = Path(default)
    if not model.exists() and str(model) in models.MODELS:
        model = models.MODELS[str(model)].path()
    check_gguf(model)
    return model


def check_budget(budget: int, window: int) -> None:
    if budget <= 0:
        raise click.BadParameter(f"must be positive (got {budget})", param_hint="--kv-budget")
    if window < 1:
        raise click.BadParameter(f"must be at least 1 (got {window})", param_hint="--window")
    if budget <= window:
        raise click.BadParameter(f"({budget}) must be larger than --window ({window}): the window is always kept", param_hint="--kv-budget")


def odd(ctx, param, value):
    if value is not None and (value < 1 or value % 2 == 0):
        raise click.BadParameter(f"{value} is not an odd number of cells (1, 3, 5, ...)")
    return value


prompt_tail_option = click.option(
    "--prompt-tail/--no-prompt-tail", default=True, show_default=True,
    help="evict a prompt longer than the cache with the queries of its last --window tokens (decoded alone first), so "
         "that what its end asks for is kept; --no-prompt-tail: with those of each batch's end")


renumber_option = click.option(
    "--renumber/--no-renumber", default=None,
    help="before a prompt or token that follows an eviction, renumber the kept cells from 0 (llama.cpp shifts RoPE in "
         "K), so it reads them as consecutive text, not across the positions the evicted text left empty [default: on "
         "where the model's cache can shift positions; off with serve --parallel]")


repack_option = click.option(
    "--repack/--no-repack", default=False, show_default=True,
    help="lay out a CPU model's weights as llama.cpp does, repacked for its matmul, all but W_O (which the value norms "
         "read): decodes faster and prefills slower on some CPUs, in more memory (--no-repack: ggml's row layout)")


pool_kernel_option = click.option(
    "--pool-kernel", type=int, callback=odd, default=EvictConfig.pool_kernel, show_default=True,
    help="cells the window's scores are averaged over, and positions surprisal's scores are max-pooled over (odd; 1: "
         "no pooling): a cell the window attends to, or a word read with surprise, keeps its neighbours, so a span "
         "stays whole")


def option_group(opts):
    def apply(fn):
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return apply


# what chat and serve share: the model, the budget and policy, and llama.cpp's flags for the context
model_options = option_group([
    click.argument("model", required=False, type=click.Path(path_type=Path)),
    click.option("--kv-budget", "budget", type=int, default=EvictConfig.budget, show_default=True, help="most cells the KV cache keeps per sequence (its memory)"),
    click.option("--policy", type=click.Choice(list(POLICIES)), default=DEFAULT_POLICY, show_default=True,
                 help=f"which cells to evict [serve --parallel's default: {EvictConfig.policy}, which needs no token's surprisal]"),
    click.option("--granularity", type=click.Choice(list(GRANULARITIES)), default=EvictConfig.granularity, show_default=True,
                 help="head: each KV head keeps its own cells; token: one set of cells for all heads"),
    click.option("--window", type=int, default=EvictConfig.window, show_default=True, help="observation window: recent queries that score the cache"),
    pool_kernel_option,
    prompt_tail_option,
    renumber_option,
    click.option("-c", "--ctx-size", "n_ctx", type=click.IntRange(min=0), default=0,
                 help="most tokens a conversation holds, prompts and answers, of which the cache keeps --kv-budget "
                      "[default: 0, chat without limit, serve the model's trained context]"),
    click.option("-b", "--batch-size", "n_batch", type=int, default=512, show_default=True, help="tokens per decode; also how far the cache may exceed the budget"),
    click.option("-ngl", "--n-gpu-layers", "n_gpu_layers", type=int, default=0, show_default=True),
    repack_option,
    click.option("-ctk", "--cache-type-k", "cache_type_k", type=click.Choice(CACHE_TYPES), default="f16", show_default=True),
    click.option("-ctv", "--cache-type-v", "cache_type_v", type=click.Choice(CACHE_TYPES), default="f16", show_default=True),
    click.option("-fa", "--flash-attn", "flash_attn", type=click.Choice(["on", "off", "auto"]), default="auto", show_default=True,
                 help="auto: on when -ctv is quantized (llama.cpp needs it then), else off as in llama-cpp-python"),
    click.option("--rpc", "rpc_servers", type=str, default=None, metavar="HOST:PORT,...",
                 help="ggml-rpc-servers (`pyllmkv rpc-server` on each host) to split the -ngl layers across, as llama.cpp's --rpc"),
    click.option("-t", "--threads", "n_threads", type=int, default=None, help="CPU threads [default: llama-cpp-python's]"),
    click.option("--seed", type=int, default=-1, show_default=True, help="sampling seed (-1: random)"),
])


def threads(n_threads: Optional[int]) -> dict:
    """-t as llama.cpp's: the threads of generation and of prompt processing alike."""
    return dict(n_threads=n_threads, n_threads_batch=n_threads) if n_threads else {}


def flash_attn_flag(cache_type_v: str, flash_attn: str) -> bool:
    """-fa as llama-cpp-python's bool; a quantized V cache needs flash attention in llama.cpp."""
    quantized_v = cache_type_v not in ("f32", "f16", "bf16")
    if quantized_v and flash_attn == "off":
        raise click.BadParameter(f"a quantized V cache ({cache_type_v}) needs flash attention in llama.cpp: use -fa on or auto",
                                 param_hint="-fa")
    return flash_attn == "on" or (flash_attn == "auto" and quantized_v)


def load(model: Optional[Path], budget: int, policy: str, granularity: str, window: int, pool_kernel: int, prompt_tail: bool, n_batch: int,
         n_gpu_layers: int, cache_type_k: str, cache_type_v: str, flash_attn: str, n_threads: Optional[int], seed: int,
         rpc_servers: Optional[str] = None, renumber: Optional[bool] = None, repack: bool = False):
    """Validates the arguments, loads the model and returns a Session with eviction enabled; `renumber` None: on where
    the model's cache can shift positions."""
    from .._lib import KVEvictError, cpu_weights, llama_cpp, renumber_where_it_can
    from ..session import Session, context_size, sliding_window

    check_budget(budget, window)
    model = model_path(model)

    try:
        config = EvictConfig.for_cells(budget, policy=policy, granularity=granularity, window=window,
                                       pool_kernel=pool_kernel, prompt_tail=prompt_tail, renumber=bool(renumber))
    except KVEvictError as e:  # the budget, the policy or the granularity: the message names which
        raise click.ClickException(str(e))
    try:
        cells = context_size(sliding_window(str(model)), config.cells, n_batch)
    except (ValueError, KeyError, IndexError) as e:
        raise click.ClickException(f"{model} is not a readable GGUF file ({e}): the file may be truncated")

    fa = flash_attn_flag(cache_type_v, flash_attn)
    add_rpc_servers(rpc_servers, n_gpu_layers)
    try:
        with cpu_weights("repack" if repack else "plain"):
            llm = llama_cpp.Llama(
                model_path=str(model), n_ctx=cells, n_batch=n_batch, n_ubatch=n_batch, n_gpu_layers=n_gpu_layers,
                type_k=ggml_type(cache_type_k), type_v=ggml_type(cache_type_v), flash_attn=fa, seed=seed,
                verbose=False, **threads(n_threads),
            )
    except ValueError as e:
        raise click.ClickException(f"llama.cpp could not load {model}: {e} (a truncated or unsupported GGUF?)")
    try:
        return Session(llm, renumber_where_it_can(llm, config, renumber))
    except (KVEvictError, ValueError) as e:
        raise click.ClickException(str(e))


def add_rpc_servers(rpc_servers: Optional[str], n_gpu_layers: int) -> None:
    """--rpc: registers the servers (checked to answer) before the model loads."""
    if not rpc_servers:
        return
    from .. import rpc

    try:
        rpc.add_servers(rpc_servers)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--rpc")
    except (ConnectionError, RuntimeError) as e:
        raise click.ClickException(str(e))
    if n_gpu_layers == 0:
        click.echo("pyllmkv: --rpc places the -ngl layers on the servers; with -ngl 0 every layer stays here", err=True)


def int_list(ctx, param, value):
    return None if value is None else [int(v) for v in float_list(ctx, param, value)]


def float_list(ctx, param, value):
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers")


def choice_list(choices, what: str):
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


policy_list = choice_list(list(POLICIES), "policies")


def echo_table(rows) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())

