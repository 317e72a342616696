"""The `pyllmkv` command: one module per command, the options they share in options.py."""

from __future__ import annotations

import click

from .bench import bench
from .chat import chat
from .listing import list_models, list_policies
from .options import load
from .rpc_server import rpc_server
from .serve import serve

__all__ = ["main", "load"]


@click.group()
@click.version_option(package_name="pyllmkv")
def main():
    """llama.cpp with a KV cache of fixed size (eviction by output perturbation: LayerDefensiveKV by default)."""


for command in (chat, serve, bench, list_models, list_policies, rpc_server):
    main.add_command(command)
