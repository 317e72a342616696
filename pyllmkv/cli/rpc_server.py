"""`pyllmkv rpc-server`: ggml's RPC server of this build, for a host that holds some of a model's layers (--rpc)."""

from __future__ import annotations

import os

import click


@click.command("rpc-server", context_settings=dict(ignore_unknown_options=True, allow_extra_args=True, help_option_names=[]))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def rpc_server(args):
    """Runs ggml-rpc-server with ARGS (its own: -H HOST, -p PORT, -t THREADS, -d DEVICES, -c; --help lists them). It
    binds 127.0.0.1 unless -H says otherwise, and has no authentication: expose it on a trusted network only."""
    from .. import rpc

    try:
        path = rpc.server_path()
    except FileNotFoundError as e:
        raise click.ClickException(str(e))
    os.execv(path, [str(path), *args])
