"""`pyllmkv serve`: llama-cpp-python's OpenAI-compatible server on a model with a KV cache of fixed size."""

from __future__ import annotations

import click

from . import options as o


@click.command()
@o.model_options
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--cache", is_flag=True,
              help="keep the states of earlier prompts in RAM and resume a prompt from the longest shared prefix "
                   "(llama-cpp-python's prompt cache)")
@click.option("--cache-size", type=int, default=2 << 30, show_default=True, help="bytes of RAM --cache may hold")
def serve(model, budget, policy, granularity, window, pool_kernel, prompt_tail, n_ctx, n_batch, n_gpu_layers, cache_type_k,
          cache_type_v, flash_attn, n_threads, seed, rpc_servers, host, port, cache, cache_size):
    """OpenAI-compatible server (llama-cpp-python's) on MODEL with a KV cache of --kv-budget cells."""
    from ..server import create_app, port_in_use

    o.check_budget(budget, window)
    model = o.model_path(model)
    if port_in_use(host, port):
        raise click.ClickException(f"port {port} on {host} is in use: pass another with --port")
    o.add_rpc_servers(rpc_servers, n_gpu_layers)
    try:
        app = create_app(str(model), kv_budget=budget, policy=policy, granularity=granularity, window=window,
                         pool_kernel=pool_kernel, prompt_tail=prompt_tail, n_ctx=n_ctx, n_batch=n_batch,
                         n_gpu_layers=n_gpu_layers, type_k=o.ggml_type(cache_type_k), type_v=o.ggml_type(cache_type_v),
                         flash_attn=o.flash_attn_flag(cache_type_v, flash_attn), seed=seed, cache=cache, cache_type="ram",
                         cache_size=cache_size, **o.threads(n_threads))
    except (RuntimeError, ValueError) as e:
        raise click.ClickException(str(e))
    import uvicorn

    click.echo(f"pyllmkv: serving {model.name} on http://{host}:{port}/v1 (KV budget {budget} cells, {policy}, {granularity})", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")

