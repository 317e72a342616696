"""`pyllmkv serve`: llama-cpp-python's OpenAI-compatible server on a model with a KV cache of fixed size."""

from __future__ import annotations

import click

from . import options as o
from .._lib import EvictConfig


@click.command()
@o.model_options
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--cache", is_flag=True,
              help="keep the states of earlier prompts in RAM and resume a prompt from the longest shared prefix "
                   "(llama-cpp-python's prompt cache)")
@click.option("--cache-size", type=int, default=2 << 30, show_default=True, help="bytes of RAM --cache may hold")
@click.option("-np", "--parallel", "n_parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="conversations served at once, each within its own --kv-budget: above 1, llama.cpp's llama-server "
                   "with that many slots (built on first use)")
def serve(model, budget, policy, granularity, window, pool_kernel, prompt_tail, renumber, n_ctx, n_batch, n_gpu_layers, repack,
          cache_type_k, cache_type_v, flash_attn, n_threads, seed, rpc_servers, host, port, cache, cache_size, n_parallel):
    """OpenAI-compatible server on MODEL with a KV cache of --kv-budget cells per conversation: llama-cpp-python's,
    one request at a time, or with --parallel N llama.cpp's llama-server with N slots."""
    from ..server import create_app, port_in_use

    o.check_budget(budget, window)
    model = o.model_path(model)
    if port_in_use(host, port):
        raise click.ClickException(f"port {port} on {host} is in use: pass another with --port")
    if n_parallel > 1:
        if cache:
            raise click.BadParameter("llama-server's prompt cache would restore cells without the hook's state; "
                                     "--parallel serves without --cache", param_hint="--cache")
        if renumber:
            raise click.BadParameter("llama-server keeps each slot's positions as llama.cpp numbers them; --parallel "
                                     "serves without --renumber", param_hint="--renumber")
        if click.get_current_context().get_parameter_source("policy") == click.core.ParameterSource.DEFAULT:
            policy = EvictConfig.policy  # llama-server computes no prompt logits: the default that needs none
        serve_parallel(model, budget, policy, granularity, window, pool_kernel, n_ctx, n_batch, n_gpu_layers, repack,
                       cache_type_k, cache_type_v, flash_attn, n_threads, seed, rpc_servers, host, port, n_parallel)
        return
    o.add_rpc_servers(rpc_servers, n_gpu_layers)
    try:
        app = create_app(str(model), kv_budget=budget, policy=policy, granularity=granularity, window=window,
                         pool_kernel=pool_kernel, prompt_tail=prompt_tail, renumber=renumber, repack=repack, n_ctx=n_ctx,
                         n_batch=n_batch, n_gpu_layers=n_gpu_layers, type_k=o.ggml_type(cache_type_k),
                         type_v=o.ggml_type(cache_type_v),
                         flash_attn=o.flash_attn_flag(cache_type_v, flash_attn), seed=seed, cache=cache, cache_type="ram",
                         cache_size=cache_size, **o.threads(n_threads))
    except (RuntimeError, ValueError) as e:
        raise click.ClickException(str(e))
    import uvicorn

    click.echo(f"pyllmkv: serving {model.name} on http://{host}:{port}/v1 (KV budget {budget} cells, {policy}, {granularity})", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def serve_parallel(model, budget, policy, granularity, window, pool_kernel, n_ctx, n_batch, n_gpu_layers, repack,
                   cache_type_k, cache_type_v, flash_attn, n_threads, seed, rpc_servers, host, port, n_parallel):
    """llama-server with n_parallel slots, each a sequence evicted to its own budget; runs until interrupted."""
    import os

    from .. import parallel
    from .._lib import KVEvictError
    from ..session import context_size, sliding_window

    try:
        config = EvictConfig.for_cells(budget, policy=policy, granularity=granularity, window=window, pool_kernel=pool_kernel)
    except KVEvictError as e:
        raise click.ClickException(str(e))
    if config.token_scores:
        raise click.BadParameter(f"{policy} ranks cells by each token's surprisal, from logits llama-server does not "
                                 "compute for a prompt: serve it without --parallel", param_hint="--policy")
    cells = context_size(sliding_window(str(model)), config.cells, n_batch)
    fa = "on" if o.flash_attn_flag(cache_type_v, flash_attn) else "off"  # chat's meaning of auto, not llama-server's
    extra = ["-c", str(n_parallel * cells), "-ngl", str(n_gpu_layers), "-ctk", cache_type_k, "-ctv", cache_type_v,
             "-fa", fa, "--seed", str(seed)]
    if n_ctx:
        click.echo(f"pyllmkv: with --parallel a conversation may go to the model's trained context; -c {n_ctx} is "
                   "not applied", err=True)
    if not repack:
        extra += ["--no-repack"]  # as chat loads a CPU model; --repack leaves llama-server's own layout, W_O included
    if n_threads:
        extra += ["-t", str(n_threads), "-tb", str(n_threads)]
    if rpc_servers:
        extra += ["--rpc", rpc_servers]
    try:
        argv, env = parallel.command(str(model), config, n_parallel, n_batch, host, port, extra)
    except (FileNotFoundError, RuntimeError) as e:
        raise click.ClickException(str(e))
    click.echo(f"pyllmkv: serving {model.name} on http://{host}:{port}/v1 with llama-server, {n_parallel} slots of "
               f"KV budget {budget} cells each ({policy}, {granularity})", err=True)
    try:
        os.execve(argv[0], argv, env)
    except OSError as e:
        raise click.ClickException(f"could not start {argv[0]}: {e}")
